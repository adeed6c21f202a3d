"""Multi-head self-attention that accepts per-sample prefix keys and values.

Prefix-tuning (DualPrompt) prepends learned key/value tokens to the projected
keys and values of a block. Queries are not extended, so the block's output
keeps the sequence length of its input.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLS = ('xla', 'fused', 'cudnn')
# cuDNN attention pads queries and keys to a multiple of this (see `padded_attention`).
CUDNN_PAD_MULTIPLE = 8


def _xla_attention(query: Array, key: Array, value: Array) -> Array:
  """Softmax attention written out, logits and softmax in float32.

  Args:
    query: [B, T, H, hd].
    key: [B, S, H, hd].
    value: [B, S, H, hd].

  Returns:
    [B, T, H, hd] in the dtype of `value`.
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum(
      'bthd,bshd->bhts', query, key, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * scale, axis=-1)
  return jnp.einsum('bhts,bshd->bthd', weights.astype(value.dtype), value)


def _fused_attention(query: Array, key: Array, value: Array,
                     implementation: Optional[str] = None) -> Array:
  """Same contract as `_xla_attention` through `jax.nn.dot_product_attention`.

  `implementation=None` lets JAX choose the kernel; 'cudnn' asks for cuDNN's flash
  attention (NVIDIA GPUs, bfloat16 or float16 inputs).
  """
  if implementation == 'cudnn':
    return padded_attention(query, key, value, implementation='cudnn', multiple=CUDNN_PAD_MULTIPLE)
  return jax.nn.dot_product_attention(query, key, value, implementation=implementation)


def padded_attention(query: Array, key: Array, value: Array, *,
                     implementation: Optional[str] = 'cudnn',
                     multiple: int = 64) -> Array:
  """Fused attention on queries and keys padded to a common, round length.

  cuDNN accepts only some sequence lengths (prefix keys make the key sequence longer
  than the query sequence; odd lengths are refused in the backward pass). Padding both to
  a multiple of `multiple` and passing the true lengths masks the padding out, so the
  real rows are exact.
  """
  batch, num_queries, num_keys = query.shape[0], query.shape[1], key.shape[1]
  length = -(-max(num_queries, num_keys) // multiple) * multiple

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)])

  out = jax.nn.dot_product_attention(
      pad(query), pad(key), pad(value),
      query_seq_lengths=jnp.full([batch], num_queries, jnp.int32),
      key_value_seq_lengths=jnp.full([batch], num_keys, jnp.int32),
      implementation=implementation)
  return out[:, :num_queries]


class PrefixAttention(nn.Module):
  """Multi-head self-attention with optional per-sample prefix keys/values.

  The parameter layout matches the original ViT checkpoints: `query`, `key`,
  `value` kernels [D, H, hd] with biases [H, hd], and `out` kernel [H, hd, D]
  with bias [D].

  Attributes:
    num_heads: number of attention heads H; the width D must divide by it.
    dtype: compute dtype (float32 or bfloat16). Parameters stay float32 and
      attention logits are accumulated and normalised in float32.
    attention_impl: 'xla' (explicit einsum + softmax), 'fused'
      (`jax.nn.dot_product_attention`, kernel chosen by JAX) or 'cudnn' (the same
      with cuDNN flash attention; NVIDIA GPUs with a bfloat16 `dtype`).
    kernel_init: initializer of the four projection kernels.
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self,
               x: Array,
               prefix_k: Optional[Array] = None,
               prefix_v: Optional[Array] = None) -> Array:
    """Attends from every token of `x` to [prefix, x].

    Args:
      x: [B, T, D] tokens.
      prefix_k: [B, P, H, hd] keys placed before the projected keys, or None.
      prefix_v: [B, P, H, hd] values placed before the projected values, or
        None. Given together with `prefix_k`.

    Returns:
      [B, T, D] in `dtype`.
    """
    if (prefix_k is None) != (prefix_v is None):
      raise ValueError('prefix_k and prefix_v must be given together')
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def project(name):
      return nn.DenseGeneral(
          features=(self.num_heads, head_dim),
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=self.kernel_init,
          name=name)(x)

    query, key, value = project('query'), project('key'), project('value')
    if prefix_k is not None:
      key = jnp.concatenate([prefix_k.astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix_v.astype(value.dtype), value], axis=1)

    if self.attention_impl in ('fused', 'cudnn'):
      out = _fused_attention(query, key, value,
                             'cudnn' if self.attention_impl == 'cudnn' else None)
    else:
      out = _xla_attention(query, key, value)
    return nn.DenseGeneral(
        features=width,
        axis=(-2, -1),
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=self.kernel_init,
        name='out')(out)
