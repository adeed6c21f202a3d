"""Tests of the prefix attention against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention

B, T, P, D, H = 2, 5, 3, 8, 2
HD = D // H


def _params_and_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  prefix_k = rng.normal(size=(B, P, H, HD)).astype(np.float32)
  prefix_v = rng.normal(size=(B, P, H, HD)).astype(np.float32)
  module = attention.PrefixAttention(num_heads=H)
  shapes = jax.eval_shape(module.init, jax.random.key(seed), x)['params']
  # Random biases too, so that a dropped or misplaced bias shows up.
  params = jax.tree.map(
      lambda p: (rng.normal(size=p.shape) / np.sqrt(D)).astype(np.float32),
      shapes)
  return x, prefix_k, prefix_v, params


def _apply(module, params, *args):
  return jax.jit(module.apply)({'params': params}, *args)


def _np_attention(x, params, prefix_k=None, prefix_v=None):
  """Self-attention over [prefix, x] written with NumPy."""
  def proj(name):
    p = params[name]
    return np.einsum('btd,dhk->bthk', x, p['kernel']) + p['bias']

  q, k, v = proj('query'), proj('key'), proj('value')
  if prefix_k is not None:
    k = np.concatenate([prefix_k, k], axis=1)
    v = np.concatenate([prefix_v, v], axis=1)
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(HD)
  logits -= logits.max(axis=-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(axis=-1, keepdims=True)
  out = np.einsum('bhts,bshk->bthk', w, v)
  return (np.einsum('bthk,hkd->btd', out, params['out']['kernel']) +
          params['out']['bias'])


def test_param_shapes_follow_checkpoint_layout():
  _, _, _, params = _params_and_inputs()
  shapes = jax.tree.map(np.shape, params)
  assert shapes == {
      'query': {'kernel': (D, H, HD), 'bias': (H, HD)},
      'key': {'kernel': (D, H, HD), 'bias': (H, HD)},
      'value': {'kernel': (D, H, HD), 'bias': (H, HD)},
      'out': {'kernel': (H, HD, D), 'bias': (D,)},
  }


@pytest.mark.parametrize('impl', ['xla', 'fused'])
@pytest.mark.parametrize('with_prefix', [False, True])
def test_matches_numpy_reference(impl, with_prefix):
  x, pk, pv, params = _params_and_inputs()
  module = attention.PrefixAttention(num_heads=H, attention_impl=impl)
  if not with_prefix:
    pk = pv = None
  got = _apply(module, params, x, pk, pv)
  want = _np_attention(x, params, pk, pv)
  assert got.shape == (B, T, D)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('with_prefix', [False, True])
def test_fused_equals_xla(with_prefix):
  x, pk, pv, params = _params_and_inputs(seed=1)
  if not with_prefix:
    pk = pv = None
  outs = [
      _apply(attention.PrefixAttention(num_heads=H, attention_impl=impl),
             params, x, pk, pv) for impl in ('xla', 'fused')]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_prefix_is_per_sample():
  x, pk, pv, params = _params_and_inputs(seed=2)
  module = attention.PrefixAttention(num_heads=H)
  batched = _apply(module, params, x, pk, pv)
  for b in range(B):
    alone = _apply(module, params, x[b:b + 1], pk[b:b + 1], pv[b:b + 1])
    np.testing.assert_allclose(batched[b:b + 1], alone, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  x, pk, pv, params = _params_and_inputs(seed=3)
  module = attention.PrefixAttention(num_heads=H, dtype=jnp.bfloat16)
  variables = jax.eval_shape(module.init, jax.random.key(0), x, pk, pv)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  got = _apply(module, params, x, pk, pv)
  assert got.dtype == jnp.bfloat16
  want = _np_attention(x, params, pk, pv)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05,
                             atol=0.1)


def test_prefix_keys_without_values_is_an_error():
  x, pk, _, params = _params_and_inputs()
  with pytest.raises(ValueError, match='together'):
    _apply(attention.PrefixAttention(num_heads=H), params, x, pk)


def test_padded_attention_equals_reference_with_prefix_lengths():
  """The cuDNN path pads queries and keys to a round length and masks the padding."""
  rng = np.random.default_rng(3)
  q = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  k = rng.normal(size=(2, 9, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 9, 2, 8)).astype(np.float32)
  # Plain numpy softmax attention over all 9 keys.
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(8)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum('bhts,bshd->bthd', weights, v)
  out = attention.padded_attention(q, k, v, implementation='xla', multiple=16)
  assert out.shape == (2, 5, 2, 8)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
