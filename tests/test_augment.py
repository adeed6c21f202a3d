"""Extra augmentations: determinism per seed, each operation, erasing, mixup, cutmix, checks."""

import ml_collections
from ml_collections import config_dict
import numpy as np
import pytest
import tensorflow as tf

from libml import augment

_SIDE = 16
_MEAN = (0.5071, 0.4867, 0.4408)
_STD = (0.2675, 0.2565, 0.2761)


def default_config() -> ml_collections.ConfigDict:
  """The `config.augment` block of configs/common.py: everything off."""
  augment_config = ml_collections.ConfigDict()
  augment_config.num_layers = 0
  augment_config.magnitude = config_dict.placeholder(float)
  augment_config.num_levels = 10
  augment_config.prob_to_apply = 1.0
  augment_config.ops = ("AutoContrast", "Equalize", "Rotate", "Posterize", "Solarize", "Color",
                        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                        "TranslateY", "Identity", "SolarizeAdd", "Invert")
  augment_config.cutout = False
  augment_config.color_jitter_strength = 0.0
  augment_config.color_jitter_prob = 0.8
  augment_config.grayscale_prob = 0.2
  augment_config.mean = _MEAN
  augment_config.std = _STD
  augment_config.erase_prob = 0.0
  augment_config.erase_area = (0.02, 1 / 3)
  augment_config.erase_aspect = (0.3, 1 / 0.3)
  augment_config.erase_mode = "pixel"
  augment_config.mixup_alpha = 0.0
  augment_config.cutmix_alpha = 0.0
  augment_config.mix_prob = 1.0
  augment_config.switch_prob = 0.5
  augment_config.lock()
  return augment_config


def _config(**overrides) -> ml_collections.ConfigDict:
  cfg = default_config()
  cfg.update(overrides)
  augment.check(cfg)
  return cfg


# Everything per image on, each with some chance of doing nothing.
_ALL_ON = dict(num_layers=2, cutout=True, color_jitter_strength=0.5, erase_prob=0.5)
# Per-image operations with an exact identity for normalisation: mean 0, std 1.
_PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _images(n, side=_SIDE, seed=0):
  """float32 [n, side, side, 3] in [0.01, 0.99]: no two pixels equal, none 0 or grey."""
  return np.random.default_rng(seed).uniform(0.01, 0.99, (n, side, side, 3)).astype(np.float32)


def _run(fn, images, keys, bases=7, reverse=False):
  """Maps fn(image, seed [base, key]) over a tf.data pipeline; outputs in `keys` order.

  bases: one base seed for all or one per example; reverse: feed the examples in the
  opposite order, with parallel calls.
  """
  order = np.arange(len(keys))[::-1] if reverse else np.arange(len(keys))
  seeds = np.stack(np.broadcast_arrays(bases, keys), -1).astype(np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images[order], seeds[order]))
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  out = np.stack(list(ds.as_numpy_iterator()))
  return out[np.argsort(order)]


def _box_of(mask):
  """(top, left, height, width) of a 2-D bool mask that must be one filled rectangle."""
  rows, cols = np.nonzero(mask)
  assert rows.size, 'no box'
  top, left = rows.min(), cols.min()
  height, width = rows.max() - top + 1, cols.max() - left + 1
  assert mask[top:top + height, left:left + width].all() and mask.sum() == height * width, \
      'not one filled rectangle'
  return top, left, height, width


def test_defaults_are_off():
  cfg = default_config()
  augment.check(cfg)
  assert not augment.enabled(cfg)
  assert augment.mix_fn(cfg) is None
  x = _images(1)[0]
  assert augment.image_fn(cfg)(x, tf.constant([1, 2], tf.int64)) is x
  assert augment.normalize_fn(cfg)(x) is x
  # Mixing batches alone keeps the images as they are.
  assert not augment.enabled(_config(mixup_alpha=0.8, cutmix_alpha=1.0))


def test_same_seed_same_images_different_seeds_different_images():
  images = np.repeat(_images(1), 16, axis=0)  # One image, sixteen seeds:
  keys, bases = np.arange(16) % 8, np.arange(16) // 8 + 7  # keys 0..7 with bases 7 and 8.
  first = _run(augment.image_fn(_config(**_ALL_ON)), images, keys, bases)
  # A separately built function and pipeline, examples in another order, in parallel.
  second = _run(augment.image_fn(_config(**_ALL_ON)), images, keys, bases, reverse=True)
  assert first.shape == (16, _SIDE, _SIDE, 3) and first.dtype == np.float32
  assert np.isfinite(first).all()
  np.testing.assert_array_equal(first, second)
  for i in range(16):
    for j in range(i):
      assert not np.array_equal(first[i], first[j]), (i, j)


@pytest.mark.parametrize('overrides', [
    dict(num_layers=2, ops=('Identity',)),  # RandAugment of identities.
    dict(num_layers=2, ops=('Invert',), prob_to_apply=0.0),  # Never applied.
    dict(color_jitter_strength=0.5, color_jitter_prob=0.0, grayscale_prob=0.0),
], ids=['identity_ops', 'never_applied', 'jitter_never'])
def test_no_op_augmentation_leaves_exact_normalisation(overrides):
  cfg = _config(**overrides)
  assert augment.enabled(cfg)
  images = _images(3)
  expected = (images - np.float32(_MEAN)) / np.float32(_STD)
  np.testing.assert_array_equal(_run(augment.image_fn(cfg), images, [0, 1, 2]), expected)
  np.testing.assert_array_equal(augment.normalize_fn(cfg)(images), expected)
  np.testing.assert_array_equal(augment.normalize_fn(cfg)(tf.constant(images)).numpy(), expected)


def _op(name, magnitude, image, seed=(3, 4)):
  cfg = _config(num_layers=1, ops=(name,), magnitude=magnitude, **_PLAIN)
  return augment.image_fn(cfg)(tf.constant(image), tf.constant(seed, tf.int64)).numpy()


def _posterized(x, bits):
  return (np.floor(x * 255).astype(np.int32) >> (8 - bits) << (8 - bits)) / np.float32(255)


# Operations with an exact reference at a level: name, level, x -> expected.
_REFERENCES = [
    ('Identity', 0.7, lambda x: x),
    ('Invert', 0.7, lambda x: 1 - x),
    ('Brightness', 0.25, lambda x: np.clip(x * (0.1 + 1.8 * np.float32(0.25)), 0, 1)),
    ('Solarize', 0.5, lambda x: np.where(x * 255 < 128, x, 1 - x)),
    ('SolarizeAdd', 1.0, lambda x: np.where(x * 255 < 128, np.minimum(x + 110 / 255, 1), x)),
    ('Posterize', 0.5, lambda x: _posterized(x, 2)),
    ('Posterize', 0.0, lambda x: _posterized(x, 1)),
    ('AutoContrast', 0.7, lambda x: (x - x.min((0, 1))) / (x.max((0, 1)) - x.min((0, 1)))),
]


@pytest.mark.parametrize('name,level,reference', _REFERENCES,
                         ids=[f'{r[0]}_{r[1]}' for r in _REFERENCES])
def test_operation_matches_reference(name, level, reference):
  x = _images(1)[0]
  np.testing.assert_allclose(_op(name, level, x), reference(x), rtol=0, atol=2e-6)


@pytest.mark.parametrize('name', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'])
def test_geometric_operation_moves_pixels(name):
  """Nearest-pixel warps: every output pixel is an input pixel or the grey fill; both kinds
  occur at level 1, and the image moves."""
  x = _images(1)[0]
  out = _op(name, 1.0, x)
  known = {tuple(p) for p in x.reshape(-1, 3)}
  grey = np.all(out == np.float32(128 / 255), axis=-1)
  moved = np.array([tuple(p) in known for p in out.reshape(-1, 3)]).reshape(grey.shape)
  assert (grey | moved).all() and grey.any() and moved.any()
  assert not np.array_equal(out, x)


@pytest.mark.parametrize('name', augment.OPS)
def test_every_operation_stays_in_range(name):
  x = _images(1)[0]
  out = _op(name, 1.0, x)
  assert out.shape == x.shape and out.dtype == np.float32
  assert 0 <= out.min() and out.max() <= 1
  # Solarize at level 1 inverts white pixels only: there are none.
  assert np.array_equal(out, x) == (name in ('Identity', 'Solarize'))


def test_equalize_flattens_the_histogram():
  x = _images(1, side=32)[0] ** 3  # Skewed towards dark.
  out = _op('Equalize', 0.5, x)
  levels = np.floor(out * 255 + 0.5)
  np.testing.assert_allclose(out, levels / 255, rtol=0, atol=1e-7)
  assert abs(np.median(out) - 0.5) < 0.05 < abs(np.median(x) - 0.5)


def test_cutout_is_one_grey_box_of_at_most_half_the_sides():
  cfg = _config(cutout=True, **_PLAIN)
  images = _images(20)
  out = _run(augment.image_fn(cfg), images, np.arange(20))
  for x, y in zip(images, out):
    changed = np.any(x != y, axis=-1)
    _, _, height, width = _box_of(changed)
    assert height <= _SIDE // 2 and width <= _SIDE // 2
    np.testing.assert_array_equal(y[changed], np.float32(128 / 255))


def test_grayscale():
  cfg = _config(color_jitter_strength=1.0, color_jitter_prob=0.0, grayscale_prob=1.0, **_PLAIN)
  out = _run(augment.image_fn(cfg), _images(2), [0, 1])
  np.testing.assert_allclose(out, np.repeat(out[..., :1], 3, axis=-1), atol=1e-6)
  assert out.std() > 0.1


@pytest.mark.parametrize('mode', augment.ERASE_MODES)
def test_random_erasing_is_one_box_in_range_with_the_fill(mode):
  area, aspect = (0.1, 0.3), (0.5, 2.0)
  cfg = _config(erase_prob=1.0, erase_area=area, erase_aspect=aspect, erase_mode=mode)
  side, n = 32, 30
  images = _images(n, side=side)
  out = _run(augment.image_fn(cfg), images, np.arange(n))
  normalised = (images - np.float32(_MEAN)) / np.float32(_STD)
  areas = []
  for x, y in zip(normalised, out):
    erased = np.any(x != y, axis=-1)
    _, _, height, width = _box_of(erased)
    # The sides are rounded: some real sides within half a pixel have an area in range.
    assert (height - .5) * (width - .5) <= area[1] * side**2
    assert (height + .5) * (width + .5) >= area[0] * side**2
    assert aspect[0] <= (height + .5) / (width - .5) and (height - .5) / (width + .5) <= aspect[1]
    fill = y[erased]
    if mode == 'const':
      np.testing.assert_array_equal(fill, 0)
    elif mode == 'rand':
      np.testing.assert_array_equal(fill, np.broadcast_to(fill[0], fill.shape))
    else:
      assert len(np.unique(fill)) == fill.size
    np.testing.assert_array_equal(y[~erased], x[~erased])
    areas.append(height * width / side**2)
  assert max(areas) - min(areas) > 0.05  # Drawn, not fixed.


def test_random_erasing_probability():
  cfg = _config(erase_prob=0.5, **_PLAIN)
  images = _images(40)
  out = _run(augment.image_fn(cfg), images, np.arange(40))
  erased = sum(not np.array_equal(x, y) for x, y in zip(images, out))
  assert 8 <= erased <= 32


def _mix(cfg, seed=(1, 2), n=8, side=_SIDE):
  images = _images(n, side=side, seed=3)
  labels = np.arange(n, dtype=np.int32) * 10  # Distinct: label // 10 is the example.
  batch = {'image': tf.constant(images), 'label': tf.constant(labels)}
  out = augment.mix_fn(cfg)(batch, tf.constant(seed, tf.int64))
  assert out['mix_label'].dtype == tf.int32 and out['mix_weight'].dtype == tf.float32
  return images, labels, {k: v.numpy() for k, v in out.items()}


def test_mixup_blends_with_a_permutation():
  cfg = _config(mixup_alpha=0.8)
  images, labels, out = _mix(cfg)
  partner = out['mix_label'] // 10
  np.testing.assert_array_equal(np.sort(partner), np.arange(8))
  assert not np.array_equal(partner, np.arange(8))
  np.testing.assert_array_equal(out['label'], labels)
  w = out['mix_weight']
  assert ((0 <= w) & (w <= 1)).all() and len(np.unique(w)) == 8
  expected = w[:, None, None, None] * images + (1 - w[:, None, None, None]) * images[partner]
  np.testing.assert_allclose(out['image'], expected, atol=1e-6)
  _, _, again = _mix(_config(mixup_alpha=0.8))
  np.testing.assert_array_equal(again['image'], out['image'])
  _, _, other = _mix(cfg, seed=(1, 3))
  assert not np.array_equal(other['mix_weight'], w)


def test_cutmix_pastes_one_box_of_the_reversed_batch():
  cfg = _config(cutmix_alpha=1.0)
  areas = []
  for seed in range(5):
    images, _, out = _mix(cfg, seed=(seed, 0))
    partner = out['mix_label'] // 10
    np.testing.assert_array_equal(partner, np.arange(8)[::-1])
    for i, (x, y) in enumerate(zip(images, out['image'])):
      pasted = np.any(y != x, axis=-1)
      if pasted.any():
        _box_of(pasted)
      np.testing.assert_array_equal(y[pasted], images[partner[i]][pasted])
      np.testing.assert_allclose(1 - out['mix_weight'][i], pasted.mean(), atol=1e-6)
      areas.append(pasted.mean())
  assert 0.05 < np.mean(areas) < 0.5 and max(areas) <= 0.5


def test_mix_probability_and_switch():
  images, labels, kept = _mix(_config(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0))
  np.testing.assert_array_equal(kept['image'], images)
  np.testing.assert_array_equal(kept['mix_label'], labels)
  np.testing.assert_array_equal(kept['mix_weight'], 1)
  _, _, cut = _mix(_config(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0))
  np.testing.assert_array_equal(cut['mix_label'], labels[::-1])
  _, _, blend = _mix(_config(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0))
  assert not np.array_equal(blend['mix_label'], labels[::-1])


def test_mix_in_two_pipelines_is_the_same():
  cfg = _config(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.8)

  def batches():
    examples = {'image': _images(16, seed=4), 'label': np.arange(16, dtype=np.int32)}
    ds = tf.data.Dataset.from_tensor_slices(examples)
    ds = ds.batch(4).enumerate().map(lambda i, b: augment.mix_fn(cfg)(
        b, tf.stack([tf.constant(9, tf.int64), i])))
    return list(ds.as_numpy_iterator())

  first, second = batches(), batches()
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert len({a['mix_weight'].tobytes() for a in first}) == 4


@pytest.mark.parametrize('field,value', [
    ('num_layers', -1), ('magnitude', 1.5), ('num_levels', 0), ('ops', ('Rotate', 'Spin')),
    ('ops', ()), ('prob_to_apply', 1.2), ('color_jitter_prob', -0.1), ('grayscale_prob', 2.0),
    ('erase_prob', 1.5), ('mix_prob', -1.0), ('switch_prob', 1.1),
    ('color_jitter_strength', 2.0), ('color_jitter_strength', -0.5),
    ('mean', (0.5, 0.5)), ('std', (0.2, 0.0, 0.2)), ('erase_area', (0.3, 0.1)),
    ('erase_area', (0.0, 0.5)), ('erase_aspect', (0.0, 2.0)), ('erase_mode', 'noise'),
    ('mixup_alpha', -0.2), ('cutmix_alpha', -1.0),
])
def test_check_names_the_bad_field(field, value):
  cfg = default_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=f'config.augment.{field} = ') as error:
    augment.check(cfg)
  assert '\n' not in str(error.value)
