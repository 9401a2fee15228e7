"""The training state: everything that changes during training and is checkpointed (teachers are not)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: () int32; params / batch_stats: the trained model's variables; opt_state: the optimiser's."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_train_state(variables, tx) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
