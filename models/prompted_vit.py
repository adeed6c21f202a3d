"""One model for a plain ViT and every prompt method (see models/methods)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import attention
from models import prompt as prompt_lib
from models import vit
from models.methods import base

Array = jax.Array

CLASSIFIERS = ('token', 'prompt', 'gap', 'token+prompt')


class PromptedViT(nn.Module):
  """Vision Transformer with the prompts of an optional prompt method.

  Prompt-tuning prompts are prepended to the input of their block, so the sequence grows and
  the class token sits at index `method.prompt_tokens`. Prefix prompts extend the keys and
  values of their block's attention and leave the sequence length unchanged.

  Attributes:
    hidden_size: width D.
    patch_size: square patch side p.
    num_layers: Transformer blocks.
    num_heads: attention heads H.
    mlp_dim: MLP hidden width.
    num_classes: head outputs C.
    classifier: pre-logits from 'token' (class-token output), 'prompt' (mean
      of the prompt-token outputs), 'gap' (mean of every output token, class
      token and prompt tokens included, as the original) or 'token+prompt' (mean of the
      prompt tokens and the class token).
    use_cls_token: prepend the learned class token.
    norm_pre_logits: L2-normalise pre-logits before the head.
    temperature: logits are divided by it.
    method: the prompt method (models.methods), or None for a plain ViT.
    dtype: compute dtype; parameters stay float32, logits are float32.
    attention_impl: 'xla', 'fused' or 'cudnn' (see attention.PrefixAttention).
    dropout_rate: dropout rate at train time.
  """

  hidden_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_classes: int
  classifier: str = 'token'
  use_cls_token: bool = True
  norm_pre_logits: bool = False
  temperature: float = 1.0
  method: Optional[base.PromptMethod] = None
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  dropout_rate: float = 0.0

  def __post_init__(self):
    validate(self)
    super().__post_init__()

  @property
  def dims(self) -> base.Dims:
    return base.Dims(num_layers=self.num_layers, hidden_size=self.hidden_size,
                     num_heads=self.num_heads)

  @property
  def total_prompt_len(self) -> int:
    """Tokens prepended by prompt-tuning prompts, over all layers."""
    return 0 if self.method is None else self.method.prompt_tokens

  @property
  def needs_query(self) -> bool:
    """Whether the method needs the frozen query ViT's class-token features."""
    return self.method is not None and self.method.needs_query

  def _pool(self, x: Array) -> Array:
    """Maps encoder output [B, T, D] to pre-logits [B, D]."""
    n_prompt = self.total_prompt_len
    if self.classifier == 'token':
      return x[:, n_prompt]
    if self.classifier == 'prompt':
      return x[:, :n_prompt].mean(axis=1)
    if self.classifier == 'token+prompt':
      return x[:, :n_prompt + 1].mean(axis=1)
    # 'gap', as the original: every token, class token and prompts included.
    return x.mean(axis=1)

  @nn.compact
  def __call__(self,
               images: Array,
               cls_features: Optional[Array] = None,
               task: Optional[dict[str, Array]] = None,
               vote_mask: Optional[Array] = None,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Classifies images.

    Args:
      images: [B, H, W, 3] float.
      cls_features: [B, D] query features (for methods that `needs_query`).
      task: the method's per-task arrays (`PromptMethod.task_arrays`), plus 'task_step'
        (int32) at train time; None for a plain ViT.
      vote_mask: [B] bool, False for padding images.
      train: training mode (dropout, the method's training behaviour).

    Returns:
      logits [B, num_classes] float32 and aux: 'pre_logits' [B, D] float32 (before
      norm_pre_logits), the method's aux (e.g. 'prompt_idx' [B, top_k] int32, 'reduce_sim')
      and, when the method has one, 'prompt_loss', the scalar to add to the training loss.
    """
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, param_dtype=jnp.float32,
                name='embedding')(images.astype(self.dtype))
    batch = x.shape[0]
    x_embed = x.reshape(batch, -1, self.hidden_size)
    x = x_embed
    if self.use_cls_token:
      cls = self.param('cls', nn.initializers.zeros,
                       (1, 1, self.hidden_size), jnp.float32)
      cls = jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)

    aux = {}
    tokens = prefixes = (None,) * self.num_layers
    if self.method is not None:
      prompts = self.method.prompts(x_embed, cls_features, task, vote_mask, train, self.dims)
      tokens, prefixes = list(prompts.tokens), list(prompts.prefixes)
      aux.update(prompts.aux)
      if prompts.loss is not None:
        aux['prompt_loss'] = prompts.loss

    x = vit.Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim,
        num_heads=self.num_heads, dtype=self.dtype,
        attention_impl=self.attention_impl, dropout_rate=self.dropout_rate,
        name='Transformer')(x, tokens, prefixes, train=train)
    pre_logits = self._pool(x).astype(jnp.float32)
    pre_logits = vit.IdentityLayer(name='pre_logits')(pre_logits)
    aux['pre_logits'] = pre_logits
    if self.norm_pre_logits:
      pre_logits = prompt_lib.l2_normalize(pre_logits)
    logits = nn.Dense(self.num_classes, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.zeros, name='head')(
                          pre_logits)
    return logits / self.temperature, aux


def validate(model: PromptedViT):
  """Raises ValueError if the fields do not describe a valid model."""
  if model.hidden_size % model.num_heads:
    raise ValueError(f'hidden_size {model.hidden_size} is not divisible by '
                     f'num_heads {model.num_heads}.')
  if model.classifier not in CLASSIFIERS:
    raise ValueError(f'Unknown vit_classifier {model.classifier!r}; use one of '
                     f'{", ".join(CLASSIFIERS)}.')
  if model.attention_impl not in attention.ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention_impl {model.attention_impl!r}; use '
                     f'one of {", ".join(attention.ATTENTION_IMPLS)}.')
  if 'token' in model.classifier and not model.use_cls_token:
    raise ValueError(f'vit_classifier {model.classifier!r} needs '
                     'use_cls_token=True.')
  if 'prompt' in model.classifier and model.total_prompt_len == 0:
    raise ValueError(f'vit_classifier {model.classifier!r} needs prompt-tuning '
                     'prompts (prefix prompts add no tokens); use "token".')
  if model.temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {model.temperature}.')
  if model.method is not None:
    model.method.check(model.dims)
