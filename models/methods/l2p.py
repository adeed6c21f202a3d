"""L2P (Wang et al., CVPR 2022): a keyed pool of prompts, each image picking the prompts whose
keys best match its query.

Per task the method may force the task's own pool slots during training (`use_prompt_mask`,
task t on ids [t * top_k, (t + 1) * top_k), optionally in the first epoch only) and start a
task's slots from the previous task's (`shared_prompt_pool` / `shared_prompt_key`); its
auxiliary loss pulls the chosen keys towards the queries.
"""

import dataclasses
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from models import prompt as prompt_lib
from models.methods import base

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class L2P(base.PromptMethod):
  """The keyed E-Prompt pool.

  Attributes:
    pool_size: prompts in the pool.
    length: tokens per prompt (per block).
    top_k: prompts chosen per image.
    layers: blocks that receive the chosen prompts.
    prefix: prefix-tuning (True) or prompt-tuning (False) prompts.
    initializer: prompt initializer, a key of `prompt.INITIALIZERS`.
    prompt_key: learn keys; False uses each prompt's mean token (prompt-tuning only).
    prompt_key_init: key initializer.
    embedding_key: query kind, see `prompt.PromptPool`.
    batchwise_prompt: majority vote of prompt ids per vote group.
    batchwise_prompt_at_test: also vote at test time.
    vote_group_size: images per vote group (<= 0: the whole batch).
    pull_coeff: weight of the pull loss, -pull_coeff x reduce_sim (0: none).
    use_prompt_mask: train task t on its own slots instead of key matching.
    mask_first_epoch: force those slots in the first epoch of a task only.
    shared_prompt_pool: task t's prompts start from task t - 1's.
    shared_prompt_key: task t's keys start from task t - 1's.
  """
  pool_size: int
  length: int
  top_k: int
  layers: tuple[int, ...]
  prefix: bool
  initializer: str
  prompt_key: bool
  prompt_key_init: str
  embedding_key: str
  batchwise_prompt: bool
  batchwise_prompt_at_test: bool
  vote_group_size: int
  pull_coeff: float
  use_prompt_mask: bool
  mask_first_epoch: bool
  shared_prompt_pool: bool
  shared_prompt_key: bool

  @classmethod
  def from_config(cls, config) -> 'L2P':
    """The pool `config` describes (`prompt_pool_param`, `e_prompt_layer_idx`, ...)."""
    if config.use_g_prompt or not config.use_e_prompt:
      raise ValueError("L2P is the E-Prompt pool alone (use_e_prompt=True, use_g_prompt=False); "
                       "for a G-Prompt set method='dualprompt'.")
    return cls(**pool_fields(config))

  @property
  def needs_query(self) -> bool:
    return self.embedding_key == 'cls'

  @property
  def histogram_size(self) -> int:
    return self.pool_size

  @property
  def prompt_tokens(self) -> int:
    return 0 if self.prefix else self.top_k * self.length * len(self.layers)

  def check(self, dims: base.Dims) -> None:
    base.check_layers('e_prompt_layer_idx', self.layers, dims.num_layers)
    if not 1 <= self.top_k <= self.pool_size:
      raise ValueError(f'top_k={self.top_k} must be in [1, pool_size={self.pool_size}]; lower top_k '
                       'or enlarge the pool.')
    if self.length < 1:
      raise ValueError('prompt_pool_param.length must be >= 1.')
    for name, value in (('initializer', self.initializer), ('prompt_key_init', self.prompt_key_init)):
      if value not in prompt_lib.INITIALIZERS:
        raise ValueError(f'Unknown prompt_pool_param.{name} {value!r}; use one of '
                         f'{", ".join(prompt_lib.INITIALIZERS)}.')
    if self.embedding_key not in prompt_lib.EMBEDDING_KEYS:
      raise ValueError(f'Unknown embedding_key {self.embedding_key!r}; use one of '
                       f'{", ".join(prompt_lib.EMBEDDING_KEYS)}.')
    if not self.prompt_key and self.prefix:
      raise ValueError('prompt_key=False (keys from prompt means) needs prompt-tuning E-Prompts; '
                       'set prompt_key=True.')

  def select(self, x_embed: Array, cls_features: Optional[Array], task: Optional[dict[str, Array]],
             vote_mask: Optional[Array], train: bool, dims: base.Dims) -> prompt_lib.PromptSelection:
    """Runs the pool (parameters `e_prompt/prompt`, `e_prompt/key`) on a batch."""
    prompt_mask = force = None
    if train and self.use_prompt_mask:
      batch = x_embed.shape[0]
      prompt_mask = jnp.broadcast_to(task['prompt_ids'], (batch,) + task['prompt_ids'].shape)
      force = task['task_step'] < task['mask_steps']
    return prompt_lib.PromptPool(
        pool_size=self.pool_size, length=self.length, top_k=self.top_k,
        num_layers=len(self.layers), num_heads=dims.num_heads, prefix=self.prefix,
        initializer=self.initializer, prompt_key=self.prompt_key,
        prompt_key_init=self.prompt_key_init, embedding_key=self.embedding_key,
        batchwise_prompt=self.batchwise_prompt,
        batchwise_prompt_at_test=self.batchwise_prompt_at_test,
        vote_group_size=self.vote_group_size, name='e_prompt')(
            x_embed, cls_features, prompt_mask, vote_mask, train, force=force)

  def add_selection(self, selection: prompt_lib.PromptSelection, tokens: dict, prefixes: dict) -> None:
    """Appends the chosen prompts to their blocks' lists of `tokens` or `prefixes`."""
    target = prefixes if self.prefix else tokens
    for j, layer in enumerate(self.layers):
      target.setdefault(layer, []).append(selection.prompts[:, j])

  def selection_outputs(self, selection: prompt_lib.PromptSelection) -> tuple[Optional[Array], dict]:
    """(pull loss or None, aux) of a selection."""
    aux = dict(prompt_idx=selection.idx, similarity=selection.similarity,
               reduce_sim=selection.reduce_sim)
    loss = -self.pull_coeff * selection.reduce_sim if self.pull_coeff else None
    return loss, aux

  def prompts(self, x_embed, cls_features, task, vote_mask, train, dims) -> base.Prompts:
    selection = self.select(x_embed, cls_features, task, vote_mask, train, dims)
    tokens, prefixes = {}, {}
    self.add_selection(selection, tokens, prefixes)
    loss, aux = self.selection_outputs(selection)
    return base.Prompts(tokens=base.per_layer(tokens, dims.num_layers, axis=1),
                        prefixes=base.per_layer(prefixes, dims.num_layers, axis=2), loss=loss, aux=aux)

  def task_arrays(self, task, *, steps_per_epoch, num_steps) -> dict[str, np.ndarray]:
    """'prompt_ids' [top_k] int32, the task's slots; 'mask_steps', the steps that force them."""
    ids = np.arange(task * self.top_k, (task + 1) * self.top_k, dtype=np.int32)
    mask_steps = steps_per_epoch if self.mask_first_epoch else num_steps
    if self.use_prompt_mask and ids[-1] >= self.pool_size:
      # As the original: a task whose slots leave the pool selects by key matching instead.
      logging.warning('Task %d: prompt ids %d..%d are outside pool_size=%d; this task selects its '
                      'prompts by key matching (no prompt mask).', task, ids[0], ids[-1], self.pool_size)
      mask_steps = 0
    return {'prompt_ids': ids, 'mask_steps': np.int32(mask_steps if self.use_prompt_mask else 0)}

  def start_task(self, params: Any, task: int, *, seed: int) -> Any:
    """With a shared pool, task t's slots start from task t - 1's (prompts and/or keys)."""
    del seed
    if task <= 0 or 'e_prompt' not in params:
      return params
    new = slice(task * self.top_k, (task + 1) * self.top_k)
    old = slice((task - 1) * self.top_k, task * self.top_k)
    e_prompt = dict(params['e_prompt'])
    for name, enabled in (('prompt', self.shared_prompt_pool), ('key', self.shared_prompt_key)):
      if enabled and name in e_prompt and new.stop <= e_prompt[name].shape[0]:
        e_prompt[name] = jnp.asarray(e_prompt[name]).at[new].set(jnp.asarray(e_prompt[name])[old])
    return {**params, 'e_prompt': e_prompt}


def pool_fields(config) -> dict[str, Any]:
  """The L2P fields of the pool `config` describes (`prompt_pool_param`, `e_prompt_layer_idx`, ...)."""
  pool = config.prompt_pool_param
  if config.use_e_prompt and not config.prompt_pool:
    raise ValueError('The E-Prompts are drawn from the keyed pool; set prompt_pool=True.')
  if (config.use_e_prompt and pool.vote_group_size > 0
      and config.per_device_batch_size % pool.vote_group_size):
    # As the original's per-device vote: the groups tile each device's batch.
    raise ValueError(f'prompt_pool_param.vote_group_size={pool.vote_group_size} does not divide '
                     f'per_device_batch_size={config.per_device_batch_size}: the vote groups must tile '
                     "each device's batch; choose a divisor, or -1 for one group per device.")
  return dict(
      pool_size=pool.pool_size, length=pool.length, top_k=pool.top_k,
      layers=block_indices(config.e_prompt_layer_idx), prefix=config.use_prefix_tune_for_e_prompt,
      initializer=pool.initializer, prompt_key=pool.prompt_key,
      prompt_key_init=pool.prompt_key_init, embedding_key=pool.embedding_key,
      batchwise_prompt=pool.batchwise_prompt, batchwise_prompt_at_test=pool.batchwise_prompt_at_test,
      # The original voted per device (groups of per_device_batch_size images).
      vote_group_size=pool.vote_group_size if pool.vote_group_size > 0 else _device_batch(config),
      pull_coeff=float(config.pull_constraint_coeff) if config.pull_constraint else 0.0,
      use_prompt_mask=pool.use_prompt_mask, mask_first_epoch=pool.mask_first_epoch,
      shared_prompt_pool=pool.shared_prompt_pool, shared_prompt_key=pool.shared_prompt_key)


def _device_batch(config) -> int:
  """Images of a device's training batch: twice per_device_batch_size when replay batches
  join the task's (the original's vote then covers both)."""
  joined = config.continual.replay.num_samples_per_class > 0 and not config.continual.review_trick
  return config.per_device_batch_size * (2 if joined else 1)


def block_indices(value) -> tuple[int, ...]:
  """A config's block indices (an int or a sequence) as a tuple."""
  return (value,) if isinstance(value, int) else tuple(int(i) for i in value)
