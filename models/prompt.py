"""Prompt parameters: the keyed E-Prompt pool (L2P) and the shared G-Prompt.

Two prompt styles exist. Prompt-tuning prompts are tokens [length, D] that are
prepended to a block's input. Prefix-tuning prompts are [2, length, H, hd]:
index 0 extends the attention keys, index 1 the attention values.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# 'uniform' is flax's default uniform(), i.e. U[0, 0.01), the setting of the
# published runs. 'normal' uses the same scale as a standard deviation (0.01),
# flax's default normal().
INITIALIZERS = {
    'uniform': nn.initializers.uniform(),
    'normal': nn.initializers.normal(stddev=0.01),
    'zero': nn.initializers.zeros,
}
EMBEDDING_KEYS = ('cls', 'mean', 'max', 'mean_max')


def prompt_shape(num_layers: int, length: int, hidden_size: int,
                 num_heads: int, prefix: bool) -> tuple[int, ...]:
  """Shape of one prompt (one pool slot, or the G-Prompt).

  Prefix: [num_layers, 2, length, H, hd]. Prompt-tuning: [length, D] for one
  layer, [num_layers, length, D] for several.
  """
  if prefix:
    return (num_layers, 2, length, num_heads, hidden_size // num_heads)
  if num_layers == 1:
    return (length, hidden_size)
  return (num_layers, length, hidden_size)


def with_layer_axis(prompt: Array, num_layers: int, prefix: bool,
                    batch_dims: int) -> Array:
  """Inserts the layer axis that single-layer prompt-tuning shapes omit."""
  if prefix or num_layers > 1:
    return prompt
  return jnp.expand_dims(prompt, batch_dims)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(||x||, sqrt(eps)) along `axis`."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))


def majority_vote(idx: Array, vote_mask: Optional[Array], pool_size: int,
                  group_size: int) -> Array:
  """Replaces every image's prompt ids by its group's most chosen ids.

  Groups are `group_size` consecutive images (the per-device batch of the
  original multi-device runs); the last group may be smaller, and a batch no
  larger than `group_size` (or `group_size` <= 0) is a single group. Within a
  group, each id's count is the number of voting images that chose it; the
  `top_k` most frequent ids win, ties going to the lower id.

  Args:
    idx: [B, top_k] int ids chosen per image.
    vote_mask: [B] bool, False for images that must not vote (padding), or
      None for all.
    pool_size: number of prompts in the pool.
    group_size: images per voting group.

  Returns:
    [B, top_k] int32, identical rows within a group.
  """
  batch, top_k = idx.shape
  if group_size <= 0 or group_size > batch:
    group_size = batch
  num_groups = -(-batch // group_size)
  votes = jax.nn.one_hot(idx, pool_size, dtype=jnp.int32).sum(axis=1)
  if vote_mask is not None:
    votes = votes * vote_mask.astype(jnp.int32)[:, None]
  group = jnp.arange(batch) // group_size
  counts = jax.ops.segment_sum(votes, group, num_segments=num_groups)
  # lax.top_k puts the lower index first among equal values.
  _, winners = jax.lax.top_k(counts, top_k)
  return winners[group].astype(jnp.int32)


def gather_prompts(pool: Array, idx: Array, prefix: bool) -> Array:
  """Concatenates each image's chosen prompts, never mixing images.

  Args:
    pool: prefix [pool, L, 2, length, H, hd] or prompt-tuning
      [pool, L, length, D].
    idx: [B, top_k] ids.
    prefix: which of the two layouts `pool` has.

  Returns:
    prefix [B, L, 2, top_k*length, H, hd] or prompt-tuning
    [B, L, top_k*length, D]; the chosen prompts in the order of `idx`.
  """
  chosen = jnp.take(pool, idx, axis=0)  # [B, K, L, (2,) length, ...]
  length_axis = 4 if prefix else 3
  # Put K right before the length axis so the two merge into one.
  chosen = jnp.moveaxis(chosen, 1, length_axis - 1)
  shape = chosen.shape
  merged = shape[length_axis - 1] * shape[length_axis]
  return chosen.reshape(shape[:length_axis - 1] + (merged,) +
                        shape[length_axis + 1:])


class PromptSelection(NamedTuple):
  """Output of `PromptPool`.

  Attributes:
    prompts: per-image prompts, see `gather_prompts`.
    idx: [B, top_k] int32 chosen ids.
    similarity: [B, pool_size] float32 cosine(query, key).
    reduce_sim: scalar float32, sum over batch and chosen keys of
      cosine(query, key) divided by B.
  """
  prompts: Array
  idx: Array
  similarity: Array
  reduce_sim: Array


class PromptPool(nn.Module):
  """Keyed prompt pool; each image picks the prompts whose keys match it.

  Parameters: `prompt` [pool_size, *prompt_shape(...)] and, when
  `prompt_key`, `key` [pool_size, D].

  Attributes:
    pool_size: number of prompts.
    length: tokens per prompt.
    top_k: prompts chosen per image.
    num_layers: number of blocks the pool's prompts feed.
    num_heads: attention heads (prefix layout only).
    prefix: prefix-tuning (True) or prompt-tuning (False) layout.
    initializer: prompt init, a key of INITIALIZERS.
    prompt_key: learn keys; if False a key is the mean of its prompt's tokens
      (prompt-tuning only).
    prompt_key_init: key init, a key of INITIALIZERS.
    embedding_key: query: 'cls' (given class features), 'mean' or 'max' of
      the embedded patch tokens, or 'mean_max' (max + 2 * mean).
    batchwise_prompt: majority vote over each group of images.
    batchwise_prompt_at_test: also vote when train=False.
    vote_group_size: images per vote group; <= 0 means the whole batch.
  """

  pool_size: int
  length: int
  top_k: int
  num_layers: int = 1
  num_heads: int = 1
  prefix: bool = False
  initializer: str = 'uniform'
  prompt_key: bool = True
  prompt_key_init: str = 'uniform'
  embedding_key: str = 'cls'
  batchwise_prompt: bool = False
  batchwise_prompt_at_test: bool = True
  vote_group_size: int = 0

  def _query(self, x_embed: Array, cls_features: Optional[Array]) -> Array:
    if self.embedding_key == 'cls':
      if cls_features is None:
        raise ValueError("embedding_key='cls' needs cls_features [B, D]")
      return cls_features.astype(jnp.float32)
    x = x_embed.astype(jnp.float32)
    if self.embedding_key == 'mean':
      return x.mean(axis=1)
    if self.embedding_key == 'max':
      return x.max(axis=1)
    return x.max(axis=1) + 2.0 * x.mean(axis=1)

  @nn.compact
  def __call__(self,
               x_embed: Array,
               cls_features: Optional[Array] = None,
               prompt_mask: Optional[Array] = None,
               vote_mask: Optional[Array] = None,
               train: bool = False,
               force: Optional[Array] = None) -> PromptSelection:
    """Selects prompts.

    Args:
      x_embed: [B, N, D] embedded patch tokens (for the mean/max queries).
      cls_features: [B, D] query features for embedding_key 'cls'.
      prompt_mask: [B, top_k] ids that replace the selection when train.
      vote_mask: [B] bool, which images vote (see `majority_vote`).
      train: training mode.
      force: scalar bool: whether `prompt_mask` replaces the selection; None: it does.

    Returns:
      A PromptSelection.
    """
    width = x_embed.shape[-1]
    shape = (self.pool_size,) + prompt_shape(
        self.num_layers, self.length, width, self.num_heads, self.prefix)
    pool = self.param('prompt', INITIALIZERS[self.initializer], shape,
                      jnp.float32)
    pool = with_layer_axis(pool, self.num_layers, self.prefix, batch_dims=1)
    if self.prompt_key:
      keys = self.param('key', INITIALIZERS[self.prompt_key_init],
                        (self.pool_size, width), jnp.float32)
    else:
      keys = pool.mean(axis=(1, 2))

    query = l2_normalize(self._query(x_embed, cls_features))
    similarity = query @ l2_normalize(keys).T  # [B, pool]
    _, idx = jax.lax.top_k(similarity, self.top_k)
    if self.batchwise_prompt and (train or self.batchwise_prompt_at_test):
      idx = majority_vote(idx, vote_mask, self.pool_size, self.vote_group_size)
    if train and prompt_mask is not None:
      idx = prompt_mask if force is None else jnp.where(force, prompt_mask, idx)
    idx = idx.astype(jnp.int32)
    chosen_sim = jnp.take_along_axis(similarity, idx, axis=1)
    reduce_sim = chosen_sim.sum() / x_embed.shape[0]
    return PromptSelection(
        prompts=gather_prompts(pool, idx, self.prefix), idx=idx,
        similarity=similarity, reduce_sim=reduce_sim)


class GPrompt(nn.Module):
  """One prompt shared by every image and task.

  Parameter: `prompt` of `prompt_shape(num_layers, length, hidden_size, ...)`.

  Attributes:
    length: tokens per layer.
    num_layers: number of blocks the prompt feeds.
    hidden_size: model width D.
    num_heads: attention heads (prefix layout only).
    prefix: prefix-tuning (True) or prompt-tuning (False) layout.
    initializer: a key of INITIALIZERS.
  """

  length: int
  num_layers: int
  hidden_size: int
  num_heads: int = 1
  prefix: bool = True
  initializer: str = 'uniform'

  @nn.compact
  def __call__(self) -> Array:
    """Returns prefix [L, 2, length, H, hd] or prompt-tuning [L, length, D]."""
    shape = prompt_shape(self.num_layers, self.length, self.hidden_size,
                         self.num_heads, self.prefix)
    prompt = self.param('prompt', INITIALIZERS[self.initializer], shape,
                        jnp.float32)
    return with_layer_axis(prompt, self.num_layers, self.prefix, batch_dims=0)
