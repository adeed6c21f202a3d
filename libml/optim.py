"""Optimizer, frozen-parameter mask, L2 loss term and learning-rate schedule.

The optimizer returns update *directions*; the train step multiplies them by the learning
rate of the current step (`learning_rate_at`). Keeping the schedule out of the optax state
lets one compiled train step serve every task, whatever its length.

`config.optim` and the schedule name are checked once, by `validation.check_config` before a
run starts; here they are assumed valid.
"""

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

# "adam" and "sgd" also add 0.5 x weight_decay x the squared weights to the loss (the
# original's L2 term); "adam" and "adamw" decay weights in the update (decoupled).
OPTIMIZERS = ("adam", "adamw", "sgd")
# Each with the linear warm-up of `warmup_epochs`, as the original.
SCHEDULES = ("constant", "cosine", "linear", "coda_cosine")


def trainable_mask(params: Any, freeze_part: Sequence[str]) -> Any:
  """Pytree of bools like `params`: False where a path contains a `freeze_part` substring.

  The path is the '/'-joined parameter name, e.g. 'Transformer/encoderblock_0/LayerNorm_0/scale'.
  """
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  mask = {k: not any(part in k for part in freeze_part) for k in flat}
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def create_optimizer(config, params: Any) -> optax.GradientTransformation:
  """Clipping, then Adam or Nesterov SGD on the trainable parameters only.

  Clipping sees every gradient passed in: with `grad_clip_mode='full'` that includes the
  frozen backbone's (the original algorithm); with 'trainable' the train step passes zeros
  for frozen parameters, so only trainable gradients count. Frozen parameters get no
  update and no optimizer state. Adam ("adam", "adamw") decays the trainable weights by
  `weight_decay` x the learning rate in each update, as the original's Adam; SGD does not.
  """
  if config.optim == "sgd":
    direction = optax.trace(decay=config.sgd_momentum, nesterov=True)
  else:  # "adam" or "adamw", the other OPTIMIZERS.
    direction = optax.scale_by_adam(b1=0.9, b2=0.999)
    if config.weight_decay:
      direction = optax.chain(direction, optax.add_decayed_weights(config.weight_decay))
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, config.freeze_part))
  parts = [optax.multi_transform({"train": direction, "freeze": optax.set_to_zero()}, labels)]
  if config.grad_clip_max_norm and config.grad_clip_max_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_max_norm))
  return optax.chain(*parts)


def l2_loss_coeff(config) -> float:
  """c of the loss term c x (sum of squares of every weight of rank >= 2, frozen ones too).

  The original adds 0.5 x weight_decay x that sum to the loss unless optim is "adamw", so
  the term also enters the clipped gradient norm.
  """
  return 0.0 if config.optim == "adamw" else 0.5 * float(config.weight_decay)


def l2_loss(params: Any) -> jax.Array:
  """Sum of the squares of every parameter of rank >= 2 (kernels, embeddings, prompts)."""
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params) if x.ndim > 1)


def base_learning_rate(config, global_batch_size: int) -> float:
  """`learning_rate` scaled linearly by global batch / 256, as the original."""
  return config.learning_rate * global_batch_size / 256


def learning_rate_at(step, *, base_lr: float, min_lr: float, schedule: str, warmup_epochs: float,
                     steps_per_epoch, num_epochs):
  """Learning rate after `step` steps of the current task, as the original's schedule; traceable.

  The original counts a task's steps from 1 and measures them in epochs: e = (step + 1) /
  steps_per_epoch. The decay ('cosine': half a cosine, 'linear': a ramp, 'constant': none)
  runs over [warmup_epochs, num_epochs]; the rate is scaled by min(1, e / warmup_epochs)
  and, once warm, never goes below `min_lr`. 'coda_cosine' is CODA-Prompt's official
  schedule: constant within an epoch, base x cos(0.99 x pi / 2 x i / (num_epochs - 1)) in
  epoch i = 0, 1, ..., a quarter cosine that ends near, not at, zero.

  Args:
    step: int scalar array, steps already taken in this task.
    base_lr: peak learning rate.
    min_lr: floor after the warm-up.
    schedule: one of SCHEDULES.
    warmup_epochs: warm-up length in epochs (0: none).
    steps_per_epoch: float scalar, the task's steps per epoch.
    num_epochs: float scalar, the task's steps / steps_per_epoch.
  """
  epoch = (jnp.asarray(step, jnp.float32) + 1.0) / jnp.asarray(steps_per_epoch, jnp.float32)
  ratio = jnp.maximum(0.0, (epoch - warmup_epochs) / (jnp.asarray(num_epochs, jnp.float32) - warmup_epochs))
  lr = jnp.asarray(base_lr, jnp.float32)
  if schedule == "cosine":
    lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))
  elif schedule == "linear":
    lr = lr * (1.0 - ratio)
  elif schedule == "coda_cosine":
    index = jnp.floor(jnp.asarray(step, jnp.float32) / jnp.asarray(steps_per_epoch, jnp.float32))
    last = jnp.maximum(jnp.asarray(num_epochs, jnp.float32) - 1.0, 1.0)
    lr = lr * jnp.cos(0.99 * jnp.pi / 2 * index / last)
  warm = jnp.minimum(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else jnp.ones(())
  return jnp.where(warm < 1.0, lr * warm, jnp.maximum(lr * warm, min_lr))
