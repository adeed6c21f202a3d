"""Train state and the host-side edits made to it between tasks."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config.

  Attributes:
    step: global number of train steps taken, over all tasks (the TensorBoard x axis).
    task_step: train steps taken in the current task (drives the learning-rate schedule).
    params: the model's parameters.
    opt_state: optax state of `create_optimizer`'s transformation.
    batch_stats: BatchNorm running statistics of a ResNet backbone ({} for a ViT).
  """
  step: jnp.ndarray
  task_step: jnp.ndarray
  params: Any
  opt_state: Any
  batch_stats: Any


def create(params: Any, tx: optax.GradientTransformation, batch_stats: Any = None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), task_step=jnp.zeros((), jnp.int32),
                    params=params, opt_state=tx.init(params), batch_stats=batch_stats or {})


def start_task(state: TrainState, tx: optax.GradientTransformation, *, reinit_optimizer: bool) -> TrainState:
  """State at the start of a new task: task_step 0, fresh optimizer state if asked."""
  opt_state = tx.init(state.params) if reinit_optimizer else state.opt_state
  return state.replace(task_step=jnp.zeros((), jnp.int32), opt_state=opt_state)


def host_copy(tree: Any) -> Any:
  """A numpy copy of a (device) pytree."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
