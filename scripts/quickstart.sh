#!/usr/bin/env bash
# Fresh machine to results: sets up .venv, generates the synthetic WLI/NBI data, trains the NBI teacher and the
# PaGKD WLI student (WORKDIR/pagkd, teacher in WORKDIR/pagkd/teacher) and the WLI-only baseline
# (WORKDIR/baseline), evaluates all three on their test splits and prints a table.
#   bash scripts/quickstart.sh [WORKDIR]        (default runs/synthetic)
# Rerunning resumes each run from its last checkpoint; finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
W=${1:-runs/synthetic}
PY=.venv/bin/python
SECONDS=0
$PY train.py --config=configs/synthetic.py --workdir="$W/pagkd"  # Teacher first, then the student.
$PY train.py --config=configs/synthetic.py --config.stage=baseline --workdir="$W/baseline"
$PY eval.py --workdir="$W/pagkd/teacher"
$PY eval.py --workdir="$W/pagkd"
$PY eval.py --workdir="$W/baseline"
$PY - "$W" "$SECONDS" <<'PYEOF'
import json, sys
w, seconds = sys.argv[1], int(sys.argv[2])
rows = (("NBI teacher", "pagkd/teacher"), ("WLI baseline", "baseline"), ("WLI PaGKD student", "pagkd"))
print(f"\n| run | test images | AUC [95% CI] | accuracy | macro F1 |\n|---|---|---|---|---|")
for name, run in rows:
  m = json.load(open(f"{w}/{run}/eval/metrics.json"))
  lo, hi = m["ci95"]["auc"]
  print(f"| {name} | {m['n_images']} {m['modality'].upper()} | {m['auc']:.3f} [{lo:.3f}, {hi:.3f}] | "
        f"{m['accuracy']:.3f} | {m['f1_macro']:.3f} |")
print(f"\nTraining and evaluation took {seconds // 60} min {seconds % 60} s. Reports, ROC curves, confusion "
      f"matrices and CAMs: {w}/<run>/eval/")
PYEOF
