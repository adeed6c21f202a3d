"""Prompt methods behind one seam (see `base`): `config.method` names one of METHODS.

Adding a method: one module here with a `base.PromptMethod` subclass and its `from_config`,
an entry in METHODS, its configs and its tests.
"""

from typing import Optional

from models.methods import base
from models.methods import coda
from models.methods import dualprompt
from models.methods import l2p

METHODS = {
    'none': None,
    'l2p': l2p.L2P,
    'dualprompt': dualprompt.DualPrompt,
    'coda': coda.CodaPrompt,
}


def from_config(config) -> Optional[base.PromptMethod]:
  """The method `config.method` names, built from its fields (None for a plain ViT)."""
  if config.method not in METHODS:
    raise ValueError(f'Unknown method {config.method!r}; use one of {", ".join(METHODS)}.')
  method = METHODS[config.method]
  return None if method is None else method.from_config(config)
