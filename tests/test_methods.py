"""L2P and DualPrompt behind the method seam: per-task arrays, forced slots, start of task, loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.methods import base
from models.methods import dualprompt
from models.methods import l2p
from tests import model_util

DIMS = base.Dims(num_layers=2, hidden_size=8, num_heads=2)


class _Host(nn.Module):
  """Runs a method's `prompts` inside a compact call, as PromptedViT does."""
  method: base.PromptMethod

  @nn.compact
  def __call__(self, x_embed, cls_features, task, train):
    return self.method.prompts(x_embed, cls_features, task, None, train, DIMS)


def _pool(**fields) -> l2p.L2P:
  return model_util.method(use_e_prompt=True, e_prompt_layers=(0,), pool_size=6, prompt_length=2,
                           top_k=2, **fields)


def test_task_arrays_give_each_task_its_slots_and_forcing_steps():
  masked = _pool(use_prompt_mask=True)
  arrays = masked.task_arrays(1, steps_per_epoch=5, num_steps=20)
  np.testing.assert_array_equal(arrays['prompt_ids'], [2, 3])
  assert arrays['mask_steps'] == 20
  first_epoch = dataclasses.replace(masked, mask_first_epoch=True)
  assert first_epoch.task_arrays(1, steps_per_epoch=5, num_steps=20)['mask_steps'] == 5
  assert _pool().task_arrays(1, steps_per_epoch=5, num_steps=20)['mask_steps'] == 0


def test_slots_beyond_the_pool_fall_back_to_key_matching(caplog):
  with caplog.at_level('WARNING'):
    arrays = _pool(use_prompt_mask=True).task_arrays(3, steps_per_epoch=5, num_steps=20)
  assert arrays['mask_steps'] == 0
  assert any('prompt ids 6..7 are outside pool_size=6' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('task_step,train,forced', [(0, True, True), (4, True, True), (5, True, False),
                                                    (0, False, False)])
def test_slots_are_forced_while_task_step_is_below_mask_steps(task_step, train, forced):
  method = _pool(use_prompt_mask=True)
  rng = np.random.default_rng(0)
  x_embed = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  task = {'prompt_ids': np.array([4, 5], np.int32), 'mask_steps': np.int32(5),
          'task_step': np.int32(task_step)}
  host = _Host(method)
  params = host.init(jax.random.PRNGKey(0), x_embed, queries, task, False)
  # Keys equal to the queries of images 0, 1, 2 and two others: key matching picks none of 4, 5
  # first for image 0.
  keys = np.asarray(rng.normal(size=(6, 8)), np.float32)
  keys[0] = queries[0]
  params = {'params': {'e_prompt': {**params['params']['e_prompt'], 'key': keys}}}
  out = host.apply(params, x_embed, queries, task, train)
  matched = host.apply(params, x_embed, queries, {**task, 'mask_steps': np.int32(0)}, train)
  assert matched.aux['prompt_idx'][0, 0] == 0
  if forced:
    np.testing.assert_array_equal(out.aux['prompt_idx'], [[4, 5]] * 3)
  else:
    np.testing.assert_array_equal(out.aux['prompt_idx'], matched.aux['prompt_idx'])


def test_pull_loss_is_minus_coeff_times_reduce_sim():
  rng = np.random.default_rng(1)
  x_embed = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  pulled = _Host(_pool(pull_coeff=0.5))
  params = pulled.init(jax.random.PRNGKey(0), x_embed, queries, None, True)
  out = pulled.apply(params, x_embed, queries, None, True)
  assert float(out.aux['reduce_sim']) > 0.01
  np.testing.assert_allclose(out.loss, -0.5 * out.aux['reduce_sim'], rtol=1e-6)
  assert _Host(_pool()).apply(params, x_embed, queries, None, True).loss is None


def test_shared_pool_starts_a_task_from_the_previous_tasks_slots():
  prompt = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)
  key = jnp.arange(6 * 3, dtype=jnp.float32).reshape(6, 3)
  params = {'e_prompt': {'prompt': prompt, 'key': key}, 'head': {'bias': jnp.zeros(2)}}
  out = _pool(shared_prompt_pool=True).start_task(params, 2, seed=0)
  expected = np.asarray(prompt).copy()
  expected[4:6] = expected[2:4]
  np.testing.assert_array_equal(out['e_prompt']['prompt'], expected)
  np.testing.assert_array_equal(out['e_prompt']['key'], key)
  keys_too = _pool(shared_prompt_pool=True, shared_prompt_key=True).start_task(params, 1, seed=0)
  np.testing.assert_array_equal(keys_too['e_prompt']['key'][2:4], key[0:2])
  for unchanged in (_pool(shared_prompt_pool=True).start_task(params, 0, seed=0),
                    _pool().start_task(params, 2, seed=0)):
    np.testing.assert_array_equal(unchanged['e_prompt']['prompt'], prompt)


def test_dualprompt_puts_the_g_prompt_first_and_counts_tokens():
  method = model_util.method(use_g_prompt=True, use_e_prompt=True, g_prompt_layers=(0,),
                             g_prompt_prefix=False, g_prompt_length=3, e_prompt_layers=(0, 1),
                             pool_size=4, prompt_length=2, top_k=1)
  assert isinstance(method, dualprompt.DualPrompt) and method.prompt_tokens == 3 + 2 * 2
  rng = np.random.default_rng(2)
  x_embed = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  queries = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
  host = _Host(method)
  params = host.init(jax.random.PRNGKey(0), x_embed, queries, None, False)
  out = host.apply(params, x_embed, queries, None, False)
  g = np.asarray(params['params']['g_prompt']['prompt']).reshape(1, 3, 8)  # one layer: stored [3, D]
  assert out.tokens[0].shape == (2, 5, 8) and out.tokens[1].shape == (2, 2, 8)
  np.testing.assert_array_equal(out.tokens[0][:, :3], np.broadcast_to(g[0], (2, 3, 8)))
  assert out.prefixes == (None, None)
  g_only = dataclasses.replace(method, use_e_prompt=False)
  assert not g_only.needs_query and g_only.histogram_size == 0 and g_only.prompt_tokens == 3
