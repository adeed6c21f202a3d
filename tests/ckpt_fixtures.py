"""Tiny fake pretrained checkpoints in the official file layouts.

Tests write these instead of downloading real weights. The writers take a
nested PromptedViT-style parameter dict (`embedding/kernel` [p, p, 3, D], ...,
`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel`
[D, H, hd], ...) and lay it out as the ViT release `.npz` or as timm's
`.safetensors` would. They are written independently of libml.pretrained so
that the loader is checked against a second reading of the formats.
"""

import numpy as np
import safetensors.numpy

_NOT_IN_CHECKPOINTS = ('e_prompt', 'g_prompt')
_LINEN_NAMES = {
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'MlpBlock_0',
}


def make_vit_params(seed: int = 0, *, hidden: int = 32, num_heads: int = 2,
                    mlp_dim: int = 64, patch: int = 8, num_layers: int = 2,
                    grid: int = 4, num_classes: int = 10,
                    with_prompts: bool = True) -> dict:
  """Random PromptedViT-style parameters (float32, every leaf distinct).

  With `with_prompts`, adds DualPrompt-style prefix prompts:
  `e_prompt/prompt` [5, 1, 2, 3, H, hd], `e_prompt/key` [5, D] and
  `g_prompt/prompt` [1, 2, 2, H, hd].
  """
  rng = np.random.default_rng(seed)
  hd = hidden // num_heads

  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)

  def block():
    attention = {name: {'kernel': normal(hidden, num_heads, hd),
                        'bias': normal(num_heads, hd)}
                 for name in ('query', 'key', 'value')}
    attention['out'] = {'kernel': normal(num_heads, hd, hidden),
                        'bias': normal(hidden)}
    return {
        'LayerNorm_0': {'scale': normal(hidden), 'bias': normal(hidden)},
        'MultiHeadDotProductAttention_1': attention,
        'LayerNorm_2': {'scale': normal(hidden), 'bias': normal(hidden)},
        'MlpBlock_3': {
            'Dense_0': {'kernel': normal(hidden, mlp_dim),
                        'bias': normal(mlp_dim)},
            'Dense_1': {'kernel': normal(mlp_dim, hidden),
                        'bias': normal(hidden)},
        },
    }

  transformer = {'posembed_input': {
      'pos_embedding': normal(1, 1 + grid * grid, hidden)}}
  for i in range(num_layers):
    transformer[f'encoderblock_{i}'] = block()
  transformer['encoder_norm'] = {'scale': normal(hidden),
                                 'bias': normal(hidden)}
  params = {
      'embedding': {'kernel': normal(patch, patch, 3, hidden),
                    'bias': normal(hidden)},
      'cls': normal(1, 1, hidden),
      'Transformer': transformer,
      'head': {'kernel': normal(hidden, num_classes),
               'bias': normal(num_classes)},
  }
  if with_prompts:
    params['e_prompt'] = {'prompt': normal(5, 1, 2, 3, num_heads, hd),
                          'key': normal(5, hidden)}
    params['g_prompt'] = {'prompt': normal(1, 2, 2, num_heads, hd)}
  return params


def flatten(params: dict, prefix: str = '') -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for name, value in params.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{name}/'))
    else:
      out[f'{prefix}{name}'] = np.asarray(value)
  return out


def write_npz(path, params: dict, *, prefix: str = '',
              linen_names: bool = False, with_head: bool = True) -> None:
  """Writes `params` as the ViT release `.npz` does.

  Args:
    path: file to write (no `.npz` suffix is added).
    params: nested PromptedViT-style parameters; prompts are left out.
    prefix: prepended to every key, e.g. 'opt/target/'.
    linen_names: name block children as Linen's automatic naming does
      (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`).
    with_head: also write `head/*` (when in `params`) and a `pre_logits`
      Dense [D, D], as the release files have them.
  """
  flat = {}
  for key, value in flatten(params).items():
    root = key.split('/')[0]
    if root in _NOT_IN_CHECKPOINTS or (root == 'head' and not with_head):
      continue
    if linen_names:
      key = '/'.join(_LINEN_NAMES.get(part, part) for part in key.split('/'))
    flat[prefix + key] = value
  if with_head:
    hidden = params['cls'].shape[-1]
    rng = np.random.default_rng(123)
    flat[prefix + 'pre_logits/kernel'] = rng.normal(
        size=(hidden, hidden)).astype(np.float32)
    flat[prefix + 'pre_logits/bias'] = np.ones(hidden, np.float32)
  with open(path, 'wb') as f:  # A file object stops numpy appending '.npz'.
    np.savez(f, **flat)


def write_safetensors(path, params: dict, *, with_head: bool = False) -> None:
  """Writes `params` under timm's ViT names and PyTorch layouts.

  Linear weights are [out, in]; q, k and v are fused into `attn.qkv` with
  rows q, then k, then v; the patch convolution is OIHW. Like timm's
  `vit_base_patch16_224.orig_in21k`, the head is left out unless `with_head`.
  """
  def linear(kernel_in_out):
    return np.asarray(kernel_in_out).T

  tensors = {
      'cls_token': params['cls'],
      'pos_embed': params['Transformer']['posembed_input']['pos_embedding'],
      # [p, p, 3, D] (HWIO) -> [D, 3, p, p] (OIHW)
      'patch_embed.proj.weight': np.asarray(
          params['embedding']['kernel']).transpose(3, 2, 0, 1),
      'patch_embed.proj.bias': params['embedding']['bias'],
      'norm.weight': params['Transformer']['encoder_norm']['scale'],
      'norm.bias': params['Transformer']['encoder_norm']['bias'],
  }
  i = 0
  while f'encoderblock_{i}' in params['Transformer']:
    block = params['Transformer'][f'encoderblock_{i}']
    attention = block['MultiHeadDotProductAttention_1']
    hidden = attention['query']['kernel'].shape[0]
    name = f'blocks.{i}.'
    tensors[name + 'norm1.weight'] = block['LayerNorm_0']['scale']
    tensors[name + 'norm1.bias'] = block['LayerNorm_0']['bias']
    tensors[name + 'attn.qkv.weight'] = np.concatenate(
        [linear(np.reshape(attention[n]['kernel'], (hidden, hidden)))
         for n in ('query', 'key', 'value')], axis=0)
    tensors[name + 'attn.qkv.bias'] = np.concatenate(
        [np.reshape(attention[n]['bias'], -1)
         for n in ('query', 'key', 'value')])
    tensors[name + 'attn.proj.weight'] = linear(
        np.reshape(attention['out']['kernel'], (hidden, hidden)))
    tensors[name + 'attn.proj.bias'] = attention['out']['bias']
    tensors[name + 'norm2.weight'] = block['LayerNorm_2']['scale']
    tensors[name + 'norm2.bias'] = block['LayerNorm_2']['bias']
    mlp = block['MlpBlock_3']
    tensors[name + 'mlp.fc1.weight'] = linear(mlp['Dense_0']['kernel'])
    tensors[name + 'mlp.fc1.bias'] = mlp['Dense_0']['bias']
    tensors[name + 'mlp.fc2.weight'] = linear(mlp['Dense_1']['kernel'])
    tensors[name + 'mlp.fc2.bias'] = mlp['Dense_1']['bias']
    i += 1
  if with_head and 'head' in params:
    tensors['head.weight'] = linear(params['head']['kernel'])
    tensors['head.bias'] = params['head']['bias']
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
      str(path))
