"""Pure train and eval steps, written for one device's shard and run under `jax.pmap`.

Static dependencies (modules, optimizer, options) are bound with keyword arguments;
arrays (state, batch, query parameters, per-task arrays) are call arguments, so one
compiled function serves every task.
"""

import dataclasses

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax

from libml import device_preprocess
from libml import optim

AXIS = "batch"
GRAD_CLIP_MODES = ("full", "trainable")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Hashable settings of the train step (the prompt method's are the model's).

  Attributes:
    train_mask: -inf logits for classes outside the current task during training.
    clip_mode: one of GRAD_CLIP_MODES: 'full' (gradients of every parameter) or 'trainable'.
    freeze_part: substrings naming frozen parameters.
    base_lr: peak learning rate.
    min_lr: learning-rate floor after the warm-up.
    schedule: learning-rate schedule name.
    warmup_epochs: warm-up length in epochs.
    l2_coeff: weight of the loss term sum of squared weights (rank >= 2), see optim.l2_loss_coeff.
    freeze_bn_stats: keep a ResNet's BatchNorm running statistics as they are (training still
      normalises with the batch's statistics, as the original).
  """
  train_mask: bool
  clip_mode: str
  freeze_part: tuple[str, ...]
  base_lr: float
  min_lr: float
  schedule: str
  warmup_epochs: float
  l2_coeff: float
  freeze_bn_stats: bool = False

  @classmethod
  def from_config(cls, config, global_batch: int, clip_mode: str | None = None) -> "StepOptions":
    """The options `config` asks for at `global_batch` images per step."""
    return cls(
        train_mask=bool(config.continual.train_mask),
        clip_mode=clip_mode or config.grad_clip_mode,
        freeze_part=tuple(config.freeze_part),
        base_lr=optim.base_learning_rate(config, global_batch),
        min_lr=float(config.min_learning_rate) * global_batch / 256,
        schedule=config.learning_rate_schedule,
        warmup_epochs=float(config.warmup_epochs),
        l2_coeff=optim.l2_loss_coeff(config),
        freeze_bn_stats=bool(config.freeze_bn_stats))


def replicate(tree):
  """Copies `tree` to every local device, sharded the way the pmapped steps return it.

  Using the steps' own axis name keeps the input sharding of the first call equal to that
  of later calls, so the steps compile once. Leaves go through host numpy, which stacks
  without compiling a device op per leaf shape.
  """
  host = jax.tree.map(np.asarray, jax.device_get(tree))
  return flax.jax_utils.replicate(host, axis_name=AXIS)


def device_batches(iterator, size: int = 2):
  """Numpy batches [devices, B, ...] -> device-sharded batches, `size` in flight."""
  return flax.jax_utils.prefetch_to_device(iterator, size, axis_name=AXIS)


def query_features(query_model, query_params, images):
  """[B, H, W, 3] images -> [B, D] class-token pre-logits of the frozen query ViT."""
  _, aux = query_model.apply({"params": query_params}, images, train=False)
  return jax.lax.stop_gradient(aux["pre_logits"])


def _split(params, mask):
  flat = flax.traverse_util.flatten_dict(params)
  flat_mask = flax.traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return trainable, frozen


def _merge(*flat_parts):
  merged = {}
  for part in flat_parts:
    merged.update(part)
  return flax.traverse_util.unflatten_dict(merged)


def _logit_mask(task, batch):
  """The logits training keeps: [num_classes] bool, the task's classes; with replay [B,
  num_classes], the replayed examples' rows from task['replay_mask'] (the original's
  `replay_no_mask` and `replay_reverse_mask`)."""
  if "replayed" not in batch:
    return task["class_mask"]
  return jnp.where(batch["replayed"][:, None], task["replay_mask"], task["class_mask"])


def _cross_entropy(logits, batch):
  """[B] cross-entropy with batch['label']; for mixed images (mixup, cutmix) the weighted sum
  w x CE(label) + (1 - w) x CE(mix_label), the cross-entropy with the mixed target."""
  own = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  if "mix_weight" not in batch:
    return own
  partner = optax.softmax_cross_entropy_with_integer_labels(logits, batch["mix_label"])
  weight = batch["mix_weight"]
  return weight * own + (1.0 - weight) * partner


def train_step(state, batch, query_params, task, rng, *, model, query_model, tx, options: StepOptions,
               preprocess: device_preprocess.DevicePreprocess | None = None):
  """One optimisation step on one device's shard of the batch.

  Args:
    state: TrainState.
    batch: {'image': [B, H, W, 3] float32, 'label': [B] int32}; with `preprocess`, the
      stored images and crops that `DevicePreprocess.train_images` takes; with replay,
      'replayed': [B] bool marks the examples drawn from the rehearsal buffer; with mixup or
      cutmix, 'mix_label' [B] int32 and 'mix_weight' [B] float32 (see `_cross_entropy`).
    query_params: parameters of the frozen query ViT (unused without a query).
    task: {'class_mask': [num_classes] bool, 'steps_per_epoch': float32, 'num_epochs':
      float32, 'method': the prompt method's arrays (`PromptMethod.task_arrays`)} for the
      current task; with replay also 'replay_mask': [num_classes] bool, the logits the
      replayed examples keep.
    rng: PRNG key shared by all devices; folded with the step and device index.

  Returns:
    (new_state, metrics) with metrics averaged over devices: loss, train_accuracy,
    learning_rate, l2_grads (global norm of the gradients that clipping sees) and the scalars
    of the model's aux but 'prompt_loss' (e.g. the prompt pool's reduce_sim).
  """
  images, labels = device_preprocess.train_images(batch, preprocess), batch["label"]
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(AXIS))
  cls_features = query_features(query_model, query_params, images) if model.needs_query else None
  method_task = {**task["method"], "task_step": state.task_step}

  # 'full' differentiates every parameter (the original); 'trainable' only the trainable
  # ones, so no frozen weight gradient is computed and zeros stand in for them.
  if options.clip_mode == "full":
    wrt, to_params = state.params, lambda w: w
  else:
    trainable, frozen = _split(state.params, optim.trainable_mask(state.params, options.freeze_part))
    wrt, to_params = trainable, lambda w: _merge(w, frozen)

  has_stats = bool(state.batch_stats)  # A ResNet's BatchNorm statistics.

  def loss_fn(wrt):
    variables = {"params": to_params(wrt), **({"batch_stats": state.batch_stats} if has_stats else {})}
    out = model.apply(variables, images, cls_features=cls_features, task=method_task, train=True,
                      rngs={"dropout": rng}, mutable=["batch_stats"] if has_stats else False)
    (logits, aux), updated = out if has_stats else (out, {})
    if options.train_mask:
      logits = jnp.where(_logit_mask(task, batch), logits, -jnp.inf)
    loss = _cross_entropy(logits, batch).mean()
    if options.l2_coeff:
      loss = loss + options.l2_coeff * optim.l2_loss(to_params(wrt))
    if "prompt_loss" in aux:  # The method's auxiliary loss, e.g. L2P's pull constraint.
      loss = loss + aux["prompt_loss"]
    scalars = {k: v for k, v in aux.items() if k != "prompt_loss" and jnp.ndim(v) == 0}
    return loss, (logits, scalars, updated.get("batch_stats", {}))

  (loss, (logits, scalars, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(wrt)
  # Each device normalised with its own batch's statistics; the running statistics take their
  # mean over devices, so that every replica holds the same state.
  batch_stats = state.batch_stats if options.freeze_bn_stats else jax.lax.pmean(batch_stats, AXIS)
  if options.clip_mode != "full":
    grads = _merge(grads, {k: jnp.zeros_like(v) for k, v in frozen.items()})
  grads = jax.lax.pmean(grads, AXIS)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  lr = optim.learning_rate_at(state.task_step, base_lr=options.base_lr, min_lr=options.min_lr,
                              schedule=options.schedule, warmup_epochs=options.warmup_epochs,
                              steps_per_epoch=task["steps_per_epoch"], num_epochs=task["num_epochs"])
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
  new_state = state.replace(step=state.step + 1, task_step=state.task_step + 1,
                            params=params, opt_state=opt_state, batch_stats=batch_stats)
  metrics = {
      "loss": loss,
      "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "learning_rate": lr,
      "l2_grads": optax.global_norm(grads),
      **scalars,
  }
  return new_state, jax.lax.pmean(metrics, AXIS)


def eval_step(params, query_params, batch, class_mask, method_task, batch_stats=None, *, model,
              query_model, preprocess: device_preprocess.DevicePreprocess | None = None):
  """Counts on one device's shard of an eval batch, summed over devices.

  Args:
    params: model parameters.
    query_params: query ViT parameters (used when the batch holds no 'cls_features').
    batch: {'image': [B, H, W, 3], 'label': [B], 'mask': [B] bool, optional
      'cls_features': [B, D] precomputed query features}; with `preprocess`, 'image' holds
      the stored images.
    class_mask: [num_classes] bool; logits outside it are -inf (task-incremental
      evaluation), all True otherwise.
    method_task: the prompt method's arrays of the task trained last (`task_arrays`).
    batch_stats: a ResNet's BatchNorm running statistics (None or {} for a ViT).

  Returns:
    {'correct', 'count', 'loss_sum': scalars, 'prompt_counts': [histogram_size] int32 when the
    method selects discrete prompts}.
  """
  images, labels, valid = device_preprocess.eval_images(batch, preprocess), batch["label"], batch["mask"]
  cls_features = batch.get("cls_features")
  if cls_features is None and model.needs_query:
    cls_features = query_features(query_model, query_params, images)
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  logits, aux = model.apply(variables, images, cls_features=cls_features, task=method_task,
                            vote_mask=valid, train=False)
  logits = jnp.where(class_mask, logits, -jnp.inf)
  weights = valid.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  out = {
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
      "count": jnp.sum(weights),
      "loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)),
  }
  size = model.method.histogram_size if model.method is not None else 0
  if size and "prompt_idx" in aux:
    one_hot = jax.nn.one_hot(aux["prompt_idx"], size, dtype=jnp.int32)
    out["prompt_counts"] = jnp.sum(one_hot * valid[:, None, None].astype(jnp.int32), axis=(0, 1))
  return jax.lax.psum(out, AXIS)


def query_step(query_params, batch, *, query_model,
               preprocess: device_preprocess.DevicePreprocess | None = None):
  """Eval batch (as `eval_step` takes it) -> [B, D] query features, for caching eval features."""
  return query_features(query_model, query_params, device_preprocess.eval_images(batch, preprocess))
