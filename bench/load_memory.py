r"""Host memory taken by decoding a task's training images once, on generated data.

  python bench/load_memory.py [--num_examples 8000]

TFDS is mocked with random 128x128 PNG records in the CORe50 layout (nothing is
downloaded). Measured: the resident memory of this process while
`RecordSources.load(..., decoded=True)` reads and decodes one split, sampled
every millisecond, against the size of the decoded images it returns.
"""

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from libml import benchmarks
from libml import record_sources
from libml import tfds_builders  # pylint: disable=unused-import  (registers core50)

_SIDE = 128
_DISTINCT_IMAGES = 256


def _fake_split(num_examples: int):
  """A TFDS `_as_dataset` stand-in: encoded random images, labels i % 50."""
  rng = np.random.default_rng(0)
  pngs = tf.constant([
      tf.io.encode_png(rng.integers(0, 256, (_SIDE, _SIDE, 3), np.uint8)).numpy()
      for _ in range(_DISTINCT_IMAGES)])

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, split, decoders, read_config, shuffle_files
    ds = tf.data.Dataset.range(num_examples).map(lambda i: {
        'image': tf.gather(pngs, i % _DISTINCT_IMAGES), 'label': i % 50})
    return ds.apply(tf.data.experimental.assert_cardinality(num_examples))

  return as_dataset


def _resident_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class _PeakWatcher:
  """Samples the resident memory in a thread; `peak` is the largest sample."""

  def __init__(self):
    self.peak = _resident_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _resident_bytes())
      time.sleep(0.001)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _resident_bytes())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_examples', type=int, default=8000)
  args = parser.parse_args()
  part = benchmarks.Part(dataset='core50', split='s1')
  with tfds.testing.mock_data(as_dataset_fn=_fake_split(args.num_examples)):
    source = record_sources.RecordSources(None, num_classes=50)
    ids = source.select(part)
    source.load(part, ids[:64], decoded=True)  # Warm-up: TensorFlow's own allocations.
    base = _resident_bytes()
    with _PeakWatcher() as watcher:
      records = source.load(part, ids, decoded=True)
    held = _resident_bytes() - base
  mib = 2**20
  size = records['image'].shape.num_elements() * records['image'].dtype.size
  print(f'{len(ids)} images {tuple(records["image"].shape[1:])}: {size / mib:.0f} MiB decoded')
  print(f'while loading: +{(watcher.peak - base) / mib:.0f} MiB '
        f'({(watcher.peak - base) / size:.2f}x the images); held after: +{held / mib:.0f} MiB')


if __name__ == '__main__':
  main()
