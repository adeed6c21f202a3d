"""Train step, optimizer and train-state edits, on a fake model with the real parameter names."""

import functools

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from libml import optim
from libml import steps
from libml import train_state

NUM_CLASSES = 6


class FakeModel(nn.Module):
  """Linear model whose parameters are named like PromptedViT's (embedding frozen, head trained)."""
  use_frozen: bool = True

  @nn.compact
  def __call__(self, images, cls_features=None, prompt_mask=None, vote_mask=None, train=False):
    x = images.reshape(images.shape[0], -1)
    h = nn.Dense(4, name="embedding")(x) if self.use_frozen else x[:, :4]
    prompt = self.param("e_prompt", nn.initializers.normal(1.0), (4,))  # trainable, in the loss
    h = h + prompt
    logits = nn.Dense(NUM_CLASSES, name="head")(h)
    return logits, {"pre_logits": h, "reduce_sim": jnp.sum(prompt) * 0.0}


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(optim="adam", sgd_momentum=0.9, weight_decay=0.0, grad_clip_max_norm=1.0,
                                     freeze_part=("encoder", "embedding", "cls"), learning_rate=0.1))
  c.update(overrides)
  return c


def _options(**kw):
  base = dict(needs_query=False, pull_coeff=0.0, train_mask=True, clip_mode="full", freeze_part=("embedding",),
              base_lr=0.1, schedule="constant", pool_size=0, use_prompt_mask=False)
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
  task = steps.replicate({"class_mask": class_mask, "prompt_ids": np.zeros([1], np.int32),
                                   "total_steps": np.int32(10), "warmup_steps": np.int32(0)})
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


def test_trainable_clipping_equals_full_when_frozen_gradients_are_zero():
  # The frozen 'embedding' is unused, so its gradients are zero and both modes agree.
  model = FakeModel(use_frozen=False)
  _, full, mf = _run(model, _options(clip_mode="full"), _config(grad_clip_max_norm=0.01))
  _, trainable, mt = _run(model, _options(clip_mode="trainable"), _config(grad_clip_max_norm=0.01))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full.params, trainable.params)
  np.testing.assert_allclose(mf["l2_grads"], mt["l2_grads"], rtol=1e-6)


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


def test_learning_rate_schedules():
  at = functools.partial(optim.learning_rate_at, base_lr=1.0, warmup_steps=10, total_steps=110)
  assert float(at(50, schedule="constant")) == 1.0
  assert float(at(0, schedule="cosine")) == pytest.approx(1.0)
  assert float(at(55, schedule="cosine")) == pytest.approx(0.5)
  assert float(at(4, schedule="warmup_constant")) == pytest.approx(0.5)
  assert float(at(60, schedule="warmup_cosine")) == pytest.approx(0.5)
  assert optim.base_learning_rate(ml_collections.ConfigDict({"learning_rate": 0.03}), 128) == pytest.approx(0.015)


def test_shared_prompt_pool_transfer():
  prompt = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)
  key = jnp.arange(6 * 3, dtype=jnp.float32).reshape(6, 3)
  params = {"e_prompt": {"prompt": prompt, "key": key}, "head": {"bias": jnp.zeros(2)}}
  out = train_state.transfer_prompt_slots(params, task=2, top_k=2, copy_prompt=True, copy_key=False)
  expected = np.asarray(prompt).copy()
  expected[4:6] = expected[2:4]
  np.testing.assert_array_equal(out["e_prompt"]["prompt"], expected)
  np.testing.assert_array_equal(out["e_prompt"]["key"], key)
  same = train_state.transfer_prompt_slots(params, task=0, top_k=2, copy_prompt=True, copy_key=True)
  np.testing.assert_array_equal(same["e_prompt"]["prompt"], prompt)
