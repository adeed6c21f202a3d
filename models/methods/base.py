"""The seam between prompt methods and everything else.

A prompt method (L2P, DualPrompt, CODA-Prompt, ...) is one module holding a frozen dataclass
that subclasses `PromptMethod`. The model, the steps, the evaluator and the task loop call
only the members below, so they know no method by name:

- `prompts`: runs inside `PromptedViT.__call__`, creates the method's parameters there and
  returns what each block receives, the method's auxiliary loss and its extra outputs
  (test-time selection included);
- `task_arrays`: the per-task arrays the train and eval steps pass back to `prompts`;
- `start_task`: the host-side edit of the parameters at the start of a task;
- `check`: raises ValueError when the method cannot run on the backbone;
- `needs_query`, `histogram_size`, `prompt_tokens`: static facts the others plan with.

Each method also has a classmethod `from_config(config)` that reads its fields; `METHODS` in
`models/methods/__init__.py` maps `config.method` to it.

Methods raise ValueError for fields that describe no valid method; the command line turns
that into its one-line `error:`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Dims(NamedTuple):
  """The backbone sizes a method builds its parameters for.

  Attributes:
    num_layers: Transformer blocks.
    hidden_size: width D.
    num_heads: attention heads H (prefixes are [.., H, D // H]).
  """
  num_layers: int
  hidden_size: int
  num_heads: int


class Prompts(NamedTuple):
  """What a method hands the backbone for one batch.

  Attributes:
    tokens: per block, [B, P, D] prompt tokens prepended to the block's input, or None.
    prefixes: per block, [B, 2, P, H, D // H] keys (index 0) and values (index 1) added to
      the block's attention, or None.
    loss: scalar float32 added to the training loss (already weighted), or None.
    aux: extra outputs, returned in the model's aux: scalars there are logged as train
      metrics; 'prompt_idx' [B, k] int32, when present, feeds the eval histogram.
  """
  tokens: tuple[Optional[Array], ...]
  prefixes: tuple[Optional[Array], ...]
  loss: Optional[Array]
  aux: dict[str, Array]


class PromptMethod:
  """Interface of a prompt method; subclasses are frozen (hashable) dataclasses."""

  @property
  def needs_query(self) -> bool:
    """Whether `prompts` needs the frozen query ViT's [B, D] class-token features."""
    raise NotImplementedError

  @property
  def histogram_size(self) -> int:
    """Number of distinct prompt ids aux['prompt_idx'] takes (0: no discrete selection)."""
    return 0

  @property
  def prompt_tokens(self) -> int:
    """Prompt tokens the encoder's output holds before the class token (prompt-tuning only)."""
    return 0

  def check(self, dims: Dims) -> None:
    """Raises ValueError if the method cannot run on a backbone of `dims`."""

  def prompts(self, x_embed: Array, cls_features: Optional[Array], task: Optional[dict[str, Array]],
              vote_mask: Optional[Array], train: bool, dims: Dims) -> Prompts:
    """Builds the prompts of a batch; called inside the model's compact `__call__`.

    Args:
      x_embed: [B, N, D] embedded patches.
      cls_features: [B, D] query features, when `needs_query`.
      task: the arrays of `task_arrays` (plus 'task_step', int32, at train time), or None.
      vote_mask: [B] bool, False for padding images.
      train: training mode.
      dims: backbone sizes.
    """
    raise NotImplementedError

  def task_arrays(self, task: int, *, steps_per_epoch: int, num_steps: int) -> dict[str, np.ndarray]:
    """Per-task arrays for `prompts`, fixed during task `task` (of `num_steps` steps)."""
    del task, steps_per_epoch, num_steps
    return {}

  def start_task(self, params: Any, task: int, *, seed: int) -> Any:
    """Host parameters at the start of `task`, before its first step (deterministic in `seed`)."""
    del task, seed
    return params


def check_layers(name: str, layers: tuple[int, ...], depth: int) -> None:
  """Raises ValueError unless `layers` are distinct block indices below `depth`."""
  bad = [i for i in layers if not 0 <= i < depth]
  if bad or len(set(layers)) != len(layers) or not layers:
    raise ValueError(f'{name}={list(layers)} must be distinct block indices in [0, {depth}); '
                     'fix the config.')


def per_layer(values: dict[int, list[Array]], num_layers: int, axis: int) -> tuple[Optional[Array], ...]:
  """{block: [arrays]} -> for each of `num_layers` blocks, its arrays concatenated on `axis`, or None."""
  return tuple(jnp.concatenate(values[i], axis=axis) if values.get(i) else None for i in range(num_layers))
