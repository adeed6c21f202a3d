"""Small data helpers for the input pipeline tests: configs, fake archives."""

import io
import tarfile
import zipfile

import ml_collections
import numpy as np
import tensorflow as tf


def pipeline_config(dataset: str, **overrides) -> ml_collections.ConfigDict:
  """A config with the keys the input pipeline reads, sized for tests."""
  config = ml_collections.ConfigDict({
      'dataset': dataset, 'data_dir': None, 'per_device_batch_size': 2,
      'input_size': 8, 'resize_size': 10, 'norm_01': True, 'num_epochs': 2,
      'shuffle_buffer_size': 10000, 'seed': 0, 'subsample_rate': -1.0,
      'reverse_task': False, 'gaussian_schedule': False,
      # The host prepares network inputs; tests of the device path turn it on.
      'preprocess_on_device': False,
      'continual': {'num_tasks': 10, 'num_classes_per_task': 10,
                    'rand_seed': -1, 'num_train_steps_per_task': -1},
  })
  config.update_from_flattened_dict(overrides)
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
