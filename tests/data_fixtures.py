"""Small data helpers for the input pipeline tests: configs, fake archives."""

import io
import tarfile
import zipfile

import ml_collections
import numpy as np
import tensorflow as tf

from configs import cifar100_l2p


def pipeline_config(dataset: str, **overrides) -> ml_collections.ConfigDict:
  """configs/cifar100_l2p.py on `dataset`, sized for the input pipeline tests.

  2 images per device, 8 x 8 inputs from 10 x 10 resized images, 2 epochs, seed 0 (the
  tests' expectations were drawn with it); the host prepares the network inputs (tests of
  the device path turn `preprocess_on_device` on). `overrides` are flattened field names.
  """
  config = cifar100_l2p.get_config()
  config.update_from_flattened_dict({
      'dataset': dataset, 'per_device_batch_size': 2, 'input_size': 8, 'resize_size': 10,
      'num_epochs': 2, 'seed': 0, 'preprocess_on_device': False, **overrides})
  return config


def batches(ds) -> list[dict[str, np.ndarray]]:
  return list(ds.as_numpy_iterator())


def valid_labels(batch_list) -> np.ndarray:
  """Labels of real (unpadded) examples of a list of eval batches."""
  return np.concatenate([b['label'][b['mask']] for b in batch_list])


def png(image: np.ndarray) -> bytes:
  return tf.io.encode_png(image).numpy()


def write_core50_zip(path: str, sessions, objects, frames: int = 2) -> dict:
  """A core50_128x128.zip with the real member layout.

  Every image is one flat colour that encodes (session, object, frame).
  Returns {member name: (session, object id 1..50, png bytes)}.
  """
  members = {}
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('core50_128x128/', b'')  # Directory entries exist too.
    for s in sessions:
      for o in objects:
        for f in range(frames):
          name = f'core50_128x128/s{s}/o{o}/C_{s:02d}_{o:02d}_{f:03d}.png'
          data = png(np.full((128, 128, 3), [s, o, f], np.uint8))
          archive.writestr(name, data)
          members[name] = (s, o, data)
  return members


def write_not_mnist_tar(path: str, per_letter: int = 3) -> dict:
  """A notMNIST_small.tar.gz with the real layout and one empty (broken) file.

  Returns {member name: (label 0..9, png bytes)} of the readable images.
  """
  members = {}
  with tarfile.open(path, 'w:gz') as archive:

    def add(name: str, data: bytes):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))

    for label, letter in enumerate('ABCDEFGHIJ'):
      for i in range(per_letter):
        data = png(np.full((28, 28, 1), 20 * label + i, np.uint8))
        add(f'notMNIST_small/{letter}/font{i}.png', data)
        members[f'notMNIST_small/{letter}/font{i}.png'] = (label, data)
    add('notMNIST_small/A/broken.png', b'')
  return members
