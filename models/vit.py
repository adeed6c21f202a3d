"""Vision Transformer backbone with the original checkpoint's parameter names.

Prompts enter the encoder in two ways, chosen per layer by the caller:
prompt-tuning tokens are prepended to the block input (the sequence grows),
prefix key/values are handed to the block's attention (it does not).
"""

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTVariant:
  """Backbone dimensions decoded from a model name such as 'ViT-B_16'."""
  hidden_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  # Train-time dropout of the variant's release config (0.1 for ViT-L/16 and ViT-H/14).
  dropout_rate: float = 0.0


def _variant(width: int, patch: int, depth: int, heads: int, mlp: int,
             dropout: float = 0.0):
  return ViTVariant(hidden_size=width, patch_size=patch, num_layers=depth,
                    num_heads=heads, mlp_dim=mlp, dropout_rate=dropout)


VARIANTS: dict[str, ViTVariant] = {
    'ViT-Ti_16': _variant(192, 16, 12, 3, 768),
    'ViT-S_16': _variant(384, 16, 12, 6, 1536),
    'ViT-S_32': _variant(384, 32, 12, 6, 1536),
    'ViT-B_16': _variant(768, 16, 12, 12, 3072),
    'ViT-B_32': _variant(768, 32, 12, 12, 3072),
    'ViT-B_8': _variant(768, 8, 12, 12, 3072),
    'ViT-L_16': _variant(1024, 16, 24, 16, 4096, dropout=0.1),
    'ViT-L_32': _variant(1024, 32, 24, 16, 4096),
    'ViT-H_14': _variant(1280, 14, 32, 16, 5120, dropout=0.1),
    # The embedded demo's backbone (16x16 inputs, 4x4 patches), pretrained by
    # demo/pretrain_vit.py into demo/ViT-demo_glyphs.npz.
    'ViT-demo': _variant(64, 4, 6, 4, 256),
    # Tiny model for tests and smoke runs.
    'ViT-test': _variant(32, 8, 6, 2, 64),
}


def get_variant(name: str) -> ViTVariant:
  """Returns the dimensions of the named ViT, or raises ValueError."""
  if name not in VARIANTS:
    raise ValueError(f'Unknown model_name {name!r}; valid names: '
                     f'{", ".join(VARIANTS)}.')
  return VARIANTS[name]


class IdentityLayer(nn.Module):
  """Names an array (e.g. 'pre_logits') without adding parameters."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding [1, T, D] to [B, T, D] tokens."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], jnp.float32)
    return x + pos.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> gelu -> Dense feed-forward block.

  Attributes:
    mlp_dim: hidden width of the block.
    dtype: compute dtype.
    dropout_rate: dropout after each Dense at train time.
  """

  mlp_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Maps [B, T, D] to [B, T, D]."""
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    y = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = dense(x.shape[-1], 'Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block with optional attention prefix.

  Attributes:
    mlp_dim: hidden width of the MLP.
    num_heads: attention heads.
    dtype: compute dtype.
    attention_impl: 'xla', 'fused' or 'cudnn', see `attention.PrefixAttention`.
    dropout_rate: dropout after attention and inside the MLP at train time.
  """

  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, prefix: Optional[Array] = None, *,
               train: bool = False) -> Array:
    """Applies the block.

    Args:
      x: [B, T, D] tokens.
      prefix: [B, 2, P, H, hd] key (index 0) and value (index 1) prefixes of
        this block's attention, or None.
      train: enables dropout.

    Returns:
      [B, T, D].
    """
    prefix_k = prefix_v = None
    if prefix is not None:
      prefix_k, prefix_v = prefix[:, 0], prefix[:, 1]
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = attention.PrefixAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        attention_impl=self.attention_impl,
        name='MultiHeadDotProductAttention_1')(y, prefix_k, prefix_v)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype,
                 dropout_rate=self.dropout_rate, name='MlpBlock_3')(
                     y, train=train)
    return x + y


class Encoder(nn.Module):
  """Position embedding, Transformer blocks and the final LayerNorm.

  Attributes:
    num_layers: number of blocks.
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    dtype: compute dtype.
    attention_impl: 'xla', 'fused' or 'cudnn'.
    dropout_rate: dropout rate at train time.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self,
               x: Array,
               layer_prompts: Optional[Sequence[Optional[Array]]] = None,
               layer_prefixes: Optional[Sequence[Optional[Array]]] = None,
               *,
               train: bool = False) -> Array:
    """Encodes tokens.

    Args:
      x: [B, T, D] class token and patch tokens, without position embedding.
      layer_prompts: per layer, None or [B, P, D] tokens prepended to that
        block's input after the position embedding was added, so prompts carry
        no position embedding.
      layer_prefixes: per layer, None or [B, 2, P, H, hd] attention prefixes.
      train: enables dropout.

    Returns:
      [B, T + total prepended tokens, D], prompt tokens first.
    """
    none = [None] * self.num_layers
    layer_prompts = none if layer_prompts is None else layer_prompts
    layer_prefixes = none if layer_prefixes is None else layer_prefixes
    x = AddPositionEmbs(name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      if layer_prompts[i] is not None:
        x = jnp.concatenate([layer_prompts[i].astype(x.dtype), x], axis=1)
      x = EncoderBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
          attention_impl=self.attention_impl, dropout_rate=self.dropout_rate,
          name=f'encoderblock_{i}')(x, layer_prefixes[i], train=train)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
