"""DualPrompt (Wang et al., ECCV 2022): L2P's keyed pool (the E-Prompts, usually prefixes at
blocks 2-4 with one slot per task) plus one G-Prompt shared by every task (blocks 0-1).
"""

import dataclasses

import jax.numpy as jnp

from models import prompt as prompt_lib
from models.methods import base
from models.methods import l2p


@dataclasses.dataclass(frozen=True)
class DualPrompt(l2p.L2P):
  """L2P's pool plus the G-Prompt; either may be switched off for ablations.

  Attributes (besides L2P's, which describe the E-Prompt pool):
    use_e_prompt: add the E-Prompt pool.
    use_g_prompt: add the G-Prompt.
    g_length: G-Prompt tokens per block.
    g_layers: blocks that receive the G-Prompt.
    g_prefix: prefix-tuning (True) or prompt-tuning G-Prompt.
  """
  use_e_prompt: bool
  use_g_prompt: bool
  g_length: int
  g_layers: tuple[int, ...]
  g_prefix: bool

  @classmethod
  def from_config(cls, config) -> 'DualPrompt':
    return cls(**l2p.pool_fields(config), use_e_prompt=config.use_e_prompt, use_g_prompt=config.use_g_prompt,
               g_length=config.g_prompt_length, g_layers=l2p.block_indices(config.g_prompt_layer_idx),
               g_prefix=config.use_prefix_tune_for_g_prompt)

  @property
  def needs_query(self) -> bool:
    return self.use_e_prompt and super().needs_query

  @property
  def histogram_size(self) -> int:
    return self.pool_size if self.use_e_prompt else 0

  @property
  def prompt_tokens(self) -> int:
    g = 0 if self.g_prefix else self.g_length * len(self.g_layers)
    return g * self.use_g_prompt + (super().prompt_tokens if self.use_e_prompt else 0)

  def check(self, dims: base.Dims) -> None:
    if not (self.use_e_prompt or self.use_g_prompt):
      raise ValueError("DualPrompt without G-Prompt and E-Prompts is a plain ViT; set method='none'.")
    if self.use_e_prompt:
      super().check(dims)
    if self.use_g_prompt:
      base.check_layers('g_prompt_layer_idx', self.g_layers, dims.num_layers)
      if self.g_length < 1:
        raise ValueError('g_prompt_length must be >= 1.')

  def prompts(self, x_embed, cls_features, task, vote_mask, train, dims) -> base.Prompts:
    """The G-Prompt comes first in each block's tokens or prefixes, then the E-Prompts."""
    selection = (self.select(x_embed, cls_features, task, vote_mask, train, dims)
                 if self.use_e_prompt else None)
    tokens, prefixes = {}, {}
    if self.use_g_prompt:
      g = prompt_lib.GPrompt(
          length=self.g_length, num_layers=len(self.g_layers), hidden_size=dims.hidden_size,
          num_heads=dims.num_heads, prefix=self.g_prefix,
          # The original draws the G-Prompt uniformly whatever `initializer` says.
          initializer='uniform', name='g_prompt')()
      batch = x_embed.shape[0]
      target = prefixes if self.g_prefix else tokens
      for j, layer in enumerate(self.g_layers):
        target.setdefault(layer, []).append(jnp.broadcast_to(g[j], (batch,) + g.shape[1:]))
    loss, aux = None, {}
    if selection is not None:
      self.add_selection(selection, tokens, prefixes)
      loss, aux = self.selection_outputs(selection)
    return base.Prompts(tokens=base.per_layer(tokens, dims.num_layers, axis=1),
                        prefixes=base.per_layer(prefixes, dims.num_layers, axis=2), loss=loss, aux=aux)

