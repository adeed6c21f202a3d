"""TFDS builder for CORe50 (object recognition over 11 recording sessions).

Prepared from the archive the user downloads by hand; one split per session.
"""

import os
import re
import zipfile

import tensorflow_datasets as tfds

ARCHIVE = 'core50_128x128.zip'
NUM_SESSIONS = 11
NUM_CLASSES = 50
# Members look like core50_128x128/s3/o17/C_03_17_042.png.
_MEMBER = re.compile(r'(?:^|/)s(\d+)/o(\d+)/[^/]+\.png$')


class Core50(tfds.core.GeneratorBasedBuilder):
  """CORe50 at 128x128: 50 objects, one split per session 's1'..'s11'."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Sessions as splits, object id as label.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download {ARCHIVE} from https://vlomonaco.github.io/core50/ and place '
      'it, unextracted, in the manual directory.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='CORe50 objects, 128x128 crops, split by session.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(128, 128, 3)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://vlomonaco.github.io/core50/',
    )

  def _split_generators(self, dl_manager):
    path = os.path.join(dl_manager.manual_dir, ARCHIVE)
    # The zip's directory is read once; each split then reads only its members.
    with zipfile.ZipFile(path) as archive:
      by_session = {}
      for name in archive.namelist():
        match = _MEMBER.search(name)
        if match:
          session, obj = int(match.group(1)), int(match.group(2))
          by_session.setdefault(session, []).append((name, obj - 1))
    return {
        f's{session}': self._generate_examples(path, members)
        for session, members in sorted(by_session.items())
    }

  def _generate_examples(self, path, members):
    with zipfile.ZipFile(path) as archive:
      for name, label in members:
        # The PNG bytes are stored as they are: no decode, no re-encode.
        yield name, {'image': archive.read(name), 'label': label}
