"""Tests of the ViT variants, parameter names and the model factory."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar100_dualprompt
from models import factory
from models import vit
from models.methods import dualprompt
from models.methods import l2p
from models.prompted_vit import PromptedViT
from tests import model_util

# Counts of the original release with a 1000-class head, 224x224 input.
PINNED_COUNTS = {
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
}


def _analytic_count(v: vit.ViTVariant, image: int = 224,
                    classes: int = 1000) -> int:
  d, m = v.hidden_size, v.mlp_dim
  patches = (image // v.patch_size) ** 2
  embedding = v.patch_size ** 2 * 3 * d + d
  cls_and_pos = d + (patches + 1) * d
  block = (2 * 2 * d  # two LayerNorms
           + 4 * (d * d + d)  # query, key, value, out
           + (d * m + m) + (m * d + d))  # MLP
  return (embedding + cls_and_pos + v.num_layers * block + 2 * d
          + d * classes + classes)


def fast_jit(fun, **kwargs):
  """jax.jit without LLVM's costly passes: compiling, not running, dominates
  these tests on CPU."""
  return jax.jit(fun, compiler_options={
      'xla_backend_optimization_level': 0,
      'xla_llvm_disable_expensive_passes': True}, **kwargs)


def _shapes(model, image=224):
  return factory.param_shapes(model, image)


def _plain(name, classes=1000, **kwargs):
  v = vit.get_variant(name)
  return PromptedViT(
      hidden_size=v.hidden_size, patch_size=v.patch_size,
      num_layers=v.num_layers, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
      num_classes=classes, **model_util.split(kwargs))


@pytest.mark.parametrize('name', sorted(PINNED_COUNTS))
def test_parameter_count(name):
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(_shapes(_plain(name))))
  assert count == _analytic_count(vit.VARIANTS[name]) == PINNED_COUNTS[name]


def test_variant_table():
  assert vit.VARIANTS['ViT-B_16'] == vit.ViTVariant(
      hidden_size=768, patch_size=16, num_layers=12, num_heads=12,
      mlp_dim=3072)
  assert vit.get_variant('ViT-demo') == vit.ViTVariant(
      hidden_size=64, patch_size=4, num_layers=6, num_heads=4, mlp_dim=256)
  assert vit.get_variant('ViT-test') == vit.ViTVariant(
      hidden_size=32, patch_size=8, num_layers=6, num_heads=2, mlp_dim=64)
  assert set(vit.VARIANTS) == {
      'ViT-Ti_16', 'ViT-S_16', 'ViT-S_32', 'ViT-B_16', 'ViT-B_32', 'ViT-B_8',
      'ViT-L_16', 'ViT-L_32', 'ViT-H_14', 'ViT-demo', 'ViT-test'}


def test_unknown_variant_lists_valid_names():
  with pytest.raises(ValueError) as err:
    vit.get_variant('ViT-X_99')
  message = str(err.value)
  assert 'ViT-X_99' in message and 'ViT-B_16' in message
  assert '\n' not in message


def _block_shapes(i, d=32, h=2, mlp=64):
  prefix = f'Transformer/encoderblock_{i}/'
  attn = prefix + 'MultiHeadDotProductAttention_1/'
  shapes = {
      prefix + 'LayerNorm_0/scale': (d,), prefix + 'LayerNorm_0/bias': (d,),
      prefix + 'LayerNorm_2/scale': (d,), prefix + 'LayerNorm_2/bias': (d,),
      prefix + 'MlpBlock_3/Dense_0/kernel': (d, mlp),
      prefix + 'MlpBlock_3/Dense_0/bias': (mlp,),
      prefix + 'MlpBlock_3/Dense_1/kernel': (mlp, d),
      prefix + 'MlpBlock_3/Dense_1/bias': (d,),
      attn + 'out/kernel': (h, d // h, d), attn + 'out/bias': (d,),
  }
  for name in ('query', 'key', 'value'):
    shapes[attn + name + '/kernel'] = (d, h, d // h)
    shapes[attn + name + '/bias'] = (h, d // h)
  return shapes


def _backbone_shapes(num_patches=16, d=32, classes=10):
  shapes = {
      'embedding/kernel': (8, 8, 3, d), 'embedding/bias': (d,),
      'cls': (1, 1, d),
      'Transformer/posembed_input/pos_embedding': (1, 1 + num_patches, d),
      'Transformer/encoder_norm/scale': (d,),
      'Transformer/encoder_norm/bias': (d,),
      'head/kernel': (d, classes), 'head/bias': (classes,),
  }
  for i in range(6):
    shapes.update(_block_shapes(i))
  return shapes


def _flat_shapes(params):
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def test_parameter_tree_plain():
  assert _flat_shapes(_shapes(_plain('ViT-test', 10), 32)) == _backbone_shapes()


def test_parameter_tree_dualprompt_prefix():
  model = _plain('ViT-test', 10, use_g_prompt=True, g_prompt_length=5,
                 g_prompt_layers=(0, 1), use_e_prompt=True,
                 e_prompt_layers=(2, 3, 4), e_prompt_prefix=True, pool_size=10,
                 prompt_length=7, top_k=1)
  want = _backbone_shapes()
  want.update({'g_prompt/prompt': (2, 2, 5, 2, 16),
               'e_prompt/prompt': (10, 3, 2, 7, 2, 16),
               'e_prompt/key': (10, 32)})
  assert _flat_shapes(_shapes(model, 32)) == want


def test_parameter_tree_l2p_prompt_tuning():
  model = _plain('ViT-test', 10, classifier='prompt', use_e_prompt=True,
                 e_prompt_layers=(0,), pool_size=10, prompt_length=5, top_k=5)
  want = _backbone_shapes()
  want.update({'e_prompt/prompt': (10, 5, 32), 'e_prompt/key': (10, 32)})
  assert _flat_shapes(_shapes(model, 32)) == want


def test_prompt_names_escape_freezing_substrings():
  model = _plain('ViT-test', 10, use_g_prompt=True, g_prompt_layers=(0,),
                 use_e_prompt=True, e_prompt_layers=(1,))
  for path in _flat_shapes(_shapes(model, 32)):
    frozen = any(s in path for s in ('encoder', 'embedding', 'cls'))
    trainable = path.split('/')[0] in ('e_prompt', 'g_prompt', 'head')
    assert frozen != trainable, path


# --- Factory ----------------------------------------------------------------


def _config(**overrides) -> ml_collections.ConfigDict:
  """The DualPrompt config on the tiny model, 4 images a device."""
  config = cifar100_dualprompt.get_config()
  config.model_name = 'ViT-test'
  config.per_device_batch_size = 4
  config.update_from_flattened_dict(overrides)
  return config


def test_create_model_reads_the_config():
  model = factory.create_model(
      _config(dtype='bfloat16', attention_impl='fused', temperature=2.0,
              **{'prompt_pool_param.batchwise_prompt_at_test': False}), 7)
  assert (model.hidden_size, model.num_layers, model.num_classes) == (32, 6, 7)
  method = model.method
  assert isinstance(method, dualprompt.DualPrompt)
  assert method.use_g_prompt and method.g_layers == (0, 1)
  assert method.g_prefix and method.g_length == 5
  assert method.use_e_prompt and method.layers == (2, 3, 4)
  assert method.prefix and method.pool_size == 10
  assert (method.length, method.top_k) == (5, 1)
  assert method.batchwise_prompt and not method.batchwise_prompt_at_test
  assert method.vote_group_size == 4
  assert method.use_prompt_mask and method.shared_prompt_pool and method.pull_coeff == 1.0
  assert model.dtype == jnp.bfloat16 and model.attention_impl == 'fused'
  assert model.temperature == 2.0


def test_create_model_l2p_and_plain():
  model = factory.create_model(
      _config(method='l2p', use_g_prompt=False, e_prompt_layer_idx=(0,),
              use_prefix_tune_for_e_prompt=False, vit_classifier='prompt',
              **{'prompt_pool_param.top_k': 5}), 10)
  assert type(model.method) is l2p.L2P  # pylint: disable=unidiomatic-typecheck
  assert not model.method.prefix
  assert model.classifier == 'prompt' and model.total_prompt_len == 25
  plain = factory.create_model(_config(method='none', vit_classifier='token'), 10)
  assert plain.method is None and not plain.needs_query
  assert plain.classifier == 'token' and plain.dtype == jnp.float32


def test_query_model_has_no_prompts():
  query = factory.create_query_model(
      _config(vit_classifier='prompt', norm_pre_logits=True, temperature=3.0),
      10)
  assert query.method is None
  assert query.classifier == 'token' and not query.norm_pre_logits
  assert query.temperature == 1.0 and query.hidden_size == 32
  names = set(_shapes(query, 32))
  assert names == {'embedding', 'cls', 'Transformer', 'head'}


@pytest.mark.parametrize('overrides,needle', [
    ({'prompt_pool_param.top_k': 11}, 'top_k'),
    ({'e_prompt_layer_idx': [2, 6]}, 'e_prompt_layer_idx'),
    ({'g_prompt_layer_idx': [-1]}, 'g_prompt_layer_idx'),
    ({'vit_classifier': 'cls'}, 'vit_classifier'),
    ({'vit_classifier': 'prompt'}, 'prompt-tuning'),
    ({'use_cls_token': False}, 'use_cls_token'),
    ({'prompt_pool_param.embedding_key': 'avg'}, 'embedding_key'),
    ({'prompt_pool_param.initializer': 'xavier'}, 'initializer'),
    ({'prompt_pool_param.prompt_key_init': 'ones'}, 'prompt_key_init'),
    ({'prompt_pool_param.prompt_key': False}, 'prompt_key'),
    ({'prompt_pool': False}, 'prompt_pool'),
    ({'model_name': 'ViT-Q_3'}, 'ViT-B_16'),
    ({'dtype': 'float16'}, 'dtype'),
    ({'attention_impl': 'flash'}, 'attention_impl'),
    ({'method': 'l2p'}, "method='dualprompt'"),
    ({'method': 'l2q'}, 'Unknown method'),
    ({'use_g_prompt': False, 'use_e_prompt': False}, "method='none'"),
])
def test_bad_config_raises_one_line_value_error(overrides, needle):
  with pytest.raises(ValueError) as err:
    factory.create_model(_config(**overrides), 10)
  assert needle in str(err.value) and '\n' not in str(err.value)


def test_init_values():
  # One block keeps compilation of the ~20 random initialisers short.
  model = _plain('ViT-test', 10, use_g_prompt=True, g_prompt_layers=(0,),
                 use_e_prompt=True, e_prompt_layers=(0,), e_prompt_prefix=True,
                 pool_size=10).clone(num_layers=1)
  init = fast_jit(functools.partial(model.init, train=False))
  # RngBitGenerator keys compile much faster than threefry on CPU.
  rng = jax.random.key(0, impl='unsafe_rbg')
  params = init(rng, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32)))['params']
  assert not np.any(params['head']['kernel'])
  assert not np.any(params['head']['bias']) and not np.any(params['cls'])
  for prompt in (params['e_prompt']['prompt'], params['e_prompt']['key'],
                 params['g_prompt']['prompt']):
    assert 0.0 <= float(prompt.min()) and float(prompt.max()) < 0.01
  pos = params['Transformer']['posembed_input']['pos_embedding']
  assert 0.015 < float(pos.std()) < 0.025


# --- ViT-B/16 at full size ---------------------------------------------------


def _fill(shapes, seed):
  """Cheap stand-in values for big parameter trees: one random block of
  NumPy numbers, repeated (drawing 86M numbers costs more than the test)."""
  block = np.random.default_rng(seed).random(10007, dtype=np.float32)
  block = (block - 0.5) * 0.05

  def draw(path, leaf):
    if path[-1].key == 'scale':
      return np.ones(leaf.shape, np.float32)
    return np.resize(block, leaf.shape)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize('method', ['l2p', 'dualprompt'])
def test_vit_b16_forward_at_224(method):
  if method == 'l2p':
    config = _config(
        model_name='ViT-B_16', method='l2p', use_g_prompt=False, e_prompt_layer_idx=(0,),
        use_prefix_tune_for_e_prompt=False, vit_classifier='prompt',
        **{'prompt_pool_param.top_k': 5})
  else:
    config = _config(model_name='ViT-B_16')
  model = factory.create_model(config, 100)
  # Initialisation is traced at full size; values come from `_fill`.
  params = _fill(_shapes(model, 224), seed=0)
  rng = np.random.default_rng(1)
  images = rng.random((2, 224, 224, 3), dtype=np.float32)
  queries = rng.normal(size=(2, 768)).astype(np.float32)
  logits, aux = fast_jit(model.apply)({'params': params}, images, queries)
  top_k = 5 if method == 'l2p' else 1
  assert logits.shape == (2, 100) and aux['prompt_idx'].shape == (2, top_k)
  assert aux['pre_logits'].shape == (2, 768)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(aux['pre_logits']))
  assert np.any(logits)
