"""Test-sized configurations built from the project's own presets."""

import importlib.util
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_preset(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO_ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_script(name: str):
  """scripts/<name>.py imported as a module (its functions, without running it)."""
  spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO_ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_synthetic_config(data_dir, *, stage="teacher", num_steps=6, image_size=32, group_size=4):
  """configs/synthetic.py:smoke shrunk to seconds: a few lesions at 32 px, `num_steps` steps."""
  config = load_preset("synthetic", "smoke")
  config.stage = stage
  s = config.data.synthetic
  s.out = str(data_dir)
  s.image_size = image_size
  s.lesions_per_class = 10
  s.images_per_lesion = 2
  config.data.image_size = image_size
  config.data.group_size = group_size
  config.data.eval_batch_size = 16
  config.train.num_steps = num_steps
  config.train.log_every_steps = 2
  config.train.eval_every_steps = 3
  config.train.checkpoint_every_steps = 3
  config.eval.bootstrap_samples = 50
  config.eval.num_cam_images = 3
  return config
