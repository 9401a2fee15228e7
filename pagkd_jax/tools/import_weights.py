"""Converts an ImageNet ResNet checkpoint (torchvision `.pth`, timm / Hugging Face `.safetensors`) into a folder
that `config.model.init_from` reads.

  python -m pagkd_jax.tools.import_weights --input resnet50-11ad3fa6.pth --output weights/resnet50_tv2
  python train.py --config=configs/piccolo.py --config.model.init_from=weights/resnet50_tv2 ...

The classification head is dropped; the architecture (resnet18/34/50/101) is read from the keys and recorded.
"""

import datetime
import json
import os

from absl import app
from absl import flags
from absl import logging

from pagkd_jax.models import pretrained

_INPUT = flags.DEFINE_string("input", None, "A .pth/.pt/.bin (PyTorch) or .safetensors ResNet checkpoint.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not hold an import already).")
flags.mark_flags_as_required(["input", "output"])


def import_weights(input_path: str, output_dir: str) -> dict:
  """Converts `input_path` into `output_dir`; returns what imported_from.json records."""
  architecture, variables = pretrained.import_file(input_path)
  info = {
      "architecture": architecture,
      "source": os.path.abspath(input_path),
      "sha256": pretrained.file_sha256(input_path),
      "format": "safetensors" if input_path.lower().endswith(".safetensors") else "pytorch",
      "normalization": pretrained.NORMALIZATION,
      "head": "dropped",
      "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  pretrained.save(output_dir, variables, info)
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  info = import_weights(_INPUT.value, _OUTPUT.value)
  logging.info("Imported %s", json.dumps(info))
  print(f"Wrote {info['architecture']} backbone weights to {os.path.abspath(_OUTPUT.value)}.\n"
        f"Use them with --config.model.name={info['architecture']} --config.model.init_from="
        f"{os.path.abspath(_OUTPUT.value)} (inputs normalised with ImageNet mean/std: "
        f"config.data.normalization='imagenet', the default).")


if __name__ == "__main__":
  app.run(main)
