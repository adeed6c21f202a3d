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
    params: the PromptedViT parameters.
    opt_state: optax state of `create_optimizer`'s transformation.
  """
  step: jnp.ndarray
  task_step: jnp.ndarray
  params: Any
  opt_state: Any


def create(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), task_step=jnp.zeros((), jnp.int32),
                    params=params, opt_state=tx.init(params))


def start_task(state: TrainState, tx: optax.GradientTransformation, *, reinit_optimizer: bool) -> TrainState:
  """State at the start of a new task: task_step 0, fresh optimizer state if asked."""
  opt_state = tx.init(state.params) if reinit_optimizer else state.opt_state
  return state.replace(task_step=jnp.zeros((), jnp.int32), opt_state=opt_state)


def transfer_prompt_slots(params: Any, task: int, top_k: int, *, copy_prompt: bool, copy_key: bool) -> Any:
  """DualPrompt's shared pool: task t's prompt slots start from task t - 1's.

  Slots of task t are pool indices [t * top_k, (t + 1) * top_k) on axis 0 of
  `e_prompt/prompt` and `e_prompt/key`.

  Args:
    params: parameter tree holding `e_prompt`.
    task: the task about to start (> 0).
    top_k: prompts per task.
    copy_prompt: copy the prompts (`shared_prompt_pool`).
    copy_key: copy the keys (`shared_prompt_key`).
  """
  if task <= 0 or "e_prompt" not in params:
    return params
  new, old = slice(task * top_k, (task + 1) * top_k), slice((task - 1) * top_k, task * top_k)
  e_prompt = dict(params["e_prompt"])
  for name, enabled in (("prompt", copy_prompt), ("key", copy_key)):
    if enabled and name in e_prompt and new.stop <= e_prompt[name].shape[0]:
      e_prompt[name] = jnp.asarray(e_prompt[name]).at[new].set(jnp.asarray(e_prompt[name])[old])
  return {**params, "e_prompt": e_prompt}


def host_copy(tree: Any) -> Any:
  """A numpy copy of a (device) pytree."""
  return jax.tree.map(np.asarray, jax.device_get(tree))
