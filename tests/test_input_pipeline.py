"""Input pipeline: per-task data, eval coverage, determinism, every benchmark.

TFDS is mocked (random records, nothing downloaded); expectations come from
reading the mocked splits straight through TFDS, or from scikit-learn.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from libml import benchmarks
from libml import gaussian_schedule
from libml import input_pipeline
from libml import preprocess
from libml import record_sources
from libml import validation
from libml.errors import UserError
from tests.data_fixtures import batches
from tests.data_fixtures import pipeline_config
from tests.data_fixtures import valid_labels

_MOCK_EXAMPLES = 120


@pytest.fixture(scope='module', autouse=True)
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _tfds_labels(name: str, split: str) -> np.ndarray:
  ds = tfds.load(name, split=split,
                 decoders={'image': tfds.decode.SkipDecoding()})
  return np.array([int(ex['label']) for ex in tfds.as_numpy(ds)])


def _create(config, devices=2, host=0, hosts=1):
  return input_pipeline.create_benchmark(
      config, num_local_devices=devices, process_index=host,
      process_count=hosts)


def _labels(batch_list) -> np.ndarray:
  return np.concatenate([b['label'].ravel() for b in batch_list])


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_array_equal(x['image'], y['image'])


def test_cifar100_tasks_train_and_test_only_their_classes():
  bench = _create(pipeline_config('cifar100', num_epochs=1))
  train_truth = _tfds_labels('cifar100', 'train')
  test_truth = _tfds_labels('cifar100', 'test')
  assert (bench.name, bench.num_classes, bench.num_tasks) == ('cifar100', 100,
                                                             10)
  for task in (0, 7):
    mask = np.arange(10 * task, 10 * task + 10)
    np.testing.assert_array_equal(bench.class_masks[task], mask)
    count = np.isin(train_truth, mask).sum()
    assert bench.num_train_examples[task] == count
    assert bench.steps_per_epoch(task) == max(1, count // 4)
    train = batches(bench.train_dataset(task))
    assert len(train) == bench.num_train_steps(task)
    assert train[0]['image'].shape == (2, 2, 8, 8, 3)
    assert train[0]['image'].dtype == np.float32
    assert train[0]['label'].dtype == np.int32
    assert all(0 <= b['image'].min() and b['image'].max() <= 1 for b in train)
    assert set(_labels(train)) <= set(mask)
    # Eval: every test example of the task once, in record order, then padding.
    evals = batches(bench.eval_dataset(task))
    np.testing.assert_array_equal(valid_labels(evals),
                                  test_truth[np.isin(test_truth, mask)])
    assert all(b['image'].shape == (2, 2, 8, 8, 3) for b in evals)
    padding = sum((~b['mask']).sum() for b in evals)
    assert 0 <= padding < 4 and len(evals) == -(-len(valid_labels(evals)) // 4)
  assert bench.eval_sets_after(3) == [0, 1, 2, 3]
  np.testing.assert_array_equal(bench.eval_set_classes(3), np.arange(30, 40))


def test_norm_01_false_gives_minus_one_to_one():
  bench = _create(pipeline_config('cifar100', norm_01=False))
  (batch,) = batches(bench.train_dataset(0).take(1))
  assert batch['image'].min() < -0.5 and batch['image'].max() <= 1.0
  assert batch['image'].min() >= -1.0


def test_same_seed_same_stream_other_seed_differs_and_resume_matches():
  config = pipeline_config('cifar100', num_epochs=3)
  full = batches(_create(config).train_dataset(2))
  bench = _create(config)
  _assert_same_batches(full, batches(bench.train_dataset(2)))
  # A restart mid-run (here inside the second epoch) continues the stream.
  start = bench.steps_per_epoch(2) + 1
  _assert_same_batches(full[start:],
                       batches(bench.train_dataset(2, start_step=start)))
  other = batches(_create(pipeline_config('cifar100', num_epochs=3, seed=1))
                  .train_dataset(2))
  assert not all(np.array_equal(a['image'], b['image'])
                 for a, b in zip(full, other))


def test_class_order_seeded_reproducible_and_not_label_order():
  config = pipeline_config('cifar100', **{'continual.rand_seed': 7})
  masks = _create(config).class_masks
  again = _create(config).class_masks
  for a, b in zip(masks, again):
    np.testing.assert_array_equal(a, b)
  assert sorted(np.concatenate(masks)) == list(range(100))
  assert any(not np.array_equal(m, np.arange(10 * t, 10 * t + 10))
             for t, m in enumerate(masks))
  other = benchmarks.class_order(100, 8)
  assert not np.array_equal(other, benchmarks.class_order(100, 7))
  bench = _create(config)
  assert set(_labels(batches(bench.train_dataset(4)))) <= set(masks[4])


def test_five_datasets_offsets_gray_to_rgb_and_not_mnist_80_20():
  bench = _create(pipeline_config('5datasets', num_epochs=1,
                                  **{'continual.num_tasks': 5}))
  assert bench.num_classes == 50 and bench.num_tasks == 5
  for task in range(5):
    np.testing.assert_array_equal(bench.class_masks[task],
                                  np.arange(10 * task, 10 * task + 10))
  mnist = batches(bench.train_dataset(1))
  assert set(_labels(mnist)) <= set(range(10, 20))
  image = mnist[0]['image']
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Gray as RGB.
  evals = batches(bench.eval_dataset(4))
  np.testing.assert_array_equal(valid_labels(evals),
                                _tfds_labels('fashion_mnist', 'test') + 40)
  # notMNIST has one split: its first 80% of records train, the rest test.
  assert bench.num_train_examples[3] == round(0.8 * _MOCK_EXAMPLES)
  not_mnist = valid_labels(batches(bench.eval_dataset(3)))
  np.testing.assert_array_equal(
      not_mnist, _tfds_labels('not_mnist', 'train')[96:] + 30)


def test_core50_domain_incremental_shared_test_set():
  bench = _create(pipeline_config('core50', **{'continual.num_tasks': 8}))
  assert (bench.num_classes, bench.num_tasks, bench.num_eval_sets) == (50, 8, 1)
  assert all(bench.eval_sets_after(t) == [0] for t in range(8))
  for mask in bench.class_masks + [bench.eval_set_classes(0)]:
    np.testing.assert_array_equal(mask, np.arange(50))
  assert bench.num_train_examples == [_MOCK_EXAMPLES] * 8
  assert len(valid_labels(batches(bench.eval_dataset(0)))) == _MOCK_EXAMPLES


def _fake_imagenet_r(labels: np.ndarray):
  """`_as_dataset` stand-in: tiny JPEGs with the given ImageNet labels."""
  jpegs = tf.constant([tf.io.encode_jpeg(np.full((6, 5, 3), v, np.uint8))
                       .numpy() for v in (10, 200)])
  num_records = len(labels)
  labels = tf.constant(labels, tf.int64)

  def as_dataset(self, split, decoders=None, read_config=None,
                 shuffle_files=False):
    del self, split, decoders, read_config, shuffle_files
    ds = tf.data.Dataset.range(num_records).map(lambda i: {
        'image': tf.gather(jpegs, i % 2), 'label': tf.gather(labels, i),
        'file_name': tf.constant('x.jpg')})
    return ds.apply(tf.data.experimental.assert_cardinality(num_records))

  return as_dataset


def test_imagenet_r_ranks_200_imagenet_ids_and_splits_records_80_20():
  rng = np.random.default_rng(0)
  ids = np.sort(rng.choice(1000, 200, replace=False))  # ImageNet-1k ids.
  labels = rng.permutation(np.arange(500) % 200)  # Expected head ids: ranks.
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r(ids[labels]),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    bench = _create(pipeline_config('imagenet_r', num_epochs=1,
                                    preprocess_on_device=True,
                                    **{'continual.num_classes_per_task': 20}))
    assert (bench.num_classes, bench.num_tasks) == (200, 10)
    # Images of varying size: the host prepares the network inputs.
    assert bench.device_preprocess is None
    for task in (0, 9):
      mask = np.arange(20 * task, 20 * task + 20)
      np.testing.assert_array_equal(bench.class_masks[task], mask)
      assert bench.num_train_examples[task] == np.isin(labels[:400], mask).sum()
      assert set(_labels(batches(bench.train_dataset(task)))) <= set(mask)
      np.testing.assert_array_equal(
          valid_labels(batches(bench.eval_dataset(task))),
          labels[400:][np.isin(labels[400:], mask)])
  with tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r(ids[labels % 150]),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(UserError, match='150 classes, not 200'):
      _create(pipeline_config('imagenet_r',
                              **{'continual.num_classes_per_task': 20}))


def _digits_config(**overrides):
  return pipeline_config('digits', **{
      'input_size': 8, 'resize_size': 8, 'num_epochs': 2,
      'continual.num_tasks': 5, 'continual.num_classes_per_task': 2,
      **overrides})


def test_digits_five_tasks_of_two_disjoint_train_test_every_epoch_whole():
  from sklearn import datasets  # The expectation, read independently.
  digits = datasets.load_digits()
  splits = record_sources.digits_splits()
  train_ids, test_ids = splits['train'][0], splits['test'][0]
  assert not set(train_ids) & set(test_ids)
  assert len(train_ids) + len(test_ids) == len(digits.target)
  bench = _create(_digits_config())
  assert (bench.num_classes, bench.num_tasks) == (10, 5)
  assert sum(bench.num_train_examples) == len(train_ids)
  task_ids = train_ids[np.isin(digits.target[train_ids], [2, 3])]
  np.testing.assert_array_equal(bench.class_masks[1], [2, 3])
  # input_size 8 = source size: each image is exactly the digit / 16, as RGB.
  expected = collections.Counter(
      d.tobytes() for d in np.repeat(digits.images[task_ids, :, :, None] / 16,
                                     3, -1).astype(np.float32))
  train = batches(bench.train_dataset(1))
  per_epoch = bench.steps_per_epoch(1)
  assert per_epoch == len(task_ids) // 4
  epochs = [np.concatenate([b['image'].reshape(-1, 8, 8, 3)
                            for b in train[e * per_epoch:(e + 1) * per_epoch]])
            for e in range(2)]
  for images in epochs:  # Each epoch: a fresh order, no example twice.
    got = collections.Counter(i.tobytes() for i in images)
    assert sum(got.values()) == per_epoch * 4 and not got - expected
  assert not np.array_equal(epochs[0], epochs[1])
  counts = [len(valid_labels(batches(bench.eval_dataset(s)))) for s in range(5)]
  assert sum(counts) == len(test_ids)


def test_hosts_share_train_equally_and_eval_exactly_once():
  config = _digits_config()
  single = _create(config)
  hosts = [_create(config, host=h, hosts=2) for h in range(2)]
  n = single.num_train_examples[0]
  assert [h.num_train_examples[0] for h in hosts] == [n // 2] * 2
  assert hosts[0].num_train_steps(0) == hosts[1].num_train_steps(0)
  whole = batches(single.eval_dataset(0))
  shares = [batches(h.eval_dataset(0)) for h in hosts]
  assert len(shares[0]) == len(shares[1])
  key = lambda bl: sorted(
      (int(l), i.tobytes()) for b in bl
      for l, i, m in zip(b['label'].ravel(), b['image'].reshape(-1, 8, 8, 3),
                         b['mask'].ravel()) if m)
  assert sorted(key(shares[0]) + key(shares[1])) == key(whole)


def _gaussian_config(**overrides):
  # 20 episodes, steps -25: the 10 digits peak at episodes 1, 3, ..., 19, two
  # episodes wide (50 / 25): label sets of 1-3 digits, every record of them trained.
  return _digits_config(gaussian_schedule=True, **{
      'continual.num_tasks': 20, 'continual.num_train_steps_per_task': -25,
      **overrides})


def test_gaussian_episodes_train_every_record_of_their_label_sets():
  _, images, labels = record_sources.digits_splits()['train']
  config = _gaussian_config(preprocess_on_device=True)  # Batches hold the stored pixels.
  bench = _create(config)
  sets = gaussian_schedule.label_sets(num_classes=10, num_tasks=20,
                                      steps_per_task=-25, seed=config.seed)
  assert bench.num_tasks == 20
  for episode in (0, 13):
    mask = sets[episode]
    np.testing.assert_array_equal(bench.class_masks[episode], mask)
    members = np.isin(labels, mask)
    count = int(members.sum())
    # Steps: all of the label set's examples per epoch (global batch 4), 2 epochs.
    assert bench.num_train_examples[episode] == count
    assert bench.steps_per_epoch(episode) == count // 4
    assert bench.num_train_steps(episode) == count // 4 * 2
    train = batches(bench.train_dataset(episode))
    assert len(train) == count // 4 * 2
    expected = collections.Counter(
        (int(l), i.tobytes()) for l, i in zip(labels[members], images[members]))
    for epoch in (train[:count // 4], train[count // 4:]):  # Each: no example twice.
      got = collections.Counter(
          (int(l), i.tobytes()) for b in epoch
          for l, i in zip(b['label'].ravel(), b['image'].reshape(-1, 8, 8, 1)))
      assert sum(got.values()) == count // 4 * 4 and not got - expected
  # The whole test set after every 10th episode and after the last.
  assert [t for t in range(20) if bench.eval_sets_after(t)] == [9, 19]
  assert bench.eval_sets_after(9) == [0]
  np.testing.assert_array_equal(bench.eval_set_classes(0), np.arange(10))


def test_gaussian_episode_resumes_mid_epoch_and_loads_records_once():
  config = _gaussian_config(preprocess_on_device=True)
  full = batches(_create(config).train_dataset(13))
  bench = _create(config)  # A restarted process.
  loads = []
  load = bench._source.load
  bench._source.load = lambda *a, **k: loads.append(a) or load(*a, **k)
  start = bench.steps_per_epoch(13) + 1  # Inside the second epoch.
  _assert_same_batches(full[start:],
                       batches(bench.train_dataset(13, start_step=start)))
  batches(bench.train_dataset(2))
  assert len(loads) == 1  # One load of every episode's records.
  other = batches(_create(_gaussian_config(preprocess_on_device=True, seed=1))
                  .train_dataset(13).take(10))
  assert not all(np.array_equal(a['label'], b['label'])
                 for a, b in zip(full, other))


def test_gaussian_positive_steps_make_epochs_of_that_many_steps():
  # 20 x 3 = 60 batches, peaks 3, 9, ..., 57: as the original, an epoch is 3 steps.
  bench = _create(_gaussian_config(**{'continual.num_train_steps_per_task': 3}))
  assert bench.steps_per_epoch(4) == 3 and bench.num_train_steps(4) == 6
  train = batches(bench.train_dataset(4))
  assert len(train) == 6
  assert set(_labels(train)) <= set(bench.class_masks[4])
  with pytest.raises(UserError, match='num_train_steps_per_task=0'):
    _create(_gaussian_config(**{'continual.num_train_steps_per_task': 0}))
  # rand_seed >= 0: the seeded class order owns the peaks in turn.
  seeded = _create(_gaussian_config(**{'continual.rand_seed': 3}))
  want = gaussian_schedule.label_sets(
      num_classes=10, num_tasks=20, steps_per_task=-25, seed=0,
      class_order=benchmarks.class_order(10, 3))
  for got, mask in zip(seeded.class_masks, want):
    np.testing.assert_array_equal(got, mask)


def test_subsample_rate_steps_cap_and_reverse_task():
  base = _digits_config()
  full = _create(base)
  half = _create(_digits_config(subsample_rate=0.5))
  assert half.num_train_examples == [round(n / 2) for n in
                                     full.num_train_examples]
  capped = _create(_digits_config(**{'continual.num_train_steps_per_task': 7}))
  assert capped.num_train_steps(0) == 7
  assert len(batches(capped.train_dataset(0))) == 7
  reverse = _create(_digits_config(reverse_task=True))
  np.testing.assert_array_equal(reverse.class_masks[0], [8, 9])
  assert set(valid_labels(batches(reverse.eval_dataset(0)))) == {8, 9}


@pytest.mark.parametrize('overrides, match', [
    ({'dataset': 'cifar1000'},
     "unknown dataset 'cifar1000': choose one of 5datasets, cifar100, core50, "
     'digits, imagenet_r'),
    ({'continual.num_tasks': 11}, 'does not fit the 100 classes'),
    ({'resize_size': 4}, 'resize_size=4 is smaller than input_size=8'),
    ({'subsample_rate': 2.0}, 'subsample_rate=2.0'),
    ({'decoded_cache_mb': -1}, 'decoded_cache_mb=-1 must be >= 0'),
    ({'decoded_train_mb': -1}, 'decoded_train_mb=-1 must be >= 0'),
])
def test_bad_settings_are_one_line_user_errors(overrides, match):
  """The data settings' check, which runs before the pipeline is built."""
  config = pipeline_config(overrides.pop('dataset', 'cifar100'), **overrides)
  with pytest.raises(UserError, match=match) as error:
    validation.check_data(config)
  assert '\n' not in str(error.value)


def test_preprocess_matches_the_originals_resize_cast_crop_resize_flip():
  pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 9, 3)),
                       tf.uint8)
  # The original: resize, cast to uint8 (truncation), crop, / 255, resize, flip.
  resized = tf.cast(tf.image.resize(pixels, [16, 16]), tf.uint8)
  flips = set()
  for i in range(12):
    seed = tf.constant([5, i], tf.int64)
    got = preprocess.train_image(pixels, seed, resize_size=16, input_size=10)
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    begin, size = preprocess.sample_crop(crop_seed, 16)
    area = float(tf.reduce_prod(size)) / 16**2
    assert 0.05 - 1e-6 <= area <= 1.0
    crop = resized[begin[0]:begin[0] + size[0], begin[1]:begin[1] + size[1]]
    want = tf.image.resize(tf.cast(crop, tf.float32) / 255.0, [10, 10])
    flip = bool(tf.random.stateless_uniform([], flip_seed) < 0.5)
    flips.add(flip)
    if flip:
      want = want[:, ::-1]
    np.testing.assert_allclose(got, want, atol=1e-6)
  assert flips == {True, False}
  evaluated = preprocess.eval_image(pixels, resize_size=16, input_size=10)
  np.testing.assert_array_equal(
      evaluated, tf.cast(resized, tf.float32)[3:13, 3:13] / 255.0)
  gray = preprocess.to_float_rgb(tf.constant([[[255]], [[0]]], tf.uint8))
  np.testing.assert_array_equal(gray, [[[1, 1, 1]], [[0, 0, 0]]])


@pytest.mark.parametrize('side, draws', [(256, 300), (10, 100)])
def test_crop_windows_are_the_originals_draws(side, draws):
  """Same seed, same window as the original's call (TensorFlow's defaults)."""
  for i in range(draws):
    seed = tf.constant([3, i], tf.int64)
    begin, size = preprocess.sample_crop(seed, side)
    want_begin, want_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [side, side, 3], tf.zeros([0, 0, 4], tf.float32), seed=seed,
        area_range=(0.05, 1.0), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    np.testing.assert_array_equal(begin, want_begin[:2])
    np.testing.assert_array_equal(size, want_size[:2])


def test_crop_sampler_keeps_tensorflows_default_attempts(monkeypatch):
  # With area_range (0.05, 1) the first attempt always yields a window (the
  # sampler clamps the height to fit), so no draw shows max_attempts: check
  # that the original's (TensorFlow's default, 100) is what is asked for.
  calls = []
  sampler = tf.image.stateless_sample_distorted_bounding_box

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return sampler(*args, **kwargs)

  monkeypatch.setattr(tf.image, 'stateless_sample_distorted_bounding_box', spy)
  preprocess.sample_crop(tf.constant([0, 1], tf.int64), 256)
  (kwargs,) = calls
  assert kwargs.get('max_attempts', 100) == 100
  assert tuple(kwargs.get('aspect_ratio_range', (0.75, 1.33))) == (0.75, 1.33)


def _real_images(batch_list) -> list[tuple[int, bytes]]:
  """(label, image bytes) of the real examples, sorted."""
  return sorted((int(l), i.tobytes()) for b in batch_list
                for l, i, m in zip(b['label'].ravel(),
                                   b['image'].reshape(-1, 8, 8, 3),
                                   b['mask'].ravel()) if m)


def test_core50_test_images_get_a_fixed_training_augmentation_by_default():
  config = pipeline_config('core50', **{'continual.num_tasks': 1})
  bench = _create(config)
  first = batches(bench.eval_dataset(0))
  _assert_same_batches(first, batches(bench.eval_dataset(0)))  # Every eval.
  _assert_same_batches(first, batches(_create(config).eval_dataset(0)))  # Run.
  central = batches(_create(pipeline_config(
      'core50', eval_with_train_augment=False,
      **{'continual.num_tasks': 1})).eval_dataset(0))
  assert len(central) == len(first)
  differ = []
  for a, b in zip(first, central):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
    for x, y, real in zip(a['image'].reshape(-1, 8, 8, 3),
                          b['image'].reshape(-1, 8, 8, 3), a['mask'].ravel()):
      if real:
        differ.append(not np.array_equal(x, y))
  # A random window may happen to be the central one, unflipped: rarely.
  assert len(differ) == _MOCK_EXAMPLES and np.mean(differ) > 0.9
  # The augmentation follows the seed; hosts share it out record by record.
  other = batches(_create(pipeline_config(
      'core50', seed=1, **{'continual.num_tasks': 1})).eval_dataset(0))
  assert _real_images(other) != _real_images(first)
  hosts = [_create(config, host=h, hosts=2) for h in range(2)]
  shares = [batches(h.eval_dataset(0)) for h in hosts]
  assert sorted(_real_images(shares[0]) + _real_images(shares[1])) == (
      _real_images(first))


def test_other_benchmarks_test_the_central_crop_unless_asked():
  config = lambda **kw: pipeline_config('cifar100', **{'continual.num_tasks': 1},
                                        **kw)
  plain = batches(_create(config()).eval_dataset(0))
  central = batches(_create(config(eval_with_train_augment=False))
                    .eval_dataset(0))
  _assert_same_batches(plain, central)
  augmented = batches(_create(config(eval_with_train_augment=True))
                      .eval_dataset(0))
  np.testing.assert_array_equal(valid_labels(augmented), valid_labels(plain))
  assert _real_images(augmented) != _real_images(plain)


@pytest.mark.parametrize('shape, dtype', [((3, 5, 5, 3), np.uint8), ((7, 8, 8, 1), np.float32),
                                          ((0, 4, 4, 3), np.uint8)])
def test_decoded_images_are_aligned_and_read_by_tensorflow_in_place(shape, dtype):
  for _ in range(4):  # Fresh allocations land on different offsets.
    array = record_sources._aligned_empty(shape, dtype)
    assert array.shape == shape and array.dtype == dtype
    assert array.ctypes.data % 64 == 0 or not array.size
    array[...] = np.arange(array.size).reshape(shape)
    tensor = record_sources._wrap(array)
    np.testing.assert_array_equal(tf.gather(tensor, np.arange(shape[0])[::-1]).numpy(), array[::-1])
    if array.size:  # The tensor reads the array's memory: no copy was made.
      array.flat[0] = 99
      assert tensor.numpy().flat[0] == 99
