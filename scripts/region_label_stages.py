"""Where the region labels lose the lesion, for trained runs on synthetic data: the region-label stages of
`pagkd_jax/evaluation/region_agreement.py` (CAM maximum in the disc, the dual threshold without PAR, with PAR, a CAM
equal to the disc through PAR) with each PAR resampling, for the run's classifier on its test images and, for a
stage-2 run, its NBI teacher on the NBI test images. The checkpoint is the one eval.py ships (best).

  python scripts/region_label_stages.py --workdir=runs/transfer/seed0/pro_den_paper [--workdir=...] \
      [--out=stages.json]

With the run's own `distill.par_resampling` the numbers are eval.py's `region_agreement`; the other value shows what
the labels would have been. Prints one line per (run, model, resampling) and writes them all to --out.
"""

import json
import os

from absl import app, flags

from pagkd_jax import experiment
from pagkd_jax import methods
from pagkd_jax.distill import par
from pagkd_jax.evaluation import evaluator
from pagkd_jax.evaluation import region_agreement

_WORKDIRS = flags.DEFINE_multi_string("workdir", [], "Training workdir(s) on synthetic data (repeatable).")
_OUT = flags.DEFINE_string("out", "", "JSON file of every result; empty: print only.")


def stages(workdir: str) -> dict:
  """{"model"|"teacher": {resampling: region_agreement.evaluate_region_agreement(...)}} for one workdir."""
  config = evaluator.load_config(workdir)
  if not config.data.synthetic.enabled:
    raise ValueError(f"{workdir}: not a run on synthetic data (no true lesions to compare with).")
  data = experiment.load_split_data(config)
  model = experiment.build_model(config)
  size = config.data.image_size
  who = {"model": (workdir, methods.stage_modality(config.stage))}
  if config.stage == "pagkd":
    who["teacher"] = (config.teacher.workdir or os.path.join(workdir, "teacher"), "nbi")
  result = {}
  for name, (run, modality) in who.items():
    variables, _, _ = evaluator.restore_classifier(run, model, size, "best")
    records = data.select("test", modality)
    result[name] = {}
    for resampling in par.RESAMPLING:
      config.distill.par_resampling = resampling
      result[name][resampling] = region_agreement.evaluate_region_agreement(model, variables, records, config)
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIRS.value:
    raise app.UsageError("Give at least one --workdir.")
  results = {}
  for workdir in _WORKDIRS.value:
    results[workdir] = stages(workdir)
    for name, by_resampling in results[workdir].items():
      for resampling, r in by_resampling.items():
        print(f"{workdir} {name} PAR {resampling}: CAM maximum in the disc {r['cam_peak_in_disc']:.3f}; disc recall "
              f"without PAR {r['without_par']['disc_recall']:.3f}, with PAR {r['disc_recall']:.3f} (lesion labels "
              f"outside the disc {r['false_lesion_fraction']}); a CAM equal to the disc through PAR "
              f"{r['disc_through_par']['disc_recall']:.3f}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
