r"""Prepares the datasets that the project builds itself from manual downloads.

  python -m libml.prepare_data core50 --data_dir ~/tensorflow_datasets
  python -m libml.prepare_data not_mnist --data_dir ~/tensorflow_datasets

The archive must already sit in `<data_dir>/downloads/manual/` (core50:
core50_128x128.zip; not_mnist: notMNIST_small.tar.gz). TFDS writes the
prepared files under a temporary name and renames them when complete, so an
interrupted run leaves nothing half written.
"""

import argparse
import os
import sys

import tensorflow_datasets as tfds

from libml import tfds_builders
from libml.errors import UserError


def prepare(name: str, data_dir: str | None) -> str:
  """Builds dataset `name` from its archive; returns the prepared directory."""
  if name not in tfds_builders.BUILDERS:
    raise UserError(f'unknown dataset {name!r} for prepare_data; valid: '
                    f'{", ".join(sorted(tfds_builders.BUILDERS))}')
  builder_cls, archive = tfds_builders.BUILDERS[name]
  manual_dir = tfds_builders.manual_dir(data_dir)
  if not os.path.isfile(os.path.join(manual_dir, archive)):
    raise UserError(tfds_builders.not_prepared_message(name, data_dir))
  builder = builder_cls(data_dir=tfds_builders.data_dir_root(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
  return builder.data_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('name', help=', '.join(sorted(tfds_builders.BUILDERS)))
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data directory (default: TFDS default)')
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.data_dir)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'prepared {args.name} in {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
