"""On-device preprocessing equals the host pipeline's and the original's; decoded images
are cached; CORe50's test images get the training augmentation.

TFDS is mocked (random records). Expectations come from TensorFlow's own resize and
uint8 cast, from the original's steps written out in TensorFlow (`_original_train`,
`_original_eval`), and from the host pipeline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from libml import device_preprocess
from libml import input_pipeline
from libml import preprocess
from libml import steps
from tests import e2e_util
from tests.data_fixtures import batches
from tests.data_fixtures import pipeline_config

_MOCK_EXAMPLES = 60
# Float rounding: compiled, a sampling position may round one float32 step differently
# (see libml/device_preprocess.py); at toy sizes the positions are small, so tighter.
_ATOL = 1e-5
_ATOL_224 = 3e-5  # Per unit of pixel range: [0, 1] or, twice that, [-1, 1].


@pytest.fixture(scope='module', autouse=True)
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _create(config):
  return input_pipeline.create_benchmark(config, num_local_devices=2, process_index=0,
                                         process_count=1)


@pytest.mark.parametrize('stored, out', [(32, 256), (32, 10), (256, 224), (200, 224),
                                         (17, 5), (5, 17), (1, 4)])
def test_resize_weights_are_tensorflows_bilinear_resize(stored, out):
  column = np.random.default_rng(stored).random((stored, 2)).astype(np.float32)
  want = tf.image.resize(column[:, None], [out, 1]).numpy()[:, 0]
  got = device_preprocess.resize_weights(out, stored) @ column
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_resize_weights_of_a_traced_window_resize_that_window():
  column = np.random.default_rng(0).random((40, 3)).astype(np.float32)
  weights = jax.jit(lambda n, o: device_preprocess.resize_weights(12, n, o, 40))
  for offset, length in ((0, 40), (5, 9), (30, 10), (7, 1)):
    want = tf.image.resize(column[offset:offset + length, None], [12, 1]).numpy()[:, 0]
    got = weights(jnp.int32(length), jnp.int32(offset)) @ column
    np.testing.assert_allclose(got, want, atol=_ATOL)


def _stored_images(side: int, channels: int, n: int = 6) -> np.ndarray:
  """Random uint8 images with flat patches (equal neighbours) and a gradient."""
  rng = np.random.default_rng(side)
  images = rng.integers(0, 256, (n, side, side, channels), np.uint8)
  images[:, :side // 3, :side // 3] = 77
  images[:, -(side // 3):, :] = np.arange(side, dtype=np.uint8)[:, None] * 3
  return images


def _original_first_resize(image: np.ndarray, side: int = 256) -> tf.Tensor:
  """The original: (grey -> RGB), tf.image.resize to side x side, cast to uint8."""
  image = tf.constant(image)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.cast(tf.image.resize(image, [side, side]), tf.uint8)


def _original_train(image, window, flip, input_size=224, side=256):
  """The original's training input (JPEG round trip aside) for a given window and flip."""
  top, left, height, width = (int(v) for v in window)
  crop = _original_first_resize(image, side)[top:top + height, left:left + width]
  out = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, [input_size, input_size])
  return out[:, ::-1] if flip else out


def _original_eval(image, input_size=224, side=256):
  """The original's eval input: resize, cast to uint8, / 255, central crop."""
  resized = tf.cast(_original_first_resize(image, side), tf.float32) / 255.0
  offset = (side - input_size) // 2
  return resized[offset:offset + input_size, offset:offset + input_size]


@pytest.mark.parametrize('side, channels', [(32, 3), (28, 1), (128, 3)])
def test_first_resize_truncates_exactly_as_tensorflows_uint8_cast(side, channels):
  """CIFAR / MNIST / CORe50 to 256: dyadic lerps, so bit for bit on both paths."""
  images = _stored_images(side, channels)
  want = np.stack([_original_first_resize(i).numpy() for i in images]).astype(np.float32)
  device = np.asarray(jax.jit(lambda x: device_preprocess.resize_truncated(x, 256))(images))
  np.testing.assert_array_equal(np.broadcast_to(device, want.shape), want)
  for image, expected in zip(images, want):
    np.testing.assert_array_equal(preprocess.resize_truncated(tf.constant(image), 256), expected)
  # Truncation, not rounding: a resize alone leaves fractions that the cast drops.
  assert not np.array_equal(
      tf.image.resize(images[0], [256, 256]).numpy()[..., :1], want[0][..., :1])


@pytest.mark.parametrize('side, channels, norm_01', [(32, 3, True), (128, 3, False),
                                                    (28, 1, False)])
def test_full_size_crops_flips_and_central_crops_equal_the_original_and_host(
    side, channels, norm_01):
  """Stored CIFAR / CORe50 / MNIST images to 224 via 256, as in the real configs."""
  spec = device_preprocess.DevicePreprocess(input_size=224, resize_size=256, augment=True,
                                            max_value=255.0, norm_01=norm_01)
  images = _stored_images(side, channels)
  crops, flips, host_train, host_eval, want_train, want_eval = [], [], [], [], [], []
  for i, image in enumerate(images):
    seed = tf.constant([0, i], tf.int64)
    window, flip = preprocess.random_window(seed, 256)
    crops.append(window.numpy())
    flips.append(bool(flip))
    host_train.append(preprocess.normalize(preprocess.train_image(
        tf.constant(image), seed, resize_size=256, input_size=224), norm_01))
    host_eval.append(preprocess.normalize(preprocess.eval_image(
        tf.constant(image), resize_size=256, input_size=224), norm_01))
    want_train.append(preprocess.normalize(_original_train(image, crops[-1], flip), norm_01))
    want_eval.append(preprocess.normalize(_original_eval(image), norm_01))
  assert set(flips) == {True, False}
  batch = {'image': images, 'crop': np.stack(crops), 'flip': np.array(flips)}
  atol = _ATOL_224 * (1 if norm_01 else 2)
  train = np.asarray(jax.jit(spec.train_images)(batch))
  for got in (train, np.stack(host_train)):
    np.testing.assert_allclose(got, np.stack(want_train), atol=atol)
  # Evaluation: truncated pixels / 255, cropped: exact on the host; compiled, XLA may
  # multiply by 1 / 255 instead (one float32 step).
  evaluated = np.asarray(jax.jit(spec.eval_images)({'image': images}))
  np.testing.assert_allclose(evaluated, np.stack(want_eval), rtol=0, atol=1.2e-7)
  np.testing.assert_array_equal(np.stack(host_eval), np.stack(want_eval))
  # An eval batch with crops and flips (CORe50's test set) gets the training input.
  np.testing.assert_array_equal(jax.jit(spec.eval_images)(batch), train)


def _flat(batch):
  """[devices, b, ...] -> [devices * b, ...]."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def _assert_same_inputs(dataset, overrides, train_task=0, eval_set=0, channels=None,
                        eval_keys=('image', 'label', 'mask')):
  # Stored 32, 28 or 128 pixels to 16: dyadic lerps, as 32, 28, 128 to 256 in the real
  # configs, so both paths truncate the same exact values. (At other scales a compiled
  # fused multiply-add may move a value across an integer: a rare 1 / 255 step.)
  overrides = {'resize_size': 16, **overrides}
  host = _create(pipeline_config(dataset, preprocess_on_device=False, **overrides))
  device = _create(pipeline_config(dataset, preprocess_on_device=True, **overrides))
  spec = device.device_preprocess
  assert host.device_preprocess is None and spec is not None
  train_fn = jax.jit(spec.train_images)
  eval_fn = jax.jit(spec.eval_images)
  pairs = [(train_fn, host.train_dataset(train_task), device.train_dataset(train_task)),
           (eval_fn, host.eval_dataset(eval_set), device.eval_dataset(eval_set))]
  for fn, want_ds, got_ds in pairs:
    want_list, got_list = batches(want_ds), batches(got_ds)
    assert len(want_list) == len(got_list) > 0
    if fn is eval_fn:
      assert set(got_list[0]) == set(eval_keys)
    for want, got in zip(want_list, got_list):
      want, got = _flat(want), _flat(got)
      # The device batches carry the small stored images, not network inputs.
      assert got['image'].shape[1:3] != want['image'].shape[1:3]
      assert channels is None or got['image'].shape[-1] == channels
      np.testing.assert_array_equal(got['label'], want['label'])
      real = want.get('mask', np.ones(len(want['label']), bool))  # Padding aside.
      np.testing.assert_array_equal(got.get('mask', real), real)
      np.testing.assert_allclose(np.asarray(fn(got))[real], want['image'][real], atol=_ATOL)
  return spec


def test_cifar_crop_flip_and_central_crop_equal_the_host():
  spec = _assert_same_inputs('cifar100', {'num_epochs': 1})
  assert spec.augment and spec.max_value == 255.0
  # And with pixels in [-1, 1] and a crop to 12.
  _assert_same_inputs('cifar100', {'num_epochs': 1, 'norm_01': False, 'input_size': 12})
  # Test images with the training augmentation, when asked for.
  _assert_same_inputs('cifar100', {'num_epochs': 1, 'eval_with_train_augment': True},
                      eval_keys=('image', 'label', 'mask', 'crop', 'flip'))


def test_core50_test_images_get_the_training_augmentation_equal_on_both_paths():
  config = {'num_epochs': 1, 'continual.num_tasks': 8, 'eval_with_train_augment': None}
  _assert_same_inputs('core50', config, eval_keys=('image', 'label', 'mask', 'crop', 'flip'))
  # Off: the central crop, on both paths too.
  _assert_same_inputs('core50', {**config, 'eval_with_train_augment': False})


def test_grey_mnist_of_5datasets_equals_the_host():
  config = {'num_epochs': 1, 'continual.num_tasks': 5}
  _assert_same_inputs('5datasets', config, train_task=1, eval_set=1, channels=1)


def test_digits_resize_only_equals_the_host():
  spec = _assert_same_inputs('digits', {'input_size': 16, 'resize_size': 16,
                                        'continual.num_tasks': 5,
                                        'continual.num_classes_per_task': 2})
  assert not spec.augment and spec.max_value == 16.0


def test_crops_and_flips_vary_and_windows_fit():
  bench = _create(pipeline_config('cifar100', preprocess_on_device=True, num_epochs=1))
  got = [_flat(b) for b in batches(bench.train_dataset(0))]
  crops = np.concatenate([b['crop'] for b in got])
  flips = np.concatenate([b['flip'] for b in got])
  top, left, height, width = crops.T
  assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
  assert (top + height <= 10).all() and (left + width <= 10).all()  # resize_size 10.
  assert len(set(map(tuple, crops))) > 1 and set(flips) == {True, False}


def test_train_records_decoded_once_equal_tfds_pixels():
  bench = _create(pipeline_config('cifar100', num_epochs=1))
  records = bench._train_records(0)
  images = records['image'].numpy()
  assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
  _, ids = bench._train_part(0)
  decoded = np.stack([ex['image'] for ex in tfds.as_numpy(tfds.load('cifar100', split='train'))])
  np.testing.assert_array_equal(images, decoded[ids])


@pytest.mark.parametrize('on_device', [True, False])
def test_training_images_beyond_budget_stay_encoded_and_give_the_same_batches(on_device):
  def train(budget_mb):
    bench = _create(pipeline_config('cifar100', preprocess_on_device=on_device, num_epochs=3,
                                    decoded_train_mb=budget_mb))
    return bench, batches(bench.train_dataset(0, start_step=1))

  decoded, want = train(1)  # 60 mock records of 3 KiB: within 1 MiB.
  encoded, got = train(0)
  assert decoded._train_records(0)['image'].dtype == tf.uint8
  assert encoded._train_records(0)['image'].dtype == tf.string
  assert len(want) == len(got) > 1
  for a, b in zip(want, got):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_eval_images_cached_within_budget_and_streamed_beyond_it():
  def eval_batches(budget_mb):
    bench = _create(pipeline_config('cifar100', preprocess_on_device=True,
                                    decoded_cache_mb=budget_mb))
    first, second = (batches(bench.eval_dataset(3)) for _ in range(2))
    return bench, first, second

  cached, first, second = eval_batches(1)
  assert set(cached._eval_cache) == {3}
  streamed, third, _ = eval_batches(0)
  assert not streamed._eval_cache
  for a, b, c in zip(first, second, third):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])


def test_core50_cached_query_features_equal_recomputed_on_augmented_test_images():
  """Every evaluation sees the same augmented test images, so the cache stays exact."""
  config = e2e_util.tiny_digits_config(**{
      'dataset': 'core50', 'resize_size': 18, 'continual.num_tasks': 2,
      'prompt_pool_param.batchwise_prompt_at_test': False, 'num_eval_steps': 3})
  benchmark = _create(config)
  assert benchmark.device_preprocess is not None
  assert {'crop', 'flip'} <= set(batches(benchmark.eval_dataset(0).take(1))[0])
  evaluator, rparams, rquery, query_model, method_task = e2e_util.evaluator_setup(config, benchmark)
  cached = evaluator(True)
  first = cached.evaluate(rparams, rquery, 0, method_task)  # Computes and keeps the features.
  second = cached.evaluate(rparams, rquery, 0, method_task)  # Reuses them.
  fresh = evaluator(False).evaluate(rparams, rquery, 0, method_task)
  for result in (first, second):
    assert result['accuracy'] == fresh['accuracy'] and result['count'] == fresh['count'] > 0
    np.testing.assert_allclose(result['loss'], fresh['loss'], rtol=1e-6)
    np.testing.assert_array_equal(result['prompt_counts'], fresh['prompt_counts'])
  # The kept features are those of the augmented test images, batch by batch.
  query = jax.pmap(lambda p, b: steps.query_step(p, b, query_model=query_model,
                                                 preprocess=benchmark.device_preprocess),
                   axis_name=steps.AXIS)
  central = config.copy_and_resolve_references()
  central.eval_with_train_augment = False  # The central crop instead: other features.
  plain = _create(central).eval_dataset(0).take(config.num_eval_steps)
  plain_batches = steps.device_batches(iter(tfds.as_numpy(plain)))
  assert len(cached._cache[0]) == config.num_eval_steps
  for batch, plain_batch, stored in zip(cached._batches(0), plain_batches, cached._cache[0]):
    np.testing.assert_allclose(np.asarray(stored), np.asarray(query(rquery, batch)),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(stored), np.asarray(query(rquery, plain_batch)))


def natural_32x32(n: int, seed: int = 0) -> list[tf.Tensor]:
  """CIFAR-like uint8 [32, 32, 3] images: random squares of scikit-learn's two sample
  photographs, downscaled with antialiasing."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  images = []
  for k in range(n):
    photo = photos[k % len(photos)]
    h, w = photo.shape[:2]
    side = int(rng.integers(48, min(h, w)))
    y, x = rng.integers(0, h - side), rng.integers(0, w - side)
    small = tf.image.resize(photo[y:y + side, x:x + side], [32, 32], antialias=True)
    images.append(tf.cast(tf.round(tf.clip_by_value(small, 0, 255)), tf.uint8))
  return images


def jpeg_round_trip_effect(images, draws: int = 4) -> float:
  """Mean |difference| ([0, 1] scale) of the 224 training input with and without the
  original's JPEG round trip (quality 95, decoded with the crop) of the truncated 256 image.

  python -c "from tests.test_device_preprocess import *
  print(jpeg_round_trip_effect(natural_32x32(64)))"
  """
  diffs = []
  for n, image in enumerate(images):
    jpeg = tf.io.encode_jpeg(_original_first_resize(image.numpy()), quality=95)
    for d in range(draws):
      seed = tf.constant([n, d], tf.int64)
      ours = preprocess.train_image(image, seed, resize_size=256, input_size=224)
      window, flip = preprocess.random_window(seed, 256)
      crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
      theirs = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, [224, 224])
      diffs.append(np.abs(ours - (theirs[:, ::-1] if flip else theirs)).mean())
  return float(np.mean(diffs))


def test_the_left_out_jpeg_round_trip_moves_inputs_by_about_one_grey_level():
  # 64 images x 4 windows give 0.0039 (1.0 / 255); random-noise images 0.010.
  effect = jpeg_round_trip_effect(natural_32x32(8), draws=2)
  assert 0.5 / 255 < effect < 2 / 255
