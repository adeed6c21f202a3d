"""The project's TFDS builders, prepared from tiny fake archives."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from libml import benchmarks
from libml import input_pipeline
from libml import prepare_data
from libml import record_sources
from libml.errors import UserError
from tests import data_fixtures


def _manual_dir(data_dir) -> str:
  path = os.path.join(data_dir, 'downloads', 'manual')
  os.makedirs(path, exist_ok=True)
  return path


def _stored(data_dir, name: str, split: str) -> list[tuple[bytes, int]]:
  """(encoded image, label) of every record, as TFDS stored them."""
  ds = tfds.builder(name, data_dir=str(data_dir)).as_dataset(
      split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return sorted((ex['image'], int(ex['label'])) for ex in tfds.as_numpy(ds))


@pytest.fixture(scope='module')
def core50_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  members = data_fixtures.write_core50_zip(
      os.path.join(_manual_dir(data_dir), 'core50_128x128.zip'),
      sessions=range(1, 12), objects=(1, 50), frames=1)
  prepare_data.prepare('core50', str(data_dir))
  return data_dir, members


def test_core50_one_split_per_session_object_id_as_label(core50_dir):
  data_dir, members = core50_dir
  builder = tfds.builder('core50', data_dir=str(data_dir))
  assert set(builder.info.splits) == {f's{s}' for s in range(1, 12)}
  for session in (1, 7, 11):
    expected = sorted((data, obj - 1) for s, obj, data in members.values()
                      if s == session)
    # The archive's PNG bytes are stored untouched (no re-encoding).
    assert _stored(data_dir, 'core50', f's{session}') == expected


def test_core50_benchmark_reads_sessions_from_prepared_data(core50_dir):
  data_dir, _ = core50_dir
  config = data_fixtures.pipeline_config(
      'core50', data_dir=str(data_dir), per_device_batch_size=1,
      **{'continual.num_tasks': 8})
  bench = input_pipeline.create_benchmark(config, num_local_devices=2,
                                          process_index=0, process_count=1)
  assert bench.num_tasks == 8 and bench.num_classes == 50
  assert bench.num_eval_sets == 1 and bench.eval_sets_after(5) == [0]
  np.testing.assert_array_equal(bench.class_masks[3], np.arange(50))
  # Fake pixels are (session, object, frame) / 255: the red channel names the
  # session each example came from.
  session_of = lambda image: np.rint(image[..., 0, 0, 0] * 255).astype(int)
  for task, session in ((0, 1), (3, 5), (7, 11)):
    (batch,) = data_fixtures.batches(bench.train_dataset(task).take(1))
    assert set(session_of(batch['image']).ravel()) == {session}
  evals = data_fixtures.batches(bench.eval_dataset(0))
  sessions = np.concatenate([session_of(b['image'])[b['mask']] for b in evals])
  assert sorted(sessions) == [3, 3, 7, 7, 10, 10]
  assert sorted(data_fixtures.valid_labels(evals)) == [0, 0, 0, 49, 49, 49]


def test_not_mnist_skips_broken_files_and_splits_80_20(tmp_path):
  members = data_fixtures.write_not_mnist_tar(
      os.path.join(_manual_dir(tmp_path), 'notMNIST_small.tar.gz'))
  prepare_data.prepare('not_mnist', str(tmp_path))
  assert _stored(tmp_path, 'not_mnist', 'train') == sorted(
      (data, label) for label, data in members.values())
  sources = record_sources.RecordSources(str(tmp_path), num_classes=10)
  train = sources.select(benchmarks.Part('not_mnist', 'train', (0, 80)))
  test = sources.select(benchmarks.Part('not_mnist', 'train', (80, 100)))
  np.testing.assert_array_equal(train, np.arange(24))
  np.testing.assert_array_equal(test, np.arange(24, 30))


@pytest.mark.parametrize('name, archive', [
    ('core50', 'core50_128x128.zip'), ('not_mnist', 'notMNIST_small.tar.gz')])
def test_missing_archive_is_one_line_error_and_writes_nothing(
    tmp_path, name, archive):
  with pytest.raises(UserError) as error:
    prepare_data.prepare(name, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual', archive) in message
  assert f'python -m libml.prepare_data {name} --data_dir {tmp_path}' in message
  assert not os.path.exists(os.path.join(tmp_path, name))


def test_prepare_cli_reports_errors_with_status_2(tmp_path, capsys):
  assert prepare_data.main(['core50', '--data_dir', str(tmp_path)]) == 2
  assert 'core50_128x128.zip' in capsys.readouterr().err


@pytest.mark.parametrize('dataset, command', [
    ('cifar100', 'tfds build cifar100 --data_dir {}'),
    ('core50', 'python -m libml.prepare_data core50 --data_dir {}'),
    ('5datasets', 'tfds build cifar10 --data_dir {}'),
])
def test_benchmark_on_unprepared_data_says_what_to_run(tmp_path, dataset,
                                                       command):
  config = data_fixtures.pipeline_config(dataset, data_dir=str(tmp_path),
                                         **{'continual.num_tasks': 5})
  with pytest.raises(UserError) as error:
    input_pipeline.create_benchmark(config, num_local_devices=1,
                                    process_index=0, process_count=1)
  message = str(error.value)
  assert '\n' not in message and repr(dataset.replace('5datasets', 'cifar10')
                                      ) in message
  assert command.format(tmp_path) in message
  assert not os.listdir(tmp_path)  # Nothing downloaded, nothing written.
