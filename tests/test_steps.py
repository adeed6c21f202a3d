"""Train step, optimizer and train-state edits, on a fake model with the real parameter names."""

import functools

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from libml import optim
from libml import steps
from libml import train_state

NUM_CLASSES = 6


class FakeModel(nn.Module):
  """Linear model whose parameters are named like PromptedViT's (embedding frozen, head trained)."""
  use_frozen: bool = True
  needs_query = False  # As PromptedViT's properties for a model without a query or method.
  method = None

  @nn.compact
  def __call__(self, images, cls_features=None, task=None, vote_mask=None, train=False):
    x = images.reshape(images.shape[0], -1)
    h = nn.Dense(4, name="embedding")(x) if self.use_frozen else x[:, :4]
    prompt = self.param("e_prompt", nn.initializers.normal(1.0), (4,))  # trainable, in the loss
    h = h + prompt
    logits = nn.Dense(NUM_CLASSES, name="head")(h)
    return logits, {"pre_logits": h, "reduce_sim": jnp.sum(prompt) * 0.0}


def _config(**overrides):
  """The base config's optimizer (Adam, clipping at norm 1, no weight decay) at rate 0.1."""
  c = common.get_base_config()
  c.learning_rate = 0.1
  c.update(overrides)
  return c


def _options(**kw):
  base = dict(train_mask=True, clip_mode="full", freeze_part=("embedding",), base_lr=0.1, min_lr=0.0,
              schedule="constant", warmup_epochs=0.0, l2_coeff=0.0)
  base.update(kw)
  return steps.StepOptions(**base)


def _run(model, options, config, num_steps=3, class_ids=(2, 3)):
  rng = jax.random.PRNGKey(0)
  images = jax.random.normal(rng, (2, 4, 2, 2, 3))  # [devices, B, H, W, C]
  labels = np.array([[2, 3, 2, 3], [3, 2, 3, 2]], np.int32)
  params = model.init(rng, images[0])["params"]
  tx = optim.create_optimizer(config, params)
  state = steps.replicate(train_state.create(params, tx))
  class_mask = np.zeros([NUM_CLASSES], bool)
  class_mask[list(class_ids)] = True
  task = steps.replicate({"class_mask": class_mask, "method": {}, "steps_per_epoch": np.float32(5),
                          "num_epochs": np.float32(2)})
  step = jax.pmap(functools.partial(steps.train_step, model=model, query_model=model, tx=tx, options=options),
                  axis_name=steps.AXIS)
  for _ in range(num_steps):
    state, metrics = step(state, {"image": images, "label": labels}, steps.replicate({}), task,
                          steps.replicate(rng))
  return params, flax.jax_utils.unreplicate(state), flax.jax_utils.unreplicate(metrics)


@pytest.mark.parametrize("clip_mode", ["full", "trainable"])
def test_frozen_parameters_stay_bit_identical(clip_mode):
  params, state, _ = _run(FakeModel(), _options(clip_mode=clip_mode), _config())
  np.testing.assert_array_equal(state.params["embedding"]["kernel"], params["embedding"]["kernel"])
  np.testing.assert_array_equal(state.params["embedding"]["bias"], params["embedding"]["bias"])
  assert not np.allclose(state.params["e_prompt"], params["e_prompt"])
  assert int(state.step) == 3 and int(state.task_step) == 3


def test_train_mask_leaves_other_classes_untouched():
  params, state, metrics = _run(FakeModel(), _options(), _config(), class_ids=(2, 3))
  bias0, bias1 = np.asarray(params["head"]["bias"]), np.asarray(state.params["head"]["bias"])
  outside = [0, 1, 4, 5]
  np.testing.assert_array_equal(bias1[outside], bias0[outside])
  assert not np.allclose(bias1[[2, 3]], bias0[[2, 3]])
  assert np.isfinite(metrics["loss"])


def test_without_train_mask_other_classes_move():
  params, state, _ = _run(FakeModel(), _options(train_mask=False), _config())
  assert not np.allclose(state.params["head"]["bias"][0], params["head"]["bias"][0])


def _batch():
  """The batch `_run` trains on, all devices together: images [8, 2, 2, 3], labels [8]."""
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 2, 2, 3))
  labels = np.array([[2, 3, 2, 3], [3, 2, 3, 2]], np.int32)
  return np.asarray(images).reshape(8, 2, 2, 3), labels.reshape(8)


def _masked_ce(logits, labels, class_ids=(2, 3)):
  """Mean softmax cross-entropy over the classes `class_ids` only (the train mask), in NumPy."""
  logits = np.asarray(logits, np.float64)[:, list(class_ids)]
  targets = np.searchsorted(np.asarray(class_ids), labels)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(log_z - logits[np.arange(len(labels)), targets]))


def _reference_grads(model, params):
  """Gradients of the train-masked cross-entropy over the whole batch, by jax.grad of a loss written here."""
  images, labels = _batch()
  class_mask = np.isin(np.arange(NUM_CLASSES), [2, 3])

  def loss(p):
    logits, _ = model.apply({"params": p}, images)
    logits = jnp.where(class_mask, logits, -1e30)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(log_probs[jnp.arange(len(labels)), labels])

  return jax.tree.map(np.asarray, jax.grad(loss)(params))


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize("active", [True, False])
def test_trainable_clipping_clips_by_the_trainable_norm_and_full_by_the_whole_norm(active):
  # Plain SGD (momentum 0) so that one step moves every parameter by exactly -lr * clipped gradient.
  model = FakeModel(use_frozen=True)
  params = model.init(jax.random.PRNGKey(0), _batch()[0][:4])["params"]
  grads = _reference_grads(model, params)
  trainable_grads = {k: v for k, v in grads.items() if k != "embedding"}
  norm_all, norm_trainable = _norm(grads), _norm(trainable_grads)
  assert norm_all > 1.5 * norm_trainable > 0  # the frozen embedding's gradients weigh
  max_norm = 0.5 * norm_trainable if active else 10.0 * norm_all
  config = _config(optim="sgd", sgd_momentum=0.0, grad_clip_max_norm=max_norm)
  results = {mode: _run(model, _options(clip_mode=mode), config, num_steps=1) for mode in ("full", "trainable")}
  jax.tree.map(np.testing.assert_array_equal, results["full"][0], params)  # _run starts from `params`
  for mode, norm in (("full", norm_all), ("trainable", norm_trainable)):
    _, state, metrics = results[mode]
    lr = float(metrics["learning_rate"])
    scale = min(1.0, max_norm / norm)
    for name in ("head", "e_prompt"):
      expected = jax.tree.map(lambda p, g: np.asarray(p) - lr * scale * g, params[name], grads[name])
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                   state.params[name], expected)
    np.testing.assert_allclose(metrics["l2_grads"], norm, rtol=1e-5)
  full, trainable = results["full"][1].params, results["trainable"][1].params
  if active:  # Clipped by different norms: different steps.
    assert not np.allclose(full["head"]["kernel"], trainable["head"]["kernel"], rtol=1e-4, atol=0)
  else:  # Unclipped: the same step.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full, trainable)


def test_sgd_is_nesterov_momentum():
  # flax.optim.Momentum(beta, nesterov=True): v = beta * v + g; p -= lr * (beta * v + g).
  beta = 0.9
  model = FakeModel(use_frozen=True)
  config = _config(optim="sgd", sgd_momentum=beta, grad_clip_max_norm=0.0)
  params = model.init(jax.random.PRNGKey(0), _batch()[0][:4])["params"]
  _, state, metrics = _run(model, _options(), config, num_steps=3)
  lr = float(metrics["learning_rate"])  # constant schedule
  expected = jax.tree.map(np.asarray, params)
  velocity = jax.tree.map(np.zeros_like, expected)
  for _ in range(3):
    grads = _reference_grads(model, expected)
    velocity = jax.tree.map(lambda v, g: beta * v + g, velocity, grads)
    for name in ("head", "e_prompt"):  # the frozen embedding does not move
      expected[name] = jax.tree.map(lambda p, v, g: p - lr * (beta * v + g), expected[name], velocity[name],
                                    grads[name])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, expected)


class PullModel(nn.Module):
  """FakeModel plus a trainable key whose similarity to the batch's mean feature is `reduce_sim`;
  its auxiliary loss is L2P's pull constraint, -coeff x reduce_sim."""
  coeff: float
  needs_query = False
  method = None

  @nn.compact
  def __call__(self, images, cls_features=None, task=None, vote_mask=None, train=False):
    h = nn.Dense(4, name="embedding")(images.reshape(images.shape[0], -1))
    key = self.param("e_prompt", nn.initializers.normal(1.0), (4,))
    logits = nn.Dense(NUM_CLASSES, name="head")(h)
    reduce_sim = jnp.sum(key * jnp.mean(h, 0))
    return logits, {"pre_logits": h, "reduce_sim": reduce_sim, "prompt_loss": -self.coeff * reduce_sim}


def test_the_models_prompt_loss_is_added_and_its_scalars_logged():
  coeff = 0.7
  model = PullModel(coeff)
  params, state, metrics = _run(model, _options(clip_mode="trainable"), _config(grad_clip_max_norm=0.0),
                                num_steps=1)
  assert "prompt_loss" not in metrics  # Added to the loss, not logged on its own.
  # Loss and reduce_sim of each device's half of the batch at the initial parameters, then averaged.
  images, labels = _batch()
  losses, sims = [], []
  for half in (slice(0, 4), slice(4, 8)):
    logits, aux = model.apply({"params": params}, images[half])
    sims.append(float(aux["reduce_sim"]))
    losses.append(_masked_ce(logits, labels[half]) - coeff * sims[-1])
  assert abs(np.mean(sims)) > 0.1  # the term weighs
  np.testing.assert_allclose(metrics["reduce_sim"], np.mean(sims), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
  # d(loss)/d(key) = -coeff * mean feature: Adam's first step moves the key by lr * sign(mean feature),
  # raising the similarity.
  features = np.stack([np.asarray(model.apply({"params": params}, images[h])[1]["pre_logits"]).mean(0)
                       for h in (slice(0, 4), slice(4, 8))]).mean(0)
  lr = float(metrics["learning_rate"])
  np.testing.assert_allclose(state.params["e_prompt"] - params["e_prompt"], lr * np.sign(features), rtol=1e-3)


def test_clipping_modes_differ_when_frozen_gradients_are_not_zero():
  model = FakeModel(use_frozen=True)
  _, full, mf = _run(model, _options(clip_mode="full"), _config(grad_clip_max_norm=0.01))
  _, trainable, mt = _run(model, _options(clip_mode="trainable"), _config(grad_clip_max_norm=0.01))
  assert mf["l2_grads"] > mt["l2_grads"]
  assert not np.allclose(full.params["head"]["kernel"], trainable.params["head"]["kernel"])


def test_optimizer_reset_at_task_start():
  model = FakeModel()
  params, state, _ = _run(model, _options(), _config())
  tx = optim.create_optimizer(_config(), params)
  fresh = tx.init(state.params)
  reset = train_state.start_task(state, tx, reinit_optimizer=True)
  kept = train_state.start_task(state, tx, reinit_optimizer=False)
  jax.tree.map(np.testing.assert_array_equal, reset.opt_state, fresh)
  jax.tree.map(np.testing.assert_array_equal, kept.opt_state, state.opt_state)
  assert int(reset.task_step) == 0 and int(reset.step) == int(state.step)
  leaves = [np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(leaves) > 0  # there was state to reset


def test_trainable_mask_is_a_substring_match():
  params = {"Transformer": {"encoderblock_0": {"a": 0}, "posembed_input": {"pos_embedding": 0}},
            "cls": 0, "embedding": {"kernel": 0}, "e_prompt": {"prompt": 0, "key": 0}, "head": {"kernel": 0}}
  mask = optim.trainable_mask(params, ("encoder", "embedding", "cls"))
  assert mask["Transformer"]["encoderblock_0"]["a"] is False
  assert mask["Transformer"]["posembed_input"]["pos_embedding"] is False
  assert mask["cls"] is False and mask["embedding"]["kernel"] is False
  assert mask["e_prompt"]["prompt"] and mask["e_prompt"]["key"] and mask["head"]["kernel"]


def test_learning_rate_schedules_as_the_original():
  # 10 steps per epoch, 5 epochs; the original counts steps from 1 and measures in epochs.
  at = functools.partial(optim.learning_rate_at, base_lr=1.0, min_lr=0.0, steps_per_epoch=10.0,
                         num_epochs=5.0)
  assert float(at(49, schedule="constant", warmup_epochs=0.0)) == 1.0
  # Cosine without warm-up: step 1 of 50 is already 1/50 of the way down.
  assert float(at(0, schedule="cosine", warmup_epochs=0.0)) == pytest.approx(0.5 * (1 + np.cos(np.pi / 50)))
  assert float(at(24, schedule="cosine", warmup_epochs=0.0)) == pytest.approx(0.5)
  assert float(at(49, schedule="cosine", warmup_epochs=0.0)) == pytest.approx(0.0, abs=1e-7)
  assert float(at(24, schedule="linear", warmup_epochs=0.0)) == pytest.approx(0.5)
  # One warm-up epoch: step 5 is half-way up, for every schedule (constant included);
  # the decay then runs over epochs 1..5: epoch 3 is half-way down.
  for schedule in optim.SCHEDULES:
    assert float(at(4, schedule=schedule, warmup_epochs=1.0)) == pytest.approx(0.5)
  assert float(at(29, schedule="cosine", warmup_epochs=1.0)) == pytest.approx(0.5)
  assert float(at(29, schedule="linear", warmup_epochs=1.0)) == pytest.approx(0.5)
  # min_learning_rate floors the rate once warm, not during the warm-up.
  assert float(at(49, schedule="linear", warmup_epochs=1.0, min_lr=0.1)) == pytest.approx(0.1)
  assert float(at(0, schedule="linear", warmup_epochs=1.0, min_lr=0.5)) == pytest.approx(0.1)
  assert optim.base_learning_rate(_config(learning_rate=0.03), 128) == pytest.approx(0.015)
  # CODA-Prompt's per-epoch schedule, GT-RIPL/CODA-Prompt utils/schedulers.py: in epoch e of K,
  # base x cos(99 pi e / (200 (K - 1))).
  for step, epoch in ((0, 0), (9, 0), (10, 1), (29, 2), (49, 4)):
    want = np.cos(99 * np.pi * epoch / (200 * (5 - 1)))
    assert float(at(step, schedule="coda_cosine", warmup_epochs=0.0)) == pytest.approx(want, abs=1e-6), step


def test_l2_loss_term_counts_every_weight_of_rank_two_or_more():
  params = {"frozen": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 5.0)},
            "prompt": jnp.ones((2, 2, 2))}
  assert float(optim.l2_loss(params)) == 6 * 4.0 + 8 * 1.0  # biases (rank 1) are left out
  coeff = lambda name: optim.l2_loss_coeff(_config(optim=name, weight_decay=0.01))
  assert coeff("adam") == coeff("sgd") == 0.005 and coeff("adamw") == 0.0


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_weight_decay_as_the_original(name):
  # "adam"/"sgd": + 0.5 wd sum(w^2) over rank >= 2 weights (the frozen embedding too) in the
  # loss and so in the gradient; "adam"/"adamw": p -= lr * wd * p in the update.
  wd = 0.01
  model = FakeModel(use_frozen=True)
  config = _config(optim=name, sgd_momentum=0.0, weight_decay=wd, grad_clip_max_norm=0.0)
  params, state, metrics = _run(model, _options(l2_coeff=optim.l2_loss_coeff(config)), config, num_steps=1)
  images, labels = _batch()
  in_loss = name != "adamw"
  sq = sum(float(np.sum(np.square(params[k]["kernel"], dtype=np.float64))) for k in ("embedding", "head"))
  ce = np.mean([_masked_ce(model.apply({"params": params}, images[h])[0], labels[h])
                for h in (slice(0, 4), slice(4, 8))])
  np.testing.assert_allclose(metrics["loss"], ce + (0.5 * wd * sq if in_loss else 0.0), rtol=1e-5)
  lr = float(metrics["learning_rate"])
  g = _reference_grads(model, params)["head"]["kernel"] + (wd * np.asarray(params["head"]["kernel"]) if in_loss else 0)
  p = np.asarray(params["head"]["kernel"])
  if name == "sgd":
    expected = p - lr * g
  else:  # Adam's first step: m / (sqrt(v) + eps) = g / (|g| + eps).
    expected = p - lr * (g / (np.abs(g) + 1e-8) + wd * p)
  np.testing.assert_allclose(state.params["head"]["kernel"], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(state.params["embedding"]["kernel"], params["embedding"]["kernel"])
