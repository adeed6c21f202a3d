"""Tests of prompt selection, the majority vote and per-sample gathering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import prompt

D, POOL, LENGTH = 4, 6, 2

majority_vote = jax.jit(prompt.majority_vote,
                        static_argnames=('pool_size', 'group_size'))


def _keys():
  """Six distinct directions in 4-d: +-e0, +-e1, e2, e3."""
  eye = np.eye(D, dtype=np.float32)
  return np.stack([eye[0], -eye[0], eye[1], -eye[1], eye[2], eye[3]])


def _pool(**kwargs):
  fields = dict(pool_size=POOL, length=LENGTH, top_k=2)
  fields.update(kwargs)
  return prompt.PromptPool(**fields)


def _select(pool, query, train=False, **kwargs):
  """Runs `pool` with its keys set to `_keys()`, scaled to show normalising."""
  x_embed = jnp.zeros((query.shape[0], 3, D))
  params = {'prompt': jnp.zeros((POOL, LENGTH, D)),
            'key': jnp.asarray(_keys()) * 3.0}
  apply = jax.jit(pool.apply, static_argnames='train')
  return apply({'params': params}, x_embed, query, train=train, **kwargs)


def test_top_k_follows_cosine_similarity():
  rng = np.random.default_rng(0)
  query = rng.normal(size=(5, D)).astype(np.float32) * 7.0
  out = _select(_pool(top_k=3), jnp.asarray(query))
  q = query / np.linalg.norm(query, axis=1, keepdims=True)
  sim = q @ _keys().T
  np.testing.assert_allclose(out.similarity, sim, rtol=1e-5, atol=1e-6)
  want = np.argsort(-sim, axis=1, kind='stable')[:, :3]
  np.testing.assert_array_equal(out.idx, want)
  assert out.idx.dtype == jnp.int32
  want_reduce = np.take_along_axis(sim, want, axis=1).sum() / 5
  np.testing.assert_allclose(out.reduce_sim, want_reduce, rtol=1e-5)


def test_hand_built_queries_pick_expected_prompts():
  # Query 0 is near +e0 then e2; query 1 is near -e1 then e3.
  query = jnp.array([[1.0, 0.0, 0.5, 0.1], [0.0, -1.0, 0.0, 0.3]])
  out = _select(_pool(), query)
  np.testing.assert_array_equal(out.idx, [[0, 4], [3, 5]])


def test_vote_runs_per_group():
  # Group 0 (images 0-1) prefers {0, 4}; group 1 (images 2-3) prefers {3, 5}.
  query = jnp.array([[1.0, 0.0, 0.5, 0.1], [1.0, 0.0, 0.4, 0.0],
                     [0.0, -1.0, 0.0, 0.3], [0.0, -1.0, 0.1, 0.2]])
  pool = _pool(batchwise_prompt=True, vote_group_size=2)
  out = _select(pool, query, train=True)
  np.testing.assert_array_equal(np.sort(out.idx, axis=1),
                                [[0, 4], [0, 4], [3, 5], [3, 5]])
  # One group for the whole batch: counts tie at 2, lower ids win.
  whole = _select(_pool(batchwise_prompt=True, vote_group_size=4), query,
                  train=True)
  np.testing.assert_array_equal(np.sort(whole.idx, axis=1), [[0, 3]] * 4)


def test_majority_vote_counts_ties_and_partial_groups():
  idx = jnp.array([[2, 5], [5, 1], [1, 5], [0, 3], [3, 4]])
  # Groups of 3: {5: 3, 1: 2, 2: 1} -> [5, 1]; last group {3: 2, 0: 1, 4: 1}
  # -> [3, 0] (0 beats 4 on the tie).
  got = majority_vote(idx, None, pool_size=6, group_size=3)
  np.testing.assert_array_equal(got, [[5, 1]] * 3 + [[3, 0]] * 2)
  # A group size of 0 or above the batch means one group.
  got = majority_vote(idx, None, pool_size=6, group_size=0)
  np.testing.assert_array_equal(got, [[5, 1]] * 5)


def test_vote_mask_excludes_images():
  idx = jnp.array([[0, 1], [0, 1], [2, 3], [2, 3], [2, 3]])
  mask = jnp.array([True, True, True, False, False])
  got = majority_vote(idx, mask, pool_size=4, group_size=8)
  np.testing.assert_array_equal(got, [[0, 1]] * 5)
  got = majority_vote(idx, None, pool_size=4, group_size=8)
  np.testing.assert_array_equal(got, [[2, 3]] * 5)


def test_vote_mask_passes_through_the_pool():
  query = jnp.array([[1.0, 0.0, 0.5, 0.1], [0.0, -1.0, 0.0, 0.3],
                     [0.0, -1.0, 0.1, 0.2]])
  pool = _pool(batchwise_prompt=True)
  voted = _select(pool, query, train=True)
  np.testing.assert_array_equal(np.sort(voted.idx, axis=1), [[3, 5]] * 3)
  masked = _select(pool, query, train=True,
                   vote_mask=jnp.array([True, False, False]))
  np.testing.assert_array_equal(np.sort(masked.idx, axis=1), [[0, 4]] * 3)


def test_prompt_mask_forces_ids_at_train_time_only():
  query = jnp.array([[1.0, 0.0, 0.5, 0.1], [0.0, -1.0, 0.0, 0.3]])
  forced = jnp.array([[2, 1], [5, 0]], jnp.int32)
  pool = _pool(batchwise_prompt=True)
  out = _select(pool, query, train=True, prompt_mask=forced)
  np.testing.assert_array_equal(out.idx, forced)
  sim = np.asarray(out.similarity)
  want = (sim[0, 2] + sim[0, 1] + sim[1, 5] + sim[1, 0]) / 2
  np.testing.assert_allclose(out.reduce_sim, want, rtol=1e-5)
  at_test = _select(_pool(), query, train=False, prompt_mask=forced)
  np.testing.assert_array_equal(at_test.idx, [[0, 4], [3, 5]])


@pytest.mark.parametrize('at_test', [True, False])
def test_batchwise_prompt_at_test(at_test):
  query = jnp.array([[1.0, 0.0, 0.5, 0.1], [0.0, -1.0, 0.0, 0.3],
                     [0.0, -1.0, 0.1, 0.2]])
  pool = _pool(batchwise_prompt=True, batchwise_prompt_at_test=at_test)
  out = _select(pool, query, train=False)
  if at_test:
    np.testing.assert_array_equal(np.sort(out.idx, axis=1), [[3, 5]] * 3)
  else:
    np.testing.assert_array_equal(out.idx, [[0, 4], [3, 5], [3, 5]])


@pytest.mark.parametrize('kind', ['mean', 'max', 'mean_max'])
def test_embedding_key_queries_from_patch_tokens(kind):
  rng = np.random.default_rng(1)
  x_embed = rng.normal(size=(3, 5, D)).astype(np.float32)
  pool = _pool(embedding_key=kind, top_k=1)
  params = {'prompt': jnp.zeros((POOL, LENGTH, D)), 'key': jnp.asarray(_keys())}
  out = jax.jit(pool.apply)({'params': params}, jnp.asarray(x_embed))
  mean, mx = x_embed.mean(axis=1), x_embed.max(axis=1)
  query = {'mean': mean, 'max': mx, 'mean_max': mx + 2 * mean}[kind]
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  np.testing.assert_allclose(out.similarity, query @ _keys().T, rtol=1e-5,
                             atol=1e-6)


def test_cls_key_needs_features():
  pool = _pool()
  with pytest.raises(ValueError, match='cls_features'):
    jax.eval_shape(pool.init, jax.random.key(0), jnp.zeros((1, 3, D)))


def test_keys_from_prompt_means_without_learned_keys():
  pool = _pool(prompt_key=False, top_k=1)
  x_embed = jnp.zeros((2, 3, D))
  query = jnp.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 1.0]])
  params = jax.eval_shape(pool.init, jax.random.key(0), x_embed,
                          query)['params']
  assert set(params) == {'prompt'}
  prompts = np.random.default_rng(2).normal(size=(POOL, LENGTH, D))
  out = jax.jit(pool.apply)(
      {'params': {'prompt': jnp.asarray(prompts, jnp.float32)}}, x_embed,
      query)
  keys = prompts.mean(axis=1)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  q = np.asarray(query) / np.linalg.norm(query, axis=1, keepdims=True)
  np.testing.assert_allclose(out.similarity, q @ keys.T, rtol=1e-5, atol=1e-6)


def test_gather_prefix_prompts_per_sample():
  pool_size, layers, length, heads, hd = 5, 3, 2, 2, 4
  rng = np.random.default_rng(3)
  pool = rng.normal(size=(pool_size, layers, 2, length, heads, hd))
  idx = np.array([[4, 0], [1, 3], [2, 2]])
  got = np.asarray(prompt.gather_prompts(jnp.asarray(pool), idx, prefix=True))
  assert got.shape == (3, layers, 2, 2 * length, heads, hd)
  for b in range(3):
    want = np.concatenate([pool[i] for i in idx[b]], axis=2)
    np.testing.assert_array_equal(got[b], want.astype(np.float32))


def test_gather_prompt_tuning_prompts_per_sample():
  rng = np.random.default_rng(4)
  pool = rng.normal(size=(5, 2, LENGTH, D)).astype(np.float32)
  idx = np.array([[3, 1, 4], [0, 2, 1]])
  got = np.asarray(prompt.gather_prompts(jnp.asarray(pool), idx, prefix=False))
  assert got.shape == (2, 2, 3 * LENGTH, D)
  for b in range(2):
    want = np.concatenate([pool[i] for i in idx[b]], axis=1)
    np.testing.assert_array_equal(got[b], want)


@pytest.mark.parametrize('prefix,layers,shape', [
    (False, 1, (POOL, LENGTH, D)),
    (False, 2, (POOL, 2, LENGTH, D)),
    (True, 3, (POOL, 3, 2, LENGTH, 2, D // 2)),
])
def test_pool_parameter_shapes(prefix, layers, shape):
  pool = _pool(prefix=prefix, num_layers=layers, num_heads=2)
  params = jax.eval_shape(
      pool.init, jax.random.key(0), jnp.zeros((1, 3, D)),
      jnp.zeros((1, D)))['params']
  assert params['prompt'].shape == shape
  assert params['key'].shape == (POOL, D)


def test_initializers():
  @jax.jit
  def sample(rng):
    return {name: init(rng, (10000,))
            for name, init in prompt.INITIALIZERS.items()}

  values = sample(jax.random.key(0))
  assert 0.0 <= float(values['uniform'].min())
  assert float(values['uniform'].max()) < 0.01
  assert 0.0049 < float(values['uniform'].mean()) < 0.0051
  assert abs(float(values['normal'].std()) - 0.01) < 3e-4
  assert not np.any(values['zero'])


def test_g_prompt_shapes():
  for prefix, layers, shape, out_shape in [
      (True, 2, (2, 2, 5, 2, 8), (2, 2, 5, 2, 8)),
      (False, 1, (5, 16), (1, 5, 16)),
      (False, 2, (2, 5, 16), (2, 5, 16))]:
    module = prompt.GPrompt(length=5, num_layers=layers, hidden_size=16,
                            num_heads=2, prefix=prefix)
    out, variables = jax.eval_shape(module.init_with_output,
                                    jax.random.key(0))
    assert variables['params']['prompt'].shape == shape
    assert out.shape == out_shape
