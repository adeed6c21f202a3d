"""CODA-Prompt (Smith et al., CVPR 2023): prompts assembled from a growing set of components.

Each prompted block holds `pool_size` components: a prompt P_k [length, D], a key K_k [D] and
an attention vector A_k [D]. An image with query q [D] weighs component k by
alpha_k = cos(q * A_k, K_k) and receives the prefix sum_k alpha_k P_k, whose first half extends
the attention keys and second half the values. Task t trains components [s, f), s = t * pt,
f = (t + 1) * pt, pt = pool_size / num_tasks; [0, s) stay frozen; evaluation uses [0, f).
Components >= f are masked out rather than sliced away, so one compiled step serves every task.
At the start of each task its new components are re-drawn by Gram-Schmidt against the older
ones, and an optional penalty keeps the components orthogonal while training.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.methods import base
from models.methods import l2p

Array = jax.Array

# torch's F.normalize divides by max(||x||, 1e-12); this is that bound squared.
_EPS_SQ = 1e-24
# The official Gram-Schmidt refuses to project onto a column of squared norm below this.
_TINY_SQ = 1e-8
_NAMES = ('prompt', 'key', 'attention')
_HIGHEST = jax.lax.Precision.HIGHEST


class Components(nn.Module):
  """The components of every prompted block, pool axis first.

  Parameters (uniform in [0, 1), as torch's `nn.init.uniform_`): 'prompt'
  [pool, L, length, D], 'key' [pool, L, D], 'attention' [pool, L, D], L = num_layers.

  Attributes:
    pool_size: components per block.
    num_layers: prompted blocks L.
    length: prefix tokens per block.
    hidden_size: width D.
  """
  pool_size: int
  num_layers: int
  length: int
  hidden_size: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array, Array]:
    """Returns (prompt, key, attention)."""
    init = nn.initializers.uniform(scale=1.0)
    rows = (self.pool_size, self.num_layers)
    prompt = self.param('prompt', init, rows + (self.length, self.hidden_size), jnp.float32)
    key = self.param('key', init, rows + (self.hidden_size,), jnp.float32)
    attention = self.param('attention', init, rows + (self.hidden_size,), jnp.float32)
    return prompt, key, attention


@dataclasses.dataclass(frozen=True)
class CodaPrompt(base.PromptMethod):
  """Attention-weighted sums of prompt components, as prefixes.

  Attributes:
    pool_size: components per block over all tasks.
    length: prefix tokens per block (even: half keys, half values).
    layers: blocks that receive the prefixes.
    num_tasks: tasks of the run; each adds pool_size / num_tasks components.
    ortho_mu: weight of the orthogonality penalty (0: none).
  """
  pool_size: int
  length: int
  layers: tuple[int, ...]
  num_tasks: int
  ortho_mu: float

  @classmethod
  def from_config(cls, config) -> 'CodaPrompt':
    """The method `config.coda_prompt_param` and `config.continual.num_tasks` describe."""
    # Earlier components stay frozen through their zero gradients alone: carried-over Adam
    # moments or weight decay would move them.
    if not config.reinit_optimizer or config.weight_decay:
      raise ValueError('CODA-Prompt freezes earlier components by their zero gradients: set '
                       'reinit_optimizer=True and weight_decay=0, as the official code.')
    coda = config.coda_prompt_param
    return cls(pool_size=coda.pool_size, length=coda.length, layers=l2p.block_indices(coda.layer_idx),
               num_tasks=config.continual.num_tasks, ortho_mu=float(coda.ortho_mu))

  @property
  def needs_query(self) -> bool:
    return True

  def check(self, dims: base.Dims) -> None:
    base.check_layers('coda_prompt_param.layer_idx', self.layers, dims.num_layers)
    if self.length < 2 or self.length % 2:
      raise ValueError(f'coda_prompt_param.length={self.length} must be even and >= 2 (half the '
                       'tokens extend the keys, half the values); fix the config.')
    if self.pool_size < self.num_tasks or self.pool_size % self.num_tasks:
      raise ValueError(f'coda_prompt_param.pool_size={self.pool_size} must be a positive multiple of '
                       f'continual.num_tasks={self.num_tasks}, since each task adds '
                       'pool_size / num_tasks components; fix pool_size.')
    if self.pool_size > dims.hidden_size:
      raise ValueError(f'coda_prompt_param.pool_size={self.pool_size} exceeds hidden_size='
                       f'{dims.hidden_size}: Gram-Schmidt cannot make more orthogonal keys than '
                       'the width; lower pool_size.')
    if self.ortho_mu < 0:
      raise ValueError(f'coda_prompt_param.ortho_mu={self.ortho_mu} must be >= 0.')

  def span(self, task: int) -> tuple[int, int]:
    """(s, f): task `task` trains components [s, f) and uses [0, f)."""
    if not 0 <= task < self.num_tasks:
      raise ValueError(f'task {task} is outside [0, continual.num_tasks={self.num_tasks}).')
    per_task = self.pool_size // self.num_tasks
    return task * per_task, (task + 1) * per_task

  def task_arrays(self, task, *, steps_per_epoch, num_steps) -> dict[str, np.ndarray]:
    """'num_frozen' s and 'num_active' f, int32 scalars (see `span`)."""
    del steps_per_epoch, num_steps
    frozen, active = self.span(task)
    return {'num_frozen': np.int32(frozen), 'num_active': np.int32(active)}

  def prompts(self, x_embed, cls_features, task, vote_mask, train, dims) -> base.Prompts:
    """Prefixes [B, 2, length // 2, H, D // H] at `layers`; parameters under 'e_prompt'.

    `task` must hold 'num_frozen' and 'num_active' (`task_arrays`), at train and eval time.
    """
    del vote_mask
    if cls_features is None:
      raise ValueError('CODA-Prompt needs the query features cls_features [B, D].')
    if task is None:
      raise ValueError("CODA-Prompt needs its task arrays ('num_frozen', 'num_active').")
    width = dims.hidden_size
    prompt, key, attention = Components(pool_size=self.pool_size, num_layers=len(self.layers),
                                        length=self.length, hidden_size=width,
                                        name='e_prompt')()
    ids = jnp.arange(self.pool_size)
    active = ids < task['num_active']
    frozen = ids < task['num_frozen'] if train else jnp.zeros_like(active)
    prompt, key, attention = (_restrict(x, active, frozen) for x in (prompt, key, attention))

    weights = component_weights(cls_features.astype(jnp.float32), key, attention)  # [B, pool, L]
    mixed = jnp.einsum('bkl,klnd->blnd', weights, prompt, precision=_HIGHEST)  # [B, L, length, D]
    batch, half = mixed.shape[0], self.length // 2
    mixed = mixed.reshape(batch, len(self.layers), 2, half, dims.num_heads, width // dims.num_heads)
    prefixes = {layer: [mixed[:, j]] for j, layer in enumerate(self.layers)}

    loss, aux = None, {}
    if train and self.ortho_mu > 0:
      penalty = sum(ortho_penalty(x.reshape(self.pool_size, len(self.layers), -1), active)
                    for x in (key, attention, prompt))
      aux['ortho_penalty'] = penalty
      loss = self.ortho_mu * penalty
    return base.Prompts(tokens=(None,) * dims.num_layers,
                        prefixes=base.per_layer(prefixes, dims.num_layers, axis=2), loss=loss, aux=aux)

  def start_task(self, params: Any, task: int, *, seed: int) -> Any:
    """Re-draws the task's components [s, f) by Gram-Schmidt (see `gram_schmidt`).

    For each of 'prompt', 'key', 'attention' in that order and each block in order, the
    draws are standard normal [f - s, M] from one `np.random.default_rng((seed, task))`
    (seed taken modulo 2**64); prompts are flattened to M = length * D. Returns float32
    NumPy arrays under 'e_prompt'; every other component and parameter is kept as it is.
    """
    if 'e_prompt' not in params:
      return params
    start, stop = self.span(task)
    rng = np.random.default_rng((seed % 2**64, task))
    e_prompt = dict(params['e_prompt'])
    for name in _NAMES:
      value = np.asarray(e_prompt[name])
      flat = value.reshape(value.shape[0], value.shape[1], -1).astype(np.float64)
      for j in range(flat.shape[1]):
        draws = rng.standard_normal((stop - start, flat.shape[2]))
        flat[:, j] = gram_schmidt(flat[:, j], start, draws)
      e_prompt[name] = flat.reshape(value.shape).astype(np.float32)
    return {**params, 'e_prompt': e_prompt}


def _restrict(x: Array, active: Array, frozen: Array) -> Array:
  """`x` [pool, ...] with rows >= f zeroed (they get no gradient) and rows < s frozen."""
  shape = (-1,) + (1,) * (x.ndim - 1)
  x = jnp.where(frozen.reshape(shape), jax.lax.stop_gradient(x), x)
  return jnp.where(active.reshape(shape), x, 0.0)


def component_weights(query: Array, key: Array, attention: Array) -> Array:
  """alpha[b, k, l] = cos(query[b] * attention[k, l], key[k, l]).

  Computed from three [B, pool, L] contractions instead of the [B, pool, L, D] product;
  norms are bounded below by 1e-12 as torch's F.normalize (zero vectors give weight 0).

  Args:
    query: [B, D].
    key: [pool, L, D].
    attention: [pool, L, D].

  Returns:
    [B, pool, L] float32.
  """
  dot = jnp.einsum('bd,kld->bkl', query, attention * key, precision=_HIGHEST)
  query_sq = jnp.einsum('bd,kld->bkl', jnp.square(query), jnp.square(attention), precision=_HIGHEST)
  key_sq = jnp.sum(jnp.square(key), axis=-1)
  return (dot * jax.lax.rsqrt(jnp.maximum(query_sq, _EPS_SQ))
          * jax.lax.rsqrt(jnp.maximum(key_sq, _EPS_SQ)))


def ortho_penalty(x: Array, active: Array) -> Array:
  """Sum over blocks of mean((X X^T - I)^2) over the active rows X of each block.

  Args:
    x: [pool, L, M] components (inactive rows may hold anything).
    active: [pool] bool, a prefix [0, f) of the pool.

  Returns:
    scalar float32.
  """
  gram = jnp.einsum('klm,jlm->lkj', x, x, precision=_HIGHEST)  # [L, pool, pool]
  error = jnp.square(gram - jnp.eye(x.shape[0], dtype=gram.dtype))
  pairs = active[:, None] & active[None, :]
  return jnp.sum(jnp.where(pairs, error, 0.0)) / jnp.sum(pairs)


def gram_schmidt(vectors: np.ndarray, start: int, draws: np.ndarray) -> np.ndarray:
  """Rows [start, start + m) of `vectors` re-drawn orthogonal to the rows before them.

  The official algorithm: for each new row k, a draw v minus its projections
  (v . u / u . u) u onto every row u < k (the kept old rows and the new rows made so far),
  all taken of v itself (classical Gram-Schmidt); the new rows are then scaled to unit norm.
  Rows of squared norm below 1e-8 are skipped, where the official code would redraw forever.

  Args:
    vectors: [n, M] components.
    start: first row to replace (s).
    draws: [m, M] standard-normal draws, one per new row.

  Returns:
    [n, M] float64; rows outside [start, start + m) equal to `vectors`.
  """
  out = np.array(vectors, np.float64)
  stop = start + len(draws)
  for k in range(start, stop):
    basis = out[:k]
    norm_sq = np.sum(np.square(basis), axis=1)
    usable = norm_sq >= _TINY_SQ
    coef = np.where(usable, basis @ draws[k - start] / np.where(usable, norm_sq, 1.0), 0.0)
    out[k] = draws[k - start] - coef @ basis
  out[start:stop] /= np.linalg.norm(out[start:stop], axis=1, keepdims=True)
  return out
