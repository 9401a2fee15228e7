"""One `("data",)` mesh over every device of every process; parameters replicated, batches sharded.

`jax.jit` over this mesh is the data parallelism (pmap is in maintenance mode). Class-group batches
(C, K, H, W, 3) are sharded along K, so every device holds K / D images of every class; evaluation batches
(B, H, W, 3) along B.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh named "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axis types: the (C, K) -> (C * K) group reshapes need sharding propagation, which the Explicit
  # default rejects.
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def group_batch_sharding(mesh) -> NamedSharding:
  """(C, K, ...) class-group arrays: K split over devices."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def eval_batch_sharding(mesh) -> NamedSharding:
  """(B, ...) evaluation arrays: B split over devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(what: str, size: int, mesh) -> None:
  n = mesh.devices.size
  if size % n:
    raise ValueError(f"{what} = {size} must be a multiple of the number of devices ({n}): every device gets an "
                     f"equal share. Change {what} or run on a divisible number of devices.")


def global_array(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
  """Assembles a global array from this process's share (the whole array in a single-process run)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(global_shape))
