"""Optimizer, frozen-parameter mask and learning-rate schedule.

The optimizer returns update *directions*; the train step multiplies them by the learning
rate of the current step (`learning_rate_at`). Keeping the schedule out of the optax state
lets one compiled train step serve every task, whatever its length.
"""

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from libml.errors import UserError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_constant", "warmup_cosine")


def trainable_mask(params: Any, freeze_part: Sequence[str]) -> Any:
  """Pytree of bools like `params`: False where a path contains a `freeze_part` substring.

  The path is the '/'-joined parameter name, e.g. 'Transformer/encoderblock_0/LayerNorm_0/scale'.
  """
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  mask = {k: not any(part in k for part in freeze_part) for k in flat}
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def create_optimizer(config, params: Any) -> optax.GradientTransformation:
  """Clipping, then Adam/AdamW or Nesterov SGD on the trainable parameters only.

  Clipping sees every gradient passed in: with `grad_clip_mode='full'` that includes the
  frozen backbone's (the original algorithm); with 'trainable' the train step passes zeros
  for frozen parameters, so only trainable gradients count. Frozen parameters get no
  update and no optimizer state.
  """
  if config.optim == "adam":
    direction = optax.scale_by_adam(b1=0.9, b2=0.999)
  elif config.optim == "sgd":
    direction = optax.trace(decay=config.sgd_momentum, nesterov=True)
  else:
    raise UserError(f"Unknown optim {config.optim!r}: use one of {', '.join(OPTIMIZERS)}.")
  if config.weight_decay:
    direction = optax.chain(direction, optax.add_decayed_weights(config.weight_decay))
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, config.freeze_part))
  parts = [optax.multi_transform({"train": direction, "freeze": optax.set_to_zero()}, labels)]
  if config.grad_clip_max_norm and config.grad_clip_max_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_max_norm))
  return optax.chain(*parts)


def base_learning_rate(config, global_batch_size: int) -> float:
  """`learning_rate` scaled linearly by global batch / 256, as the original."""
  return config.learning_rate * global_batch_size / 256


def learning_rate_at(step, *, base_lr: float, schedule: str, warmup_steps, total_steps):
  """Learning rate at `step` (0-based, within the current task); jnp-traceable.

  Args:
    step: int scalar array, steps already taken in this task.
    base_lr: peak learning rate.
    schedule: one of SCHEDULES.
    warmup_steps: int scalar, linear warm-up length (used by the 'warmup_*' schedules).
    total_steps: int scalar, the task's number of steps (cosine decays to 0 over it).
  """
  if schedule not in SCHEDULES:
    raise UserError(f"Unknown learning_rate_schedule {schedule!r}; valid: {', '.join(SCHEDULES)}.")
  step = jnp.asarray(step, jnp.float32)
  warmup = jnp.maximum(jnp.asarray(warmup_steps, jnp.float32), 0.0) if schedule.startswith("warmup") else 0.0
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  lr = jnp.asarray(base_lr, jnp.float32)
  if schedule.endswith("cosine"):
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  if schedule.startswith("warmup"):
    lr = lr * jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup, 1.0))
  return lr
