"""Weight import without PyTorch: key layout, error messages, .safetensors files, and `config.model.init_from` in
training. (Numerical parity with PyTorch: test_torch_parity.py.)"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from pagkd_jax import checkpointing
from pagkd_jax import mesh as mesh_lib
from pagkd_jax.methods import classifier
from pagkd_jax.methods import pagkd as pagkd_method
from pagkd_jax.models import pretrained
from pagkd_jax.models import resnet
from pagkd_jax.models import torchvision_layout
from pagkd_jax.models import weight_files
from pagkd_jax.training import optimizer
from pagkd_jax.training import trainer

from training_configs import tiny_synthetic_config


def torchvision_state_shapes(blocks, bottleneck, num_classes=1000) -> dict[str, tuple]:
  """Every tensor of torchvision's ResNet, written out from its definition (not from the code under test)."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, c):
    for field in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{field}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  bn("bn1", 64)
  inplanes, expansion = 64, 4 if bottleneck else 1
  for i, n in enumerate(blocks):
    width = 64 * 2**i
    for b in range(n):
      p = f"layer{i + 1}.{b}"
      stride = 2 if i > 0 and b == 0 else 1
      if bottleneck:
        convs = [(width, inplanes, 1), (width, width, 3), (width * 4, width, 1)]
      else:
        convs = [(width, inplanes, 3), (width, width, 3)]
      for j, (o, c, k) in enumerate(convs, start=1):
        shapes[f"{p}.conv{j}.weight"] = (o, c, k, k)
        bn(f"{p}.bn{j}", o)
      if stride != 1 or inplanes != width * expansion:
        shapes[f"{p}.downsample.0.weight"] = (width * expansion, inplanes, 1, 1)
        bn(f"{p}.downsample.1", width * expansion)
      inplanes = width * expansion
  shapes["fc.weight"], shapes["fc.bias"] = (num_classes, inplanes), (num_classes,)
  return shapes


def random_state(shapes, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: (np.asarray(7, np.int64) if k.endswith("num_batches_tracked")
              else rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}


RESNET18 = torchvision_state_shapes((2, 2, 2, 2), bottleneck=False)
RESNET50 = torchvision_state_shapes((3, 4, 6, 3), bottleneck=True)


@pytest.mark.parametrize("name,shapes", [("resnet18", RESNET18), ("resnet50", RESNET50)])
def test_key_map_covers_exactly_torchvisions_tensors(name, shapes):
  mapped = {key for key, _, _ in torchvision_layout.key_map(name, include_head=True)}
  assert mapped == {k for k in shapes if not k.endswith("num_batches_tracked")}
  assert torchvision_layout.infer_architecture(shapes) == name


def test_conversion_transposes_and_places_every_tensor():
  state = random_state(RESNET18)
  name, variables = torchvision_layout.convert(state, include_head=True)
  assert name == "resnet18"
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(p["layer2_0"]["conv1"]["kernel"][1, 2, 5, 7], state["layer2.0.conv1.weight"][7, 5, 1, 2])
  np.testing.assert_array_equal(p["layer3_0"]["downsample_conv"]["kernel"][0, 0, 4, 9],
                                state["layer3.0.downsample.0.weight"][9, 4, 0, 0])
  np.testing.assert_array_equal(p["layer1_1"]["bn2"]["scale"], state["layer1.1.bn2.weight"])
  np.testing.assert_array_equal(p["layer1_1"]["bn2"]["bias"], state["layer1.1.bn2.bias"])
  np.testing.assert_array_equal(s["layer4_1"]["bn1"]["mean"], state["layer4.1.bn1.running_mean"])
  np.testing.assert_array_equal(s["layer4_1"]["bn1"]["var"], state["layer4.1.bn1.running_var"])
  np.testing.assert_array_equal(p["fc"]["kernel"], state["fc.weight"].T)
  # The converted tree is exactly the Flax model's (structure and shapes).
  model = resnet.create_resnet("resnet18", 1000)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert jax.tree.structure(dict(expected)) == jax.tree.structure(variables)
  jax.tree.map(lambda e, v: np.testing.assert_equal(e.shape, v.shape), dict(expected), variables)


def test_missing_unexpected_and_misshapen_keys_are_named():
  state = random_state(RESNET18)
  del state["layer3.1.bn2.running_var"]
  state["layer3.1.se.fc1.weight"] = np.zeros((4, 4), np.float32)
  with pytest.raises(torchvision_layout.LayoutError) as e:
    torchvision_layout.convert(state)
  assert "missing keys: layer3.1.bn2.running_var" in str(e.value)
  assert "unexpected keys: layer3.1.se.fc1.weight" in str(e.value)

  state = random_state(RESNET18)
  state["layer2.1.conv2.weight"] = np.zeros((128, 128, 5, 5), np.float32)
  with pytest.raises(torchvision_layout.LayoutError, match=r"layer2\.1\.conv2\.weight \(128, 128, 5, 5\).*"
                                                           r"expected \(3, 3, 128, 128\)"):
    torchvision_layout.convert(state)


def test_other_architectures_are_refused_by_name():
  vit = {"cls_token": np.zeros((1, 1, 768)), "blocks.0.attn.qkv.weight": np.zeros((2304, 768))}
  with pytest.raises(torchvision_layout.LayoutError, match="Not a torchvision-layout ResNet.*blocks.0.attn.qkv"):
    torchvision_layout.convert(vit)
  three_stages = {k: v for k, v in random_state(RESNET18).items() if not k.startswith("layer4")}
  with pytest.raises(torchvision_layout.LayoutError, match=r"\(2, 2, 2\) basic blocks.*matches no importable"):
    torchvision_layout.convert(three_stages)


def test_file_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.pth"):
    weight_files.read_state_dict(tmp_path / "nothing.pth")
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(weight_files.WeightFileError, match=r"'\.h5'.*weights\.h5"):
    weight_files.read_state_dict(tmp_path / "weights.h5")
  (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(weight_files.WeightFileError, match="broken.safetensors is not a readable"):
    weight_files.read_state_dict(tmp_path / "broken.safetensors")


def test_pth_without_pytorch_says_what_to_do(tmp_path, repo_root):
  (tmp_path / "resnet50.pth").write_bytes(b"PK")
  code = ("import sys; sys.modules['torch'] = None\nfrom pagkd_jax.models import weight_files\n"
          f"weight_files.read_state_dict({str(tmp_path / 'resnet50.pth')!r})\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert "ImportError" in done.stderr and "needs PyTorch" in done.stderr and "pip install torch" in done.stderr
  assert "resnet50.pth" in done.stderr


def test_overlay_replaces_the_backbone_and_keeps_the_head():
  model = resnet.create_resnet("tiny", 3)
  x = jnp.zeros((1, 16, 16, 3))
  fresh = model.init(jax.random.key(0), x, train=False)
  other = model.init(jax.random.key(1), x, train=False)
  backbone = {"params": {k: v for k, v in other["params"].items() if k != "fc"}, "batch_stats": other["batch_stats"]}
  merged = pretrained.overlay(dict(fresh), backbone)
  np.testing.assert_array_equal(merged["params"]["layer2_0"]["conv1"]["kernel"],
                                other["params"]["layer2_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(merged["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])
  bad = jax.tree.map(lambda a: a, backbone)
  bad["params"]["conv1"]["kernel"] = np.zeros((7, 7, 3, 8), np.float32)
  bad["params"]["extra"] = {"w": np.zeros(3)}
  with pytest.raises(ValueError, match=r"conv1/kernel has shape \(7, 7, 3, 8\).*extra/w is not a variable"):
    pretrained.overlay(dict(fresh), bad)


def save_tiny_backbone(directory, seed=7) -> dict:
  """An imported-weights folder for the `tiny` preset (no published checkpoint has its shapes)."""
  model = resnet.create_resnet("tiny", 3)
  v = model.init(jax.random.key(seed), jnp.zeros((1, 16, 16, 3)), train=False)
  backbone = {"params": {k: v for k, v in v["params"].items() if k != "fc"}, "batch_stats": v["batch_stats"]}
  backbone = jax.tree.map(np.asarray, backbone)
  pretrained.save(str(directory), backbone, {"architecture": "tiny", "normalization": "imagenet"})
  return backbone


def test_init_from_refuses_another_architecture(tmp_path):
  save_tiny_backbone(tmp_path / "tiny_weights")
  with pytest.raises(ValueError, match="holds tiny weights but config.model.name is 'resnet50'"):
    pretrained.load(str(tmp_path / "tiny_weights"), "resnet50")
  save_file(random_state(RESNET18), str(tmp_path / "r18.safetensors"))
  with pytest.raises(ValueError, match="holds resnet18 weights but config.model.name is 'resnet50'"):
    pretrained.load(str(tmp_path / "r18.safetensors"), "resnet50")
  with pytest.raises(FileNotFoundError, match="neither an imported-weights folder .* nor a training workdir"):
    pretrained.load(str(tmp_path), "tiny")


def _assert_backbone_equal(variables, backbone):
  jax.tree.map(np.testing.assert_array_equal, {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                                               "batch_stats": variables["batch_stats"]}, backbone)


def test_initial_state_takes_every_backbone_variable_from_init_from(tmp_path):
  """Teacher/baseline and PaGKD student, from a folder; ResNet-18 from a .safetensors file directly."""
  backbone = save_tiny_backbone(tmp_path / "weights")
  config = tiny_synthetic_config(tmp_path / "data", stage="teacher")
  config.model.init_from = str(tmp_path / "weights")
  mesh = mesh_lib.make_mesh()
  model = resnet.create_resnet("tiny", 3)
  tx = optimizer.make_optimizer(config.optim, 10, 5)
  state = trainer.initial_state(config, classifier.ClassifierProgram("nbi"), model, tx, mesh)
  _assert_backbone_equal({"params": state.params, "batch_stats": state.batch_stats}, backbone)
  config.model.init_from = ""
  scratch = trainer.initial_state(config, classifier.ClassifierProgram("nbi"), model, tx, mesh)
  np.testing.assert_array_equal(state.params["fc"]["kernel"], scratch.params["fc"]["kernel"])  # Head: random init.
  assert not np.allclose(state.params["conv1"]["kernel"], scratch.params["conv1"]["kernel"])

  config.stage, config.model.init_from = "pagkd", str(tmp_path / "weights")
  state = trainer.initial_state(config, pagkd_method.PaGKDProgram(frozen=()), model, tx, mesh)
  _assert_backbone_equal({"params": state.params["student"], "batch_stats": state.batch_stats["student"]}, backbone)

  torch_state = random_state(RESNET18, seed=2)
  save_file(torch_state, str(tmp_path / "resnet18.safetensors"))
  config.stage, config.model.name = "teacher", "resnet18"
  config.model.init_from = str(tmp_path / "resnet18.safetensors")
  state = trainer.initial_state(config, classifier.ClassifierProgram("nbi"),
                                resnet.create_resnet("resnet18", 3), tx, mesh)
  np.testing.assert_array_equal(state.params["layer3_1"]["conv2"]["kernel"],
                                torch_state["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.batch_stats["bn1"]["var"], torch_state["bn1.running_var"])


@pytest.mark.slow
def test_training_starts_from_the_imported_weights(tmp_path):
  """One real update with learning rate 0: the parameters it was given are the imported ones, untouched."""
  backbone = save_tiny_backbone(tmp_path / "weights")
  config = tiny_synthetic_config(tmp_path / "data", stage="teacher", num_steps=1)
  config.model.init_from = str(tmp_path / "weights")
  config.optim.learning_rate = 0.0
  config.optim.schedule = "constant"
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, str(workdir))
  step, restored = checkpointing.read_latest_state(str(workdir))
  assert step == int(restored["step"]) == 1
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in restored["params"].items() if k != "fc"},
               backbone["params"])
  assert json.loads((workdir / "config.json").read_text())["model"]["init_from"] == str(tmp_path / "weights")
