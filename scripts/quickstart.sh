#!/usr/bin/env bash
# Fresh machine to results: sets up .venv, generates the synthetic WLI/NBI data, trains and evaluates the
# NBI teacher and the WLI-only baseline on it, and prints their test metrics.
#   bash scripts/quickstart.sh [WORKDIR]        (default runs/synthetic)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
W=${1:-runs/synthetic}
PY=.venv/bin/python
for stage in teacher baseline; do
  $PY train.py --config=configs/synthetic.py --config.stage=$stage --workdir="$W/$stage"
  $PY eval.py --workdir="$W/$stage"
done
$PY - "$W" <<'PYEOF'
import json, sys
w = sys.argv[1]
for stage in ("teacher", "baseline"):
  m = json.load(open(f"{w}/{stage}/eval/metrics.json"))
  lo, hi = m["ci95"]["auc"]
  print(f"{stage:9s} ({m['modality'].upper()} test, {m['n_images']} images): AUC {m['auc']:.3f} "
        f"[{lo:.3f}, {hi:.3f}]  accuracy {m['accuracy']:.3f}  macro F1 {m['f1_macro']:.3f}")
print(f"Reports, ROC curves, confusion matrices and CAMs: {w}/<stage>/eval/")
PYEOF
