"""One model for plain ViT, L2P and DualPrompt."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from libml.errors import UserError
from models import attention
from models import prompt as prompt_lib
from models import vit

Array = jax.Array

CLASSIFIERS = ('token', 'prompt', 'gap', 'token+prompt')


class PromptedViT(nn.Module):
  """Vision Transformer with optional G-Prompt and E-Prompt pool.

  Prompt-tuning prompts are prepended to the input of their block (G-Prompt
  first, then the E-Prompts), so the sequence grows and the class token sits
  at index `total_prompt_len`. Prefix prompts extend the keys and values of
  their block's attention and leave the sequence length unchanged.

  Attributes:
    hidden_size: width D.
    patch_size: square patch side p.
    num_layers: Transformer blocks.
    num_heads: attention heads H.
    mlp_dim: MLP hidden width.
    num_classes: head outputs C.
    classifier: pre-logits from 'token' (class-token output), 'prompt' (mean
      of the prompt-token outputs), 'gap' (mean of every output token, class
      token and prompt tokens included, as the original) or 'token+prompt' (mean of the prompt tokens and the class token).
    use_cls_token: prepend the learned class token.
    norm_pre_logits: L2-normalise pre-logits before the head.
    temperature: logits are divided by it.
    use_g_prompt: add the shared G-Prompt.
    g_prompt_length: G-Prompt tokens per layer.
    g_prompt_layers: blocks that receive the G-Prompt.
    g_prompt_prefix: prefix-tuning (True) or prompt-tuning G-Prompt.
    use_e_prompt: add prompts selected from the keyed pool.
    e_prompt_layers: blocks that receive the E-Prompts.
    e_prompt_prefix: prefix-tuning (True) or prompt-tuning E-Prompts.
    pool_size: prompts in the pool.
    prompt_length: tokens per pool prompt (per layer).
    top_k: pool prompts chosen per image.
    prompt_init: E-Prompt initializer name, see `prompt.INITIALIZERS` (the
      G-Prompt is always 'uniform', as in the original).
    prompt_key: learn keys; False uses each prompt's mean token.
    prompt_key_init: key initializer name.
    embedding_key: query kind, see `prompt.PromptPool`.
    batchwise_prompt: majority vote of prompt ids per vote group.
    batchwise_prompt_at_test: also vote when train=False.
    vote_group_size: images per vote group (the per-device batch size);
      <= 0 means the whole batch.
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
  use_g_prompt: bool = False
  g_prompt_length: int = 5
  g_prompt_layers: tuple[int, ...] = ()
  g_prompt_prefix: bool = True
  use_e_prompt: bool = False
  e_prompt_layers: tuple[int, ...] = ()
  e_prompt_prefix: bool = False
  pool_size: int = 10
  prompt_length: int = 5
  top_k: int = 1
  prompt_init: str = 'uniform'
  prompt_key: bool = True
  prompt_key_init: str = 'uniform'
  embedding_key: str = 'cls'
  batchwise_prompt: bool = False
  batchwise_prompt_at_test: bool = True
  vote_group_size: int = 0
  dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  dropout_rate: float = 0.0

  def __post_init__(self):
    validate(self)
    super().__post_init__()

  @property
  def total_prompt_len(self) -> int:
    """Tokens prepended by prompt-tuning prompts, over all layers."""
    total = 0
    if self.use_g_prompt and not self.g_prompt_prefix:
      total += self.g_prompt_length * len(self.g_prompt_layers)
    if self.use_e_prompt and not self.e_prompt_prefix:
      total += self.top_k * self.prompt_length * len(self.e_prompt_layers)
    return total

  def _layer_inputs(self, selection: Optional[prompt_lib.PromptSelection],
                    batch: int) -> tuple[list, list]:
    """Per block: prompt tokens [B, P, D] and prefixes [B, 2, P, H, hd]."""
    tokens = [[] for _ in range(self.num_layers)]
    prefixes = [[] for _ in range(self.num_layers)]
    if self.use_g_prompt:
      g = prompt_lib.GPrompt(
          length=self.g_prompt_length, num_layers=len(self.g_prompt_layers),
          hidden_size=self.hidden_size, num_heads=self.num_heads,
          # The original draws the G-Prompt uniformly whatever `initializer` says.
          prefix=self.g_prompt_prefix, initializer='uniform',
          name='g_prompt')()
      target = prefixes if self.g_prompt_prefix else tokens
      for j, layer in enumerate(self.g_prompt_layers):
        target[layer].append(jnp.broadcast_to(g[j], (batch,) + g.shape[1:]))
    if selection is not None:
      target = prefixes if self.e_prompt_prefix else tokens
      for j, layer in enumerate(self.e_prompt_layers):
        target[layer].append(selection.prompts[:, j])
    # Prompt tokens concatenate along axis 1, prefixes along their length
    # axis 2; the G-Prompt comes first in both.
    tokens = [jnp.concatenate(t, axis=1) if t else None for t in tokens]
    prefixes = [jnp.concatenate(p, axis=2) if p else None for p in prefixes]
    return tokens, prefixes

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
               prompt_mask: Optional[Array] = None,
               vote_mask: Optional[Array] = None,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Classifies images.

    Args:
      images: [B, H, W, 3] float.
      cls_features: [B, D] query features (needed by the pool with
        embedding_key 'cls').
      prompt_mask: [B, top_k] int32 pool ids forced when train, or None.
      vote_mask: [B] bool, images that take part in the majority vote.
      train: training mode (dropout, prompt_mask, vote at train time).

    Returns:
      logits [B, num_classes] float32 and aux: 'pre_logits' [B, D] float32
      (before norm_pre_logits) and, with the pool, 'prompt_idx' [B, top_k]
      int32, 'similarity' [B, pool_size], 'reduce_sim' scalar float32.
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
    selection = None
    if self.use_e_prompt:
      selection = prompt_lib.PromptPool(
          pool_size=self.pool_size, length=self.prompt_length,
          top_k=self.top_k, num_layers=len(self.e_prompt_layers),
          num_heads=self.num_heads, prefix=self.e_prompt_prefix,
          initializer=self.prompt_init, prompt_key=self.prompt_key,
          prompt_key_init=self.prompt_key_init,
          embedding_key=self.embedding_key,
          batchwise_prompt=self.batchwise_prompt,
          batchwise_prompt_at_test=self.batchwise_prompt_at_test,
          vote_group_size=self.vote_group_size, name='e_prompt')(
              x_embed, cls_features, prompt_mask, vote_mask, train)
      aux.update(prompt_idx=selection.idx, similarity=selection.similarity,
                 reduce_sim=selection.reduce_sim)
    tokens, prefixes = self._layer_inputs(selection, batch)

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


def _check_layers(name: str, layers: tuple[int, ...], depth: int):
  bad = [i for i in layers if not 0 <= i < depth]
  if bad or len(set(layers)) != len(layers) or not layers:
    raise UserError(f'{name}={list(layers)} must be distinct block indices in '
                    f'[0, {depth}); fix the config.')


def validate(model: PromptedViT):
  """Raises UserError if the fields do not describe a valid model."""
  if model.hidden_size % model.num_heads:
    raise UserError(f'hidden_size {model.hidden_size} is not divisible by '
                    f'num_heads {model.num_heads}.')
  if model.classifier not in CLASSIFIERS:
    raise UserError(f'Unknown vit_classifier {model.classifier!r}; use one of '
                    f'{", ".join(CLASSIFIERS)}.')
  if model.attention_impl not in attention.ATTENTION_IMPLS:
    raise UserError(f'Unknown attention_impl {model.attention_impl!r}; use '
                    f'one of {", ".join(attention.ATTENTION_IMPLS)}.')
  if 'token' in model.classifier and not model.use_cls_token:
    raise UserError(f'vit_classifier {model.classifier!r} needs '
                    'use_cls_token=True.')
  if 'prompt' in model.classifier and model.total_prompt_len == 0:
    raise UserError(f'vit_classifier {model.classifier!r} needs prompt-tuning '
                    'prompts (prefix prompts add no tokens); use "token".')
  if model.temperature <= 0:
    raise UserError(f'temperature must be > 0, got {model.temperature}.')
  if model.use_g_prompt:
    _check_layers('g_prompt_layer_idx', model.g_prompt_layers,
                  model.num_layers)
    if model.g_prompt_length < 1:
      raise UserError('g_prompt_length must be >= 1.')
  if model.use_e_prompt or model.use_g_prompt:
    if model.prompt_init not in prompt_lib.INITIALIZERS:
      raise UserError(f'Unknown prompt initializer {model.prompt_init!r}; use '
                      f'one of {", ".join(prompt_lib.INITIALIZERS)}.')
  if model.use_e_prompt:
    _validate_pool(model)


def _validate_pool(model: PromptedViT):
  """Checks the E-Prompt pool fields."""
  _check_layers('e_prompt_layer_idx', model.e_prompt_layers, model.num_layers)
  if not 1 <= model.top_k <= model.pool_size:
    raise UserError(f'top_k={model.top_k} must be in [1, pool_size='
                    f'{model.pool_size}]; lower top_k or enlarge the pool.')
  if model.prompt_length < 1:
    raise UserError('prompt_pool_param.length must be >= 1.')
  if model.prompt_key_init not in prompt_lib.INITIALIZERS:
    raise UserError(f'Unknown prompt_key_init {model.prompt_key_init!r}; use '
                    f'one of {", ".join(prompt_lib.INITIALIZERS)}.')
  if model.embedding_key not in prompt_lib.EMBEDDING_KEYS:
    raise UserError(f'Unknown embedding_key {model.embedding_key!r}; use one '
                    f'of {", ".join(prompt_lib.EMBEDDING_KEYS)}.')
  if not model.prompt_key and model.e_prompt_prefix:
    raise UserError('prompt_key=False (keys from prompt means) needs '
                    'prompt-tuning E-Prompts; set prompt_key=True.')
