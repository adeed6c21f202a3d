"""On-device preprocessing equals the host pipeline's; decoded images are cached.

TFDS is mocked (random records). Expectations come from TensorFlow's own resize and
from the host pipeline, which the input pipeline tests check against resize, crop,
resize and flip done by hand.
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


@pytest.mark.parametrize('side, channels, norm_01', [(32, 3, True), (128, 3, False),
                                                    (28, 1, False)])
def test_full_size_crops_flips_and_central_crops_equal_the_host(side, channels, norm_01):
  """Stored CIFAR / CORe50 / MNIST images to 224 via 256, as in the real configs."""
  spec = device_preprocess.DevicePreprocess(input_size=224, resize_size=256, augment=True,
                                            max_value=255.0, norm_01=norm_01)
  images = np.random.default_rng(side).integers(0, 256, (6, side, side, channels), np.uint8)
  crops, flips, train_want, eval_want = [], [], [], []
  for i, image in enumerate(images):
    seed = tf.constant([0, i], tf.int64)
    window, flip = preprocess.random_window(seed, 256)
    crops.append(window.numpy())
    flips.append(bool(flip))
    pixels = preprocess.to_float_rgb(tf.constant(image))
    train_want.append(preprocess.normalize(preprocess.train_image(
        pixels, seed, resize_size=256, input_size=224), norm_01))
    eval_want.append(preprocess.normalize(preprocess.eval_image(
        pixels, resize_size=256, input_size=224), norm_01))
  assert set(flips) == {True, False}
  batch = {'image': images, 'crop': np.stack(crops), 'flip': np.array(flips)}
  atol = _ATOL_224 * (1 if norm_01 else 2)
  np.testing.assert_allclose(jax.jit(spec.train_images)(batch), np.stack(train_want), atol=atol)
  np.testing.assert_allclose(jax.jit(spec.eval_images)(batch), np.stack(eval_want), atol=atol)


def _flat(batch):
  """[devices, b, ...] -> [devices * b, ...]."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def _assert_same_inputs(dataset, overrides, train_task=0, eval_set=0, channels=None):
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
  # And with pixels in [-1, 1], a resize up to 14 and a crop to 12.
  _assert_same_inputs('cifar100', {'num_epochs': 1, 'norm_01': False, 'input_size': 12,
                                   'resize_size': 14})


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
