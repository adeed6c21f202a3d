r"""Throughput of the Split CIFAR-100 training pipeline, on generated data.

  python bench/input_pipeline.py [--steps 30] [--input_size 224] [--on_device]

TFDS is mocked with random 32x32 PNG records (nothing is downloaded). Timed:
the stream of one task as training consumes it, after warm-up, in batches of
8 x 16. By default the host prepares the network inputs (resize to 256,
random resized crop to 224, flip). With --on_device it sends the stored 32x32
images with their crop windows, as `preprocess_on_device` does; the steps then
build the inputs (see `bench/step_benchmark.py --source_size 32` for that cost).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import cifar100_l2p
from libml import input_pipeline

_DISTINCT_IMAGES = 512


def _fake_cifar100(num_examples: int):
  """A TFDS `_as_dataset` stand-in: encoded random images, labels i % 100."""
  rng = np.random.default_rng(0)
  pngs = tf.constant([
      tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), np.uint8)).numpy()
      for _ in range(_DISTINCT_IMAGES)])

  def as_dataset(self, split, decoders=None, read_config=None,
                 shuffle_files=False):
    del self, split, decoders, read_config, shuffle_files
    ds = tf.data.Dataset.range(num_examples).map(lambda i: {
        'image': tf.gather(pngs, i % _DISTINCT_IMAGES), 'label': i % 100})
    return ds.apply(tf.data.experimental.assert_cardinality(num_examples))

  return as_dataset


def _config(args) -> ml_collections.ConfigDict:
  """configs/cifar100_l2p.py with the sizes of the command line."""
  config = cifar100_l2p.get_config()
  config.per_device_batch_size = args.per_device_batch_size
  config.input_size, config.resize_size = args.input_size, args.resize_size
  config.preprocess_on_device = args.on_device
  config.seed = 0
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--warmup_steps', type=int, default=3)
  parser.add_argument('--num_examples', type=int, default=50000,
                      help='records in the generated train split')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--per_device_batch_size', type=int, default=16)
  parser.add_argument('--input_size', type=int, default=224)
  parser.add_argument('--resize_size', type=int, default=256)
  parser.add_argument('--on_device', action='store_true',
                      help='send stored images and crop windows (preprocess_on_device)')
  args = parser.parse_args()
  with tfds.testing.mock_data(as_dataset_fn=_fake_cifar100(args.num_examples)):
    start = time.perf_counter()
    benchmark = input_pipeline.create_benchmark(
        _config(args), num_local_devices=args.devices, process_index=0,
        process_count=1)
    batches = iter(benchmark.train_dataset(0))
    for _ in range(args.warmup_steps):
      next(batches)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(batches)
    elapsed = time.perf_counter() - start
  images = args.steps * args.devices * args.per_device_batch_size
  print(f'batches {tuple(batch["image"].shape)} on {os.cpu_count()} CPUs; '
        f'set-up and warm-up {setup:.1f} s')
  mib = sum(v.numpy().nbytes for v in batch.values()) / 2**20
  print(f'{images / elapsed:.0f} images/s, {mib:.2f} MiB per batch to the devices')


if __name__ == '__main__':
  main()
