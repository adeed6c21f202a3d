"""Tests of the ResNet v1 backbones: architecture, parameter counts, BatchNorm statistics.

Compiling dominates on CPU: the named variants are only traced (jax.eval_shape); values are
checked on small ResNets built from the same blocks.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import resnet

# Published counts with the variant's usual head: torchvision resnet50 and resnet18
# (1000 classes) and the usual CIFAR ResNet-18 (3x3 stride-1 stem, no max pool, 10 classes).
PUBLISHED_COUNTS = {'resnet50': (1000, 25_557_032),
                    'resnet18': (1000, 11_689_512),
                    'resnet18_cifar': (10, 11_173_962)}

EPS = 1e-5  # flax BatchNorm's default epsilon, as the original's.


def _images(batch=2, size=8, seed=0):
  return jnp.asarray(np.random.RandomState(seed).normal(size=(batch, size, size, 3)),
                     jnp.float32)


def _fast_jit(fun):
  """jax.jit without LLVM's costly passes."""
  return jax.jit(fun, compiler_options={'xla_backend_optimization_level': 0,
                                        'xla_llvm_disable_expensive_passes': True})


def _tiny(**kwargs):
  """A two-stage ResNet: the variants' code paths at a fraction of the compile time."""
  return resnet.ResNet(**{'stage_sizes': (1, 1), 'bottleneck': False, 'num_classes': 7,
                          'init_head': 'kaiming', **kwargs})


@functools.lru_cache(maxsize=None)
def _init(model):
  return _fast_jit(model.init)(jax.random.PRNGKey(0), _images(1))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, **kwargs):
  return _fast_jit(functools.partial(model.apply, **kwargs))


def _apply(model, variables, images, **kwargs):
  """model.apply(variables, images, **kwargs), jitted; kwargs must be hashable."""
  return _jitted_apply(model, **kwargs)(variables, images)


@functools.lru_cache(maxsize=None)
def _shapes(name):
  """{path: shape} of the variant's parameters with its usual head."""
  variables = jax.eval_shape(resnet.create(name, PUBLISHED_COUNTS[name][0]).init,
                             jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return {k: v.shape for k, v in _flat(variables['params']).items()}


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _conv(x, kernel, stride):
  return np.asarray(jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))


def _random_stats(stats, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), stats)


@pytest.mark.parametrize('name', sorted(PUBLISHED_COUNTS))
def test_parameter_count(name):
  # Global average pooling: the count does not depend on the input size.
  assert sum(np.prod(s) for s in _shapes(name).values()) == PUBLISHED_COUNTS[name][1]


def test_variant_table_and_names():
  assert set(resnet.VARIANTS) == {'resnet18', 'resnet18_he', 'resnet50', 'resnet18_cifar', 'resnet-test'}
  assert resnet.get_variant('resnet50') == resnet.ResNetVariant((3, 4, 6, 3), bottleneck=True)
  assert resnet.get_variant('resnet18_cifar') == resnet.ResNetVariant(
      (2, 2, 2, 2), bottleneck=False, small_input=True)
  assert resnet.is_resnet('resnet18') and not resnet.is_resnet('ViT-B_16')
  with pytest.raises(ValueError) as err:
    resnet.create('resnet34', 10)
  message = str(err.value)
  assert 'resnet34' in message and '\n' not in message
  assert all(name in message for name in resnet.VARIANTS)


@pytest.mark.parametrize('name,stem,width', [('resnet18', (7, 7, 3, 64), 512),
                                             ('resnet18_cifar', (3, 3, 3, 64), 512),
                                             ('resnet50', (7, 7, 3, 64), 2048)])
def test_parameter_tree(name, stem, width):
  shapes = _shapes(name)
  assert shapes['init_conv/kernel'] == stem
  assert shapes['head/kernel'] == (width, PUBLISHED_COUNTS[name][0])
  assert not any('bias' in k for k in shapes if 'conv' in k)
  # The shortcut is projected in a stage's first block exactly when the shape changes.
  projected = {k.split('/proj_conv')[0] for k in shapes if 'proj_conv' in k}
  first_stage = {'stage1/block1'} if name == 'resnet50' else set()
  assert projected == first_stage | {f'stage{i}/block1' for i in (2, 3, 4)}
  if name == 'resnet50':
    assert shapes['stage2/block1/conv1/kernel'] == (1, 1, 256, 128)
    assert shapes['stage2/block1/conv2/kernel'] == (3, 3, 128, 128)
    assert shapes['stage2/block1/conv3/kernel'] == (1, 1, 128, 512)
    assert shapes['stage2/block1/proj_conv/kernel'] == (1, 1, 256, 512)
    assert 'stage3/block6/bn3/scale' in shapes and 'stage3/block7/bn1/scale' not in shapes
  else:
    assert shapes['stage2/block1/conv1/kernel'] == (3, 3, 64, 128)
    assert shapes['stage2/block1/proj_conv/kernel'] == (1, 1, 64, 128)
    assert 'stage4/block2/bn2/scale' in shapes and 'stage4/block3/bn1/scale' not in shapes


@pytest.mark.parametrize('name,sizes', [
    ('resnet18', [16, 8, 8, 4, 2, 1]),  # 7x7/2 conv, 3x3/2 max pool, strided stages 2-4.
    ('resnet18_cifar', [32, 32, 32, 16, 8, 4]),
    ('resnet50', [16, 8, 8, 4, 2, 1])])
def test_spatial_strides(name, sizes):
  model = resnet.create(name, 10)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, x)
  inter = state['intermediates']
  got = [inter['init_conv']['__call__'][0].shape[1],
         inter['stage1']['block1']['conv1']['__call__'][0].shape[1]]
  got += [inter[f'stage{i}']['__call__'][0].shape[1] for i in (1, 2, 3, 4)]
  assert got == sizes
  # Blocks stride in their first 3x3 convolution: a bottleneck's second convolution.
  block = inter['stage2']['block1']
  convs = ('conv1', 'conv2') if name == 'resnet50' else ('conv1',)
  assert [block[c]['__call__'][0].shape[1] for c in convs] == sizes[4 - len(convs):4]


@pytest.mark.parametrize('bottleneck', [False, True])
def test_batchnorm_init(bottleneck):
  model = _tiny(stage_sizes=(1,), bottleneck=True) if bottleneck else _tiny()
  params = _flat(_init(model)['params'])
  assert 'stage1/block1/proj_bn/scale' in params if bottleneck else (
      'stage2/block1/proj_bn/scale' in params)
  for key, value in params.items():
    if key.endswith('/scale'):
      # The basic block's last BatchNorm starts at zero; the bottleneck's, as the
      # original's, and every other BatchNorm at one.
      zero = not bottleneck and '/bn2/' in key
      np.testing.assert_array_equal(value, 0.0 if zero else 1.0, err_msg=key)
    if key.endswith('/bias'):
      np.testing.assert_array_equal(value, 0.0, err_msg=key)


def test_he_head_differs_only_in_head_kernel():
  assert resnet.get_variant('resnet18_he') == resnet.ResNetVariant(
      (2, 2, 2, 2), bottleneck=False, init_head='kaiming')
  assert resnet.get_variant('resnet18') == resnet.ResNetVariant((2, 2, 2, 2), bottleneck=False)
  assert resnet.create('resnet18_he', 7) == _tiny(stage_sizes=(2, 2, 2, 2))
  zero = _flat(_init(_tiny(init_head='zero'))['params'])
  he = _flat(_init(_tiny())['params'])
  assert zero.keys() == he.keys()
  for key in zero:
    if key != 'head/kernel':
      np.testing.assert_array_equal(zero[key], he[key], err_msg=key)
  np.testing.assert_array_equal(zero['head/kernel'], 0.0)
  kernel = np.abs(he['head/kernel'])
  bound = np.sqrt(6.0 / 128)  # He uniform: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)).
  assert kernel.max() <= bound and kernel.max() > 0.95 * bound
  np.testing.assert_allclose(np.sqrt(np.mean(kernel**2)), bound / np.sqrt(3), rtol=0.1)
  with pytest.raises(ValueError, match='zero, kaiming'):
    _tiny(init_head='xavier').init(jax.random.PRNGKey(0), _images(1))


@pytest.mark.parametrize('small_input,stride', [(True, 1), (False, 2)])
def test_train_mode_updates_running_stats(small_input, stride):
  model = _tiny(small_input=small_input)
  variables = _init(model)
  old = _random_stats(variables['batch_stats'], 1)
  images = _images(4)
  run = lambda x: _apply(model, {'params': variables['params'], 'batch_stats': old}, x,
                         train=True, mutable=('batch_stats',))
  (_, aux), new = run(images)
  y = _conv(images, variables['params']['init_conv']['kernel'], stride)
  new_bn, old_bn = new['batch_stats']['init_bn'], old['init_bn']
  np.testing.assert_allclose(new_bn['mean'], 0.9 * np.asarray(old_bn['mean'])
                             + 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_bn['var'], 0.9 * np.asarray(old_bn['var'])
                             + 0.1 * y.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  # Every BatchNorm's statistics move; train mode normalises with the batch's statistics,
  # so an example's output depends on the rest of the batch.
  for key, value in _flat(new['batch_stats']).items():
    assert not np.allclose(value, _flat(old)[key]), key
  (_, other), _ = run(images.at[2:].set(_images(2, seed=5)))
  assert not np.allclose(aux['pre_logits'][:2], other['pre_logits'][:2], atol=1e-4)


def _close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def _bn(x, params, stats):
  """BatchNorm with the running statistics."""
  return ((x - np.asarray(stats['mean'])) / np.sqrt(np.asarray(stats['var']) + EPS)
          * np.asarray(params['scale']) + np.asarray(params['bias']))


def _check_block(inter, params, stats, x, bottleneck):
  """Checks a block's captured outputs layer by layer from its input x; returns its output."""
  out = lambda name: np.asarray(inter[name]['__call__'][0])
  h, last = x, 3 if bottleneck else 2
  for k in range(1, last + 1):
    conv, bn = f'conv{k}', f'bn{k}'
    _close(out(conv), _conv(h, params[conv]['kernel'], h.shape[1] // out(conv).shape[1]))
    _close(out(bn), _bn(out(conv), params[bn], stats[bn]))
    h = np.maximum(out(bn), 0.0)
  shortcut = x
  if 'proj_conv' in params:
    stride = x.shape[1] // out('proj_conv').shape[1]
    _close(out('proj_conv'), _conv(x, params['proj_conv']['kernel'], stride))
    shortcut = out('proj_bn')
    _close(shortcut, _bn(out('proj_conv'), params['proj_bn'], stats['proj_bn']))
  y = np.asarray(inter['__call__'][0])
  _close(y, np.maximum(shortcut + out(f'bn{last}'), 0.0))
  return y


@pytest.mark.parametrize('small_input,bottleneck', [(True, False), (False, False),
                                                    (False, True)])
def test_eval_forward_matches_reference(small_input, bottleneck):
  """Eval normalises with (and keeps) the running statistics. The ImageNet stem has no relu
  between its BatchNorm and max pool; the small-input stem has relu and no pool."""
  model = _tiny(small_input=small_input, bottleneck=bottleneck)
  variables = _init(model)
  stats = _random_stats(variables['batch_stats'], 2)
  rng = np.random.RandomState(3)  # Random BatchNorm scales and biases, head bias.
  params = flax.traverse_util.unflatten_dict({
      k: v if k[-1] == 'kernel' else jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
      for k, v in flax.traverse_util.flatten_dict(variables['params']).items()})
  images = _images(2)
  run = lambda x: _apply(model, {'params': params, 'batch_stats': stats}, x,
                         train=False, capture_intermediates=True,
                         mutable=('batch_stats', 'intermediates'))
  (logits, aux), state = run(images)
  jax.tree.map(np.testing.assert_array_equal, state['batch_stats'], stats)
  inter = state['intermediates']
  y = np.asarray(inter['init_conv']['__call__'][0])
  _close(y, _conv(images, params['init_conv']['kernel'], 1 if small_input else 2))
  bn = np.asarray(inter['init_bn']['__call__'][0])
  _close(bn, _bn(y, params['init_bn'], stats['init_bn']))
  if small_input:
    x = np.maximum(bn, 0.0)
  else:
    assert (bn < 0).any()
    x = np.asarray(jax.lax.reduce_window(
        bn, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'))
  for stage in ('stage1', 'stage2'):
    x = _check_block(inter[stage]['block1'], params[stage]['block1'],
                     stats[stage]['block1'], x, bottleneck)
  # Pre-logits: global average pool of the last stage, then the Dense head.
  _close(aux['pre_logits'], x.mean(axis=(1, 2)))
  _close(logits, x.mean(axis=(1, 2)) @ params['head']['kernel'] + params['head']['bias'])
  # An example's output does not depend on the rest of the batch.
  (_, other), _ = run(images.at[1:].set(_images(1, seed=5)))
  np.testing.assert_allclose(aux['pre_logits'][:1], other['pre_logits'][:1], rtol=1e-5)


def test_outputs_and_interface():
  model = _tiny()
  assert model.method is None and not model.needs_query
  assert resnet.create('resnet50', 3).method is None
  variables = _init(model)
  images = _images(2)
  run = _fast_jit(lambda v, x, c, m: model.apply(v, x, cls_features=c, task={'mask': m},
                                                 vote_mask=m))
  logits, aux = run(variables, images, None, None)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert aux.keys() == {'pre_logits'}
  assert aux['pre_logits'].shape == (2, 128) and aux['pre_logits'].dtype == jnp.float32
  # The prompted models' extra arguments are accepted and ignored.
  other, _ = run(variables, images, jnp.ones((2, 128)), jnp.ones((2,), bool))
  np.testing.assert_array_equal(logits, other)
  logits, aux = jax.eval_shape(lambda x: resnet.create('resnet50', 3).init_with_output(
      jax.random.PRNGKey(0), x)[0], jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 3) and aux['pre_logits'].shape == (2, 2048)


def test_bfloat16_compute_float32_outputs():
  model = _tiny(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(1))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  variables = _init(_tiny())
  images = _images(4)
  (logits, aux), new = _apply(model, variables, images, train=True, mutable=('batch_stats',))
  assert logits.dtype == jnp.float32 and aux['pre_logits'].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
  assert np.isfinite(logits).all()
  # Convolutions and BatchNorms compute in bfloat16; the stem's statistics are close to,
  # but not equal to, the float32 ones.
  _, state = jax.eval_shape(functools.partial(
      model.apply, capture_intermediates=True, mutable=['intermediates']), shapes, images)
  computed = _flat(state['intermediates'])
  assert len(computed) > 12 and all(
      x[0].dtype == jnp.bfloat16 for k, x in computed.items() if 'conv' in k or 'bn' in k)
  _, reference = _apply(_tiny(), variables, images, train=True, mutable=('batch_stats',))
  low, high = new['batch_stats']['init_bn']['mean'], reference['batch_stats']['init_bn']['mean']
  assert not np.array_equal(low, high)
  np.testing.assert_allclose(low, high, rtol=0.02, atol=0.01)
