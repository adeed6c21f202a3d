"""The project's TFDS builders for datasets TFDS does not ship.

Importing this package registers them with TFDS ('core50', 'not_mnist').
Both prepare from an archive the user downloads by hand into
`<data_dir>/downloads/manual/`; `python -m libml.prepare_data NAME` builds them.
"""

import os

import tensorflow_datasets as tfds

from libml.tfds_builders import core50
from libml.tfds_builders import not_mnist

# TFDS name -> (builder class, archive file the user downloads).
BUILDERS = {
    'core50': (core50.Core50, core50.ARCHIVE),
    'not_mnist': (not_mnist.NotMnist, not_mnist.ARCHIVE),
}


def data_dir_root(data_dir: str | None) -> str:
  """The TFDS data directory used for `data_dir` (None: TFDS's default)."""
  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def manual_dir(data_dir: str | None) -> str:
  """Where TFDS looks for archives downloaded by hand."""
  return os.path.join(data_dir_root(data_dir), 'downloads', 'manual')


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command that prepares the project-built dataset `name`."""
  command = f'python -m libml.prepare_data {name}'
  return command + (f' --data_dir {data_dir}' if data_dir else '')


def not_prepared_message(name: str, data_dir: str | None) -> str:
  """One line telling the user which file to place where, and what to run."""
  archive = os.path.join(manual_dir(data_dir), BUILDERS[name][1])
  return (f'dataset {name!r} is not prepared in {data_dir_root(data_dir)}: put '
          f'{BUILDERS[name][1]} at {archive} and run '
          f'`{prepare_command(name, data_dir)}`')
