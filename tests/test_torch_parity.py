"""Imported PyTorch ResNets compute what they computed in PyTorch: a torchvision-layout ResNet written in PyTorch
(benchmarks/torch_resnet.py), with random weights and random BatchNorm statistics, saved as .pth and .safetensors,
converted, and run in inference mode beside the Flax model on the same images.

Needs PyTorch (CI installs it: .ci/run). Without it these tests are skipped, unless PAGKD_REQUIRE_TORCH=1 makes
that an error, so a CI that lost PyTorch cannot pass silently.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagkd_jax.models import pretrained
from pagkd_jax.models import resnet
from pagkd_jax.models import torchvision_layout
from pagkd_jax.models import weight_files

if os.environ.get("PAGKD_REQUIRE_TORCH") == "1":
  import torch  # noqa: F401  (an ImportError here fails the run)
torch = pytest.importorskip("torch")
from safetensors.torch import save_file as save_safetensors  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from torch_resnet import TorchBasicBlock, random_torch_resnet  # noqa: E402

pytestmark = pytest.mark.slow


def assert_close(actual, expected, rel=1e-4):
  """Agreement to `rel` of the reference's scale, element by element.

  PyTorch's and XLA's float32 convolutions sum up to 3 * 3 * 512 products per output in their own orders (and XLA
  in the vector width of the CPU's instruction set): ~eps32 * sqrt(4608) = 8e-6 of the scale per layer, over up to
  50 layers. Measured: at most 8e-7 (ResNet-50 layer4, AVX-512 and AVX2); a conversion error (a swapped mean and
  variance, an untransposed kernel) moves outputs by a large fraction of their scale.
  """
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def torch_checkpoints(request, tmp_path_factory):
  """(name, torch model, .pth path, .safetensors path, images NHWC float32, torch logits, torch layer4 NHWC)."""
  name = request.param
  model = random_torch_resnet(name, seed=3)
  folder = tmp_path_factory.mktemp(name)
  pth, st = folder / f"{name}.pth", folder / f"{name}.safetensors"
  torch.save(model.state_dict(), pth)
  save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    logits, features = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return name, model, pth, st, images, logits.numpy(), features.permute(0, 2, 3, 1).numpy()


@pytest.mark.numerics
@pytest.mark.parametrize("which", ["pth", "safetensors"])
def test_converted_model_matches_pytorch_logits_and_layer4(torch_checkpoints, which):
  name, _, pth, st, images, t_logits, t_features = torch_checkpoints
  state = weight_files.read_state_dict(pth if which == "pth" else st)
  arch, variables = torchvision_layout.convert(state, include_head=True)
  assert arch == name
  model = resnet.create_resnet(name, num_classes=1000)
  logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
  assert features.shape == t_features.shape == (2, 2, 2, 512 * resnet.PRESETS[name].block.expansion)
  assert_close(features, t_features)
  assert_close(logits, t_logits)


def test_both_formats_give_identical_variables(torch_checkpoints):
  _, _, pth, st, *_ = torch_checkpoints
  a = torchvision_layout.convert(weight_files.read_state_dict(pth))[1]
  b = torchvision_layout.convert(weight_files.read_state_dict(st))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert "fc" not in a["params"]  # The ImageNet head is dropped by default.


def test_import_cli_writes_a_folder_that_init_from_loads(torch_checkpoints, tmp_path, repo_root):
  """The command-line tool on the .safetensors file, in a process where PyTorch cannot be imported."""
  name, model, _, st, *_ = torch_checkpoints
  out = tmp_path / "imported"
  code = ("import sys; sys.modules['torch'] = None\n"
          "from absl import app\nfrom pagkd_jax.tools import import_weights\n"
          f"sys.argv = ['import_weights', '--input={st}', '--output={out}']\napp.run(import_weights.main)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"--config.model.name={name}" in done.stdout
  info = pretrained.read_info(str(out))
  assert info["architecture"] == name and info["normalization"] == "imagenet" and info["format"] == "safetensors"
  assert info["sha256"] == pretrained.file_sha256(str(st))
  loaded = pretrained.load(str(out), name)
  sd = model.state_dict()
  np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"],
                                sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["layer4_0"]["downsample_bn"]["var"],
                                sd["layer4.0.downsample.1.running_var"].numpy())
  assert "fc" not in loaded["params"]
  with pytest.raises(FileExistsError, match="exists"):  # A second import into the same folder is refused.
    pretrained.save(str(out), loaded, info)


def test_training_checkpoints_are_unwrapped(tmp_path):
  """A training script's checkpoint: {"epoch", "state_dict": {"module.conv1.weight", ...}}."""
  model = random_torch_resnet("resnet18", seed=5)
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
  path = tmp_path / "checkpoint.pt"
  torch.save(wrapped, path)
  state = weight_files.read_state_dict(path)
  assert "conv1.weight" in state and "fc.bias" in state
  np.testing.assert_array_equal(state["layer1.0.bn1.running_mean"], model.layer1[0].bn1.running_mean.numpy())
  assert torchvision_layout.convert(state)[0] == "resnet18"


def test_pth_with_pickled_code_is_refused(tmp_path):
  """weights_only=True: a file that needs arbitrary objects to unpickle is not executed."""
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "obj": TorchBasicBlock(4, 4, 1)}, path)
  with pytest.raises(weight_files.WeightFileError, match="weights-only"):
    weight_files.read_state_dict(path)


def test_training_processes_do_not_load_pytorch(tmp_path, repo_root):
  """With PyTorch installed, the metric log (tensorboardX would import it) still leaves it out of training."""
  code = ("import sys\nfrom pagkd_jax.training import metric_log\n"
          f"log = metric_log.MetricLog({str(tmp_path)!r}, enabled=True)\nlog.write(1, {{'train/loss': 0.5}})\n"
          "log.close()\nprint('torch loaded:', 'torch' in sys.modules)\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "torch loaded: False" in done.stdout
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
