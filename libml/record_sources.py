"""Reading the records a benchmark `Part` names, in the split's record order.

TFDS splits are read with images left encoded (decoding happens later, in
parallel, after records are chosen), one file after another so that record
i is the i-th record TFDS slicing counts. 'digits' is scikit-learn's bundled
set, split here 80/20 (stratified, fixed seed). TFDS never downloads
anything from here: a missing dataset is a UserError saying how to prepare it.
"""

import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from libml import benchmarks
from libml import preprocess
from libml import tfds_builders
from libml.errors import UserError

# tf.data functions here are plain TensorFlow: no autograph rewriting needed.
_no_autograph = tf.autograph.experimental.do_not_convert

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


@functools.cache
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """scikit-learn's digits, split once and for all.

  Returns:
    {'train'|'test': (indices int64 [n] into load_digits() in ascending
    order, images float32 [n, 8, 8, 1] in 0..16, labels int64 [n])}.
  """
  # Imported here: scikit-learn is slow to import and only the digits need it.
  # pylint: disable-next=g-import-not-at-top
  from sklearn import datasets, model_selection
  digits = datasets.load_digits()
  train, test = model_selection.train_test_split(
      np.arange(len(digits.target)), test_size=_DIGITS_TEST_FRACTION,
      stratify=digits.target, random_state=_DIGITS_SPLIT_SEED)
  images = digits.images.astype(np.float32)[..., None]
  labels = digits.target.astype(np.int64)
  splits = {}
  for name, ids in (('train', np.sort(train)), ('test', np.sort(test))):
    splits[name] = (ids, images[ids], labels[ids])
  return splits


class RecordSources:
  """Record access for every Part of one benchmark; caches labels and sizes."""

  def __init__(self, data_dir: str | None, *, num_classes: int):
    """`num_classes`: distinct labels a rank_labels split must hold."""
    self._data_dir = data_dir
    self._num_classes = num_classes
    self._builders = {}
    self._labels = {}
    self._sizes = {}

  # --- Raw records of a whole split. ----------------------------------------

  def _builder(self, dataset: str) -> tfds.core.DatasetBuilder:
    if dataset not in self._builders:
      self._builders[dataset] = tfds.builder(dataset, data_dir=self._data_dir)
    return self._builders[dataset]

  def _not_prepared(self, dataset: str) -> str:
    if dataset in tfds_builders.BUILDERS:
      return tfds_builders.not_prepared_message(dataset, self._data_dir)
    root = tfds_builders.data_dir_root(self._data_dir)
    return (f'dataset {dataset!r} is not prepared in {root}: run `tfds build '
            f'{dataset} --data_dir {root}` where the internet is reachable, '
            'or set data_dir to a directory that holds it')

  def _records(self, dataset: str, split: str) -> tf.data.Dataset:
    """{'image': encoded string or float [8, 8, 1], 'label': int64}."""
    if dataset == 'digits':
      _, images, labels = digits_splits()[split]
      return tf.data.Dataset.from_tensor_slices(
          {'image': images, 'label': labels})
    try:
      ds = self._builder(dataset).as_dataset(
          split=split, shuffle_files=False,
          decoders={'image': tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(interleave_cycle_length=1,
                                      try_autocache=False))
    except AssertionError as e:  # TFDS's way of saying "not prepared".
      raise UserError(self._not_prepared(dataset)) from e
    return ds.map(_no_autograph(
        lambda ex: {'image': ex['image'], 'label': ex['label']}))

  def _split_labels(self, dataset: str, split: str) -> np.ndarray:
    """int64 [N]: the dataset label of every record of the split."""
    key = (dataset, split)
    if key not in self._labels:
      ds = self._records(dataset, split).map(
          _no_autograph(lambda ex: ex['label']))
      batches = list(ds.batch(8192).as_numpy_iterator())
      self._labels[key] = (np.concatenate(batches) if batches
                           else np.zeros([0], np.int64))
    return self._labels[key]

  def _split_size(self, dataset: str, split: str) -> int:
    key = (dataset, split)
    if key not in self._sizes:
      size = int(self._records(dataset, split).cardinality())
      if size < 0:  # No split metadata: count.
        size = len(self._split_labels(dataset, split))
      self._sizes[key] = size
    return self._sizes[key]

  def _rank_table(self, part: benchmarks.Part) -> np.ndarray:
    """int32 [max label + 1]: dataset label -> rank among the split's labels."""
    present = np.unique(self._split_labels(part.dataset, part.split))
    if len(present) != self._num_classes:
      raise UserError(
          f'{part.dataset} split {part.split!r} holds {len(present)} classes, '
          f'not {self._num_classes}: prepare it again with `tfds build '
          f'{part.dataset}`')
    table = np.full(present.max() + 1, -1, np.int32)
    table[present] = np.arange(len(present), dtype=np.int32)
    return table

  def _head_labels(self, part: benchmarks.Part) -> np.ndarray:
    labels = self._split_labels(part.dataset, part.split)
    if part.rank_labels:
      labels = self._rank_table(part)[labels]
    return labels.astype(np.int32) + part.label_offset

  # --- Records of a Part. ---------------------------------------------------

  def select(self, part: benchmarks.Part) -> np.ndarray:
    """int64 [n] sorted indices, within the split, of the part's records."""
    size = self._split_size(part.dataset, part.split)
    # The rounding of TFDS's 'split[a%:b%]'.
    lo, hi = (int(round(p * size / 100.0)) for p in part.percent)
    ids = np.arange(lo, hi, dtype=np.int64)
    if part.classes is not None:
      heads = self._head_labels(part)[lo:hi]
      ids = ids[np.isin(heads, np.asarray(part.classes))]
    return ids

  def stream(self, part: benchmarks.Part,
             ids: np.ndarray) -> tf.data.Dataset:
    """Records `ids` (sorted) of the part's split, in record order.

    Yields:
      {'image': encoded string (float [8, 8, 1] for digits),
       'label': int32 head class id}.
    """
    keep = np.zeros(self._split_size(part.dataset, part.split), bool)
    keep[ids] = True
    keep = tf.constant(keep)
    table = tf.constant(self._rank_table(part) if part.rank_labels
                        else np.zeros([0], np.int32))
    offset = part.label_offset

    @_no_autograph
    def head(_, example):
      label = tf.cast(example['label'], tf.int32)
      if part.rank_labels:
        label = tf.gather(table, label)
      return {'image': example['image'], 'label': label + offset}

    # Records past the last one wanted are never read.
    ds = self._records(part.dataset, part.split).take(
        int(ids[-1]) + 1 if len(ids) else 0)
    ds = ds.enumerate().filter(_no_autograph(lambda i, _: tf.gather(keep, i)))
    return ds.map(head)

  def image_shape(self, part: benchmarks.Part) -> tuple[int, ...] | None:
    """[h, w, c] every image of the part's dataset has, or None if sizes vary."""
    if part.dataset == 'digits':
      return (8, 8, 1)
    shape = self._builder(part.dataset).info.features['image'].shape
    return tuple(shape) if None not in shape else None

  def pixel_bytes(self, part: benchmarks.Part) -> int | None:
    """Host bytes of one decoded image (None if sizes vary)."""
    shape = self.image_shape(part)
    if shape is None:
      return None
    return int(np.prod(shape)) * (4 if part.dataset == 'digits' else 1)

  def max_value(self, part: benchmarks.Part) -> float:
    """Stored pixel value of white."""
    return 16.0 if part.dataset == 'digits' else 255.0

  def pixel_decoder(self, part: benchmarks.Part):
    """Function: image as read -> its pixels as stored.

    uint8 [h, w, c]; digits are stored as pixels, float32 [8, 8, 1] in 0..16.
    """
    if part.dataset == 'digits':  # Stored as pixels already.
      return lambda image: image
    channels = self._builder(part.dataset).info.features['image'].shape[-1]

    def decode(data):
      image = tf.io.decode_image(data, channels=channels,
                                 expand_animations=False)
      return tf.ensure_shape(image, [None, None, channels])

    return decode

  def load(self, part: benchmarks.Part, ids: np.ndarray, *,
           decoded: bool = False) -> dict:
    """Records `ids` in host memory.

    Args:
      part: which split and records.
      ids: sorted record indices (see `select`).
      decoded: decode the images now (once), in parallel; the part's images must
        all have one shape (`image_shape`).

    Returns:
      {'image': tf.Tensor, 'label': np.ndarray int32 [n] head class ids}, in
      record order. Images are encoded strings [n], or with `decoded` pixels as
      stored, uint8 [n, h, w, c] (float32 [n, 8, 8, 1] for digits).
    """
    ds = self.stream(part, ids)
    shape = self.image_shape(part)
    pixels = decoded or part.dataset == 'digits'
    if decoded and part.dataset != 'digits':
      if shape is None:
        raise ValueError(f'{part.dataset} images vary in size: not decodable '
                         'into one array')
      decode = self.pixel_decoder(part)
      ds = ds.map(_no_autograph(lambda ex: {
          'image': tf.ensure_shape(decode(ex['image']), shape),
          'label': ex['label']}), num_parallel_calls=tf.data.AUTOTUNE)
    if pixels:  # Written in place: loading holds the images once.
      dtype = np.float32 if part.dataset == 'digits' else np.uint8
      images = _aligned_empty((len(ids), *shape), dtype)
    else:
      images = []
    labels = np.zeros([len(ids)], np.int32)
    count = 0
    for batch in ds.batch(256).as_numpy_iterator():
      n = len(batch['label'])
      if count + n > len(ids):  # More records than selected: changed.
        count = -1
        break
      if pixels:
        images[count:count + n] = batch['image']
      else:
        images.append(batch['image'])
      labels[count:count + n] = batch['label']
      count += n
    if count != len(ids):
      raise UserError(f'{part.dataset} split {part.split!r} changed while it '
                      'was read: prepare it again')
    if pixels:
      image = _wrap(images)
    else:
      image = tf.constant(np.concatenate(images) if images else
                          np.zeros([0], 'S1'))
    return {'image': image, 'label': labels}

  def decoder(self, part: benchmarks.Part, *, decoded: bool = False):
    """Function: stored image -> float32 [h, w, 3] in [0, 1].

    `decoded`: the images are pixels already (`load(..., decoded=True)`).
    """
    max_value = self.max_value(part)
    if decoded or part.dataset == 'digits':
      return lambda pixels: preprocess.to_float_rgb(pixels, max_value=max_value)
    decode_pixels = self.pixel_decoder(part)
    return lambda data: preprocess.to_float_rgb(decode_pixels(data))

  def split_size(self, part: benchmarks.Part) -> int:
    return self._split_size(part.dataset, part.split)


# TensorFlow's kernels need their inputs on this boundary (EIGEN_MAX_ALIGN_BYTES).
_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array whose data starts on an `_ALIGN`-byte boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buffer = np.empty(nbytes + _ALIGN, np.uint8)
  start = -buffer.ctypes.data % _ALIGN
  return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _wrap(array: np.ndarray) -> tf.Tensor:
  """A tf.Tensor over an aligned array's memory, without a copy.

  The tensor keeps the array alive; the array must not change afterwards.
  """
  if not array.size:
    return tf.constant(array)
  return tf.experimental.dlpack.from_dlpack(array.__dlpack__())


def replay(records: dict, rows: np.ndarray,
           keys: np.ndarray) -> tf.data.Dataset:
  """Records in the order `rows` gives, each with its augmentation key.

  Args:
    records: as `RecordSources.load` returns them.
    rows: int64 [n] indices into the records.
    keys: int64 [n] augmentation key of each element.

  Yields:
    (image as stored, int32 label, int64 key).
  """
  images, labels = records['image'], tf.constant(records['label'])
  # Gathering from tensors held in memory: no Python per element.
  return tf.data.Dataset.from_tensor_slices((rows, keys)).map(_no_autograph(
      lambda row, key: (tf.gather(images, row), tf.gather(labels, row), key)))
