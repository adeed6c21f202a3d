"""Builds a prompt method from flat fields, for tests that describe a prompted model in a line.

`method(use_e_prompt=True, e_prompt_layers=(0,), pool_size=6, prompt_length=3, top_k=2)` is
the L2P pool; with `use_g_prompt=True` it is DualPrompt. Unnamed fields take the values below.
"""

from models.methods import dualprompt
from models.methods import l2p

_POOL = dict(e_prompt_layers=(), e_prompt_prefix=False, pool_size=10, prompt_length=5, top_k=1,
             prompt_init='uniform', prompt_key=True, prompt_key_init='uniform', embedding_key='cls',
             batchwise_prompt=False, batchwise_prompt_at_test=True, vote_group_size=0, pull_coeff=0.0,
             use_prompt_mask=False, mask_first_epoch=False, shared_prompt_pool=False,
             shared_prompt_key=False)
_G = dict(g_prompt_length=5, g_prompt_layers=(), g_prompt_prefix=True)
FIELDS = ('use_e_prompt', 'use_g_prompt', *_POOL, *_G)


def method(use_e_prompt: bool = False, use_g_prompt: bool = False, **fields):
  """L2P (E-Prompt pool only), DualPrompt (with a G-Prompt) or None (neither)."""
  unknown = set(fields) - set(_POOL) - set(_G)
  assert not unknown, unknown
  f = {**_POOL, **_G, **fields}
  pool = dict(pool_size=f['pool_size'], length=f['prompt_length'], top_k=f['top_k'],
              layers=tuple(f['e_prompt_layers']), prefix=f['e_prompt_prefix'], initializer=f['prompt_init'],
              prompt_key=f['prompt_key'], prompt_key_init=f['prompt_key_init'],
              embedding_key=f['embedding_key'], batchwise_prompt=f['batchwise_prompt'],
              batchwise_prompt_at_test=f['batchwise_prompt_at_test'], vote_group_size=f['vote_group_size'],
              pull_coeff=f['pull_coeff'], use_prompt_mask=f['use_prompt_mask'],
              mask_first_epoch=f['mask_first_epoch'], shared_prompt_pool=f['shared_prompt_pool'],
              shared_prompt_key=f['shared_prompt_key'])
  if use_g_prompt:
    return dualprompt.DualPrompt(**pool, use_e_prompt=use_e_prompt, use_g_prompt=True,
                                 g_length=f['g_prompt_length'], g_layers=tuple(f['g_prompt_layers']),
                                 g_prefix=f['g_prompt_prefix'])
  return l2p.L2P(**pool) if use_e_prompt else None


def split(kwargs: dict) -> dict:
  """PromptedViT kwargs with the flat prompt fields among them replaced by `method=`."""
  prompt = {k: kwargs.pop(k) for k in list(kwargs) if k in FIELDS}
  return {**kwargs, 'method': method(**prompt)}
