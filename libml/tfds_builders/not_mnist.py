"""TFDS builder for notMNIST (letters A-J in many fonts, 28x28 grayscale)."""

import os

import tensorflow as tf
import tensorflow_datasets as tfds

ARCHIVE = 'notMNIST_small.tar.gz'
LETTERS = 'ABCDEFGHIJ'


def _is_valid_image(data: bytes) -> bool:
  """The archive holds a few empty or truncated files; they are left out."""
  try:
    shape = tf.io.decode_png(data, channels=1).shape
  except tf.errors.InvalidArgumentError:
    return False
  return tuple(shape) == (28, 28, 1)


class NotMnist(tfds.core.GeneratorBasedBuilder):
  """notMNIST (small set) as one 'train' split; label 0..9 = letter A..J."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Readable images of notMNIST_small.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {ARCHIVE} from http://yaroslavvb.com/upload/notMNIST/ and '
      'place it, unextracted, in the manual directory.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='notMNIST letters A-J, 28x28 grayscale.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=list(LETTERS)),
        }),
        supervised_keys=('image', 'label'),
        homepage='http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html',
    )

  def _split_generators(self, dl_manager):
    path = os.path.join(dl_manager.manual_dir, ARCHIVE)
    return {'train': self._generate_examples(dl_manager.iter_archive(path))}

  def _generate_examples(self, archive):
    # Members look like notMNIST_small/C/<base64 font name>.png.
    for name, fobj in archive:
      parts = name.replace('\\', '/').split('/')
      if len(parts) < 2 or parts[-2] not in LETTERS:
        continue
      data = fobj.read()
      if name.endswith('.png') and _is_valid_image(data):
        yield name, {'image': data, 'label': LETTERS.index(parts[-2])}
