"""Tests for libml.pretrained: file formats, names, resizing, errors."""

import jax
import numpy as np
import pytest
import safetensors.numpy

from libml import pretrained
from libml.errors import UserError
from libml.pos_embedding import resize_pos_embedding
from tests import ckpt_fixtures

_POS = 'Transformer/posembed_input/pos_embedding'
_BACKBONE_ROOTS = ('embedding', 'cls', 'Transformer')


def _init_params(**dims):
  """Fresh model parameters: different values from any file, zero head."""
  params = ckpt_fixtures.make_vit_params(seed=1, **dims)
  params['head'] = jax.tree.map(np.zeros_like, params['head'])
  return params


def _assert_loaded(loaded, file_params, init):
  """Backbone equals the file's arrays; everything else is init's."""
  assert jax.tree.structure(loaded) == jax.tree.structure(init)
  flat_loaded = ckpt_fixtures.flatten(loaded)
  flat_file = ckpt_fixtures.flatten(file_params)
  flat_init = ckpt_fixtures.flatten(init)
  for key, value in flat_loaded.items():
    assert value.dtype == np.float32, key
    expected = (flat_file if key.split('/')[0] in _BACKBONE_ROOTS
                else flat_init)[key]
    np.testing.assert_array_equal(value, expected, err_msg=key)
  # The file's head differed; the loaded one must not have come from it.
  assert not np.any(flat_loaded['head/kernel'])


def _load(tmp_path, writer, file_params, init, model_name='ViT-test', **kw):
  path = tmp_path / ('vit.npz' if writer is ckpt_fixtures.write_npz
                     else 'model.safetensors')
  writer(path, file_params, **kw)
  return pretrained.load_pretrained(str(path), init, model_name)


def test_npz_backbone_comes_from_file_prompts_and_head_stay_fresh(tmp_path):
  # The file's head has another number of classes, as a 21k-class head would.
  file_params = ckpt_fixtures.make_vit_params(seed=0, num_classes=7)
  init = _init_params()
  loaded = _load(tmp_path, ckpt_fixtures.write_npz, file_params, init)
  _assert_loaded(loaded, file_params, init)


def test_npz_with_opt_target_prefix(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  init = _init_params()
  loaded = _load(tmp_path, ckpt_fixtures.write_npz, file_params, init,
                 prefix='opt/target/')
  _assert_loaded(loaded, file_params, init)


def test_npz_with_linen_auto_names(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  init = _init_params()
  path = tmp_path / 'linen.npz'
  ckpt_fixtures.write_npz(path, file_params, linen_names=True)
  with np.load(path) as data:
    names = set(data.files)
  assert 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel' in names
  assert 'Transformer/encoderblock_1/LayerNorm_1/scale' in names
  assert not any('LayerNorm_2' in name for name in names)
  loaded = pretrained.load_pretrained(str(path), init, 'ViT-test')
  _assert_loaded(loaded, file_params, init)


def test_safetensors_and_npz_of_same_weights_load_identically(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  init = _init_params()
  from_npz = _load(tmp_path, ckpt_fixtures.write_npz, file_params, init)
  from_timm = _load(tmp_path, ckpt_fixtures.write_safetensors, file_params,
                    init, with_head=True)
  _assert_loaded(from_timm, file_params, init)
  jax.tree.map(np.testing.assert_array_equal, from_npz, from_timm)


def test_safetensors_directory_is_accepted(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  init = _init_params()
  ckpt_fixtures.write_safetensors(tmp_path / 'model.safetensors', file_params)
  loaded = pretrained.load_pretrained(str(tmp_path), init, 'ViT-test')
  _assert_loaded(loaded, file_params, init)


def test_safetensors_conversion_computes_the_torch_layers(tmp_path):
  """Loaded Flax kernels compute what timm's torch layers compute."""
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  path = tmp_path / 'model.safetensors'
  ckpt_fixtures.write_safetensors(path, file_params)
  torch = safetensors.numpy.load_file(str(path))
  loaded = pretrained.load_pretrained(str(path), _init_params(), 'ViT-test')
  block = loaded['Transformer']['encoderblock_1']
  attention = block['MultiHeadDotProductAttention_1']
  rng = np.random.default_rng(5)
  x = rng.normal(size=32)
  d = 32

  # torch.nn.Linear: y = W x + b with W [out, in]; q, k, v are row blocks.
  qkv = torch['blocks.1.attn.qkv.weight'] @ x + torch['blocks.1.attn.qkv.bias']
  for i, name in enumerate(('query', 'key', 'value')):
    flax = (np.einsum('d,dhk->hk', x, attention[name]['kernel'])
            + attention[name]['bias'])
    np.testing.assert_allclose(flax.reshape(-1), qkv[i * d:(i + 1) * d],
                               rtol=1e-5, atol=1e-5, err_msg=name)
  heads = rng.normal(size=32)  # concatenated head outputs, head-major
  torch_out = (torch['blocks.1.attn.proj.weight'] @ heads
               + torch['blocks.1.attn.proj.bias'])
  flax_out = (np.einsum('hk,hkd->d', heads.reshape(2, 16),
                        attention['out']['kernel']) + attention['out']['bias'])
  np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)
  torch_fc1 = torch['blocks.1.mlp.fc1.weight'] @ x
  np.testing.assert_allclose(x @ block['MlpBlock_3']['Dense_0']['kernel'],
                             torch_fc1, rtol=1e-5, atol=1e-5)
  # Conv2d weight [out, in, kh, kw] on one patch [kh, kw, in].
  patch = rng.normal(size=(8, 8, 3))
  torch_conv = np.einsum('ocij,ijc->o', torch['patch_embed.proj.weight'], patch)
  flax_conv = np.einsum('ijco,ijc->o', loaded['embedding']['kernel'], patch)
  np.testing.assert_allclose(flax_conv, torch_conv, rtol=1e-5, atol=1e-5)


def _bilinear_corners_aligned(grid, new):
  """[g, g, D] -> [new, new, D]; output i samples input i * (g-1) / (new-1)."""
  old = grid.shape[0]
  coords = np.arange(new) * (old - 1) / (new - 1)
  lo = np.floor(coords).astype(int)
  hi = np.minimum(lo + 1, old - 1)
  w = coords - lo
  rows = grid[lo] * (1 - w)[:, None, None] + grid[hi] * w[:, None, None]
  return rows[:, lo] * (1 - w)[None, :, None] + rows[:, hi] * w[None, :, None]


@pytest.mark.parametrize('old,new', [(4, 6), (6, 4), (3, 7)])
def test_resize_pos_embedding_matches_numpy_bilinear(old, new):
  posemb = np.random.default_rng(0).normal(size=(1, 1 + old * old, 5))
  resized = resize_pos_embedding(posemb, 1 + new * new)
  assert resized.shape == (1, 1 + new * new, 5)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0].astype(np.float32))
  expected = _bilinear_corners_aligned(posemb[0, 1:].reshape(old, old, 5), new)
  np.testing.assert_allclose(resized[0, 1:].reshape(new, new, 5), expected,
                             rtol=1e-5, atol=1e-5)
  # Corners land on corners.
  np.testing.assert_allclose(resized[0, -1], posemb[0, -1], rtol=1e-5)


def test_resize_pos_embedding_same_grid_is_identity():
  posemb = np.random.default_rng(0).normal(size=(1, 17, 5)).astype(np.float32)
  np.testing.assert_array_equal(resize_pos_embedding(posemb, 17), posemb)


def test_load_resizes_pos_embedding_to_model_grid(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0, grid=4)
  init = _init_params(grid=6)
  for writer in (ckpt_fixtures.write_npz, ckpt_fixtures.write_safetensors):
    loaded = _load(tmp_path, writer, file_params, init)
    posemb = loaded['Transformer']['posembed_input']['pos_embedding']
    source = file_params['Transformer']['posembed_input']['pos_embedding']
    assert posemb.shape == (1, 37, 32)
    np.testing.assert_array_equal(posemb[:, 0], source[:, 0])
    expected = _bilinear_corners_aligned(source[0, 1:].reshape(4, 4, 32), 6)
    np.testing.assert_allclose(posemb[0, 1:].reshape(6, 6, 32), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(loaded['embedding']['kernel'],
                                  file_params['embedding']['kernel'])


def _error(path, init, model_name='ViT-test'):
  with pytest.raises(UserError) as info:
    pretrained.load_pretrained(str(path), init, model_name)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_missing_file_says_where_to_get_weights(tmp_path):
  message = _error(tmp_path / 'ViT-B_16.npz', _init_params())
  assert 'does not exist' in message
  assert 'gs://vit_models/imagenet21k/ViT-B_16.npz' in message
  assert 'vit_base_patch16_224.orig_in21k' in message
  assert 'init_checkpoint' in message


def test_file_of_neither_format(tmp_path):
  path = tmp_path / 'ViT-B_16.npz'
  path.write_text('<html>403 Forbidden: anonymous access denied</html>\n')
  assert 'neither' in _error(path, _init_params())


@pytest.mark.parametrize('writer', [ckpt_fixtures.write_npz,
                                    ckpt_fixtures.write_safetensors])
def test_truncated_file(tmp_path, writer):
  path = tmp_path / 'weights'
  writer(path, ckpt_fixtures.make_vit_params(seed=0))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  assert 'truncated or corrupt' in _error(path, _init_params())


@pytest.mark.parametrize('writer', [ckpt_fixtures.write_npz,
                                    ckpt_fixtures.write_safetensors])
def test_wrong_model_size_names_parameter_shapes_and_fitting_model(
    tmp_path, writer):
  # The file has ViT-test's dimensions; the model is wider.
  path = tmp_path / 'weights'
  writer(path, ckpt_fixtures.make_vit_params(num_layers=6))
  init = _init_params(hidden=48, num_heads=3, mlp_dim=96, num_layers=6)
  # Keys sorted (bias before kernel), as in trees that flax's init returns.
  init = jax.tree.map(np.asarray, init)
  message = _error(path, init, model_name='ViT-B_16')
  assert 'embedding/kernel' in message
  assert '(8, 8, 3, 32)' in message and '(8, 8, 3, 48)' in message
  assert "'ViT-B_16'" in message and "model_name 'ViT-test'" in message


def test_wrong_depth_names_fitting_model(tmp_path):
  path = tmp_path / 'vit.npz'
  ckpt_fixtures.write_npz(path, ckpt_fixtures.make_vit_params(num_layers=6))
  message = _error(path, _init_params(num_layers=2), model_name='ViT-x')
  assert '6 Transformer blocks' in message and 'has 2' in message
  assert "model_name 'ViT-test'" in message


def test_missing_backbone_arrays(tmp_path):
  file_params = ckpt_fixtures.make_vit_params(seed=0)
  del file_params['Transformer']['encoder_norm']
  path = tmp_path / 'vit.npz'
  ckpt_fixtures.write_npz(path, file_params)
  message = _error(path, _init_params())
  assert 'lacks 2 backbone arrays' in message
  assert 'Transformer/encoder_norm/' in message


def test_safetensors_that_is_not_a_vit(tmp_path):
  path = tmp_path / 'model.safetensors'
  safetensors.numpy.save_file({'wte.weight': np.zeros((4, 4), np.float32)},
                              str(path))
  assert 'not a timm ViT' in _error(path, _init_params())


def test_loads_into_create_model_tree(tmp_path):
  """The loader fits the tree of the real model, including a resized grid."""
  from configs import cifar100_dualprompt  # pylint: disable=g-import-not-at-top
  from models import factory  # pylint: disable=g-import-not-at-top
  config = cifar100_dualprompt.get_config()
  config.update_from_flattened_dict({
      'model_name': 'ViT-test', 'g_prompt_length': 2, 'e_prompt_layer_idx': (2, 3),
      'prompt_pool_param.pool_size': 3, 'prompt_pool_param.length': 2})
  model = factory.create_model(config, num_classes=10)
  # Shapes only: compiling the real initialiser would take most of the test.
  shapes = factory.param_shapes(model, input_size=48)
  rng = np.random.default_rng(0)

  def random_like(tree):
    return jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), tree)

  init = random_like(shapes)
  # The file: other values in the same layout, at the 4x4 grid of 32x32 input.
  file_params = random_like(shapes)
  file_params['Transformer']['posembed_input']['pos_embedding'] = (
      rng.normal(size=(1, 17, 32)).astype(np.float32))
  flat_file = ckpt_fixtures.flatten(file_params)
  flat_init = ckpt_fixtures.flatten(init)
  for writer in (ckpt_fixtures.write_npz, ckpt_fixtures.write_safetensors):
    loaded = _load(tmp_path, writer, file_params, init)
    assert jax.tree.structure(loaded) == jax.tree.structure(init)
    for key, value in ckpt_fixtures.flatten(loaded).items():
      if key == _POS:
        assert value.shape == (1, 37, 32)
      elif key.split('/')[0] in _BACKBONE_ROOTS:
        np.testing.assert_array_equal(value, flat_file[key])
      else:
        np.testing.assert_array_equal(value, flat_init[key])
  images = np.zeros((2, 48, 48, 3), np.float32)
  logits, _ = jax.jit(model.apply)({'params': loaded}, images,
                                   cls_features=np.zeros((2, 32), np.float32))
  assert logits.shape == (2, 10)
