"""What a run writes: the original's TensorBoard tags and units, results.json, the printed matrix."""

import json

import numpy as np
import pytest

from configs import digits_l2p
from libml import reporting

NAN = np.nan


class RecordingWriter:
  """Collects what `reporting` writes, as a clu MetricWriter would receive it."""

  def __init__(self):
    self.scalars, self.histograms, self.images = {}, {}, {}

  def write_scalars(self, step, scalars):
    self.scalars.update({k: (step, v) for k, v in scalars.items()})

  def write_histograms(self, step, arrays, num_buckets=None):
    self.histograms.update({k: (step, np.asarray(v)) for k, v in arrays.items()})

  def write_images(self, step, images):
    self.images.update({k: (step, v) for k, v in images.items()})

  def flush(self):
    pass


def _results():
  # Eval set -> Evaluator.evaluate output: accuracy in percent, prompt ids counted over the pool.
  return {0: {"accuracy": 60.0, "loss": 1.5, "count": 10, "prompt_counts": np.array([3, 0, 1])},
          1: {"accuracy": 90.0, "loss": 0.5, "count": 10, "prompt_counts": np.array([0, 2, 0])}}


def test_evaluation_is_written_with_the_original_tags_as_fractions():
  matrix = np.array([[80.0, 60.0], [NAN, 90.0]])
  writer = RecordingWriter()
  final = reporting.write_evaluation(writer, 17, 1, matrix, _results(), histogram=True)
  values = {k: v for k, (step, v) in writer.scalars.items() if step == 17}
  assert values["accuracy_0"] == pytest.approx(0.6) and values["accuracy_1"] == pytest.approx(0.9)
  assert values["eval_loss_0"] == 1.5 and values["eval_loss_1"] == 0.5
  assert values["avg_acc"] == pytest.approx(0.75)
  assert values["forgetting"] == pytest.approx(0.2)  # (80 - 60) / 100
  assert values["backward"] == pytest.approx(-0.2)
  assert values["learning_acc"] == pytest.approx(0.85)
  # The returned metrics, for results.json and the log, stay in percent.
  assert final["avg_acc"] == pytest.approx(75.0) and final["forgetting"] == pytest.approx(20.0)
  np.testing.assert_array_equal(writer.histograms["histogram_0"][1], [0, 0, 0, 2])
  np.testing.assert_array_equal(writer.histograms["histogram_1"][1], [1, 1])
  assert "accuracy_matrix" in writer.images


def test_no_histogram_unless_asked():
  writer = RecordingWriter()
  reporting.write_evaluation(writer, 1, 0, np.array([[50.0]]), {0: _results()[0]}, histogram=False)
  assert not writer.histograms


def test_text_log_gets_a_short_hparams_line_and_no_timing_scalars(tmp_path, caplog):
  writer = reporting._ScalarLoggingWriter(str(tmp_path))  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    writer.write_hparams({f"field_{i}": "x" * 40 for i in range(60)})
    writer.write_scalars(7, {"steps_per_sec": 3.0, "uptime": 9.0})  # ReportProgress's: TensorBoard only.
    writer.write_scalars(8, {"loss": 0.5, "uptime": 9.0})
  assert [r.getMessage() for r in caplog.records] == [
      f"Hyperparameters (60): in TensorBoard and {tmp_path}/config.json.", "[8] loss=0.5"]


def test_results_json_holds_percent_and_says_so(tmp_path):
  matrix = np.array([[80.0, 60.0], [NAN, 90.0]])
  config = digits_l2p.get_config("tiny")
  path = reporting.write_results(str(tmp_path), matrix, config, {"avg_acc": 75.0, "forgetting": 20.0})
  with open(path) as f:
    doc = json.load(f)
  assert doc["accuracy_unit"] == "percent"
  assert doc["accuracy_matrix"] == [[80.0, 60.0], [None, 90.0]]
  assert doc["avg_acc"] == 75.0 and doc["forgetting"] == 20.0
  assert doc["config"] == json.loads(config.to_json_best_effort())
  assert doc["config"]["dataset"] == "digits" and doc["config"]["continual"]["num_tasks"] == 2
  assert not (tmp_path / "results.json.tmp").exists()


def test_format_matrix_marks_missing_cells():
  text = reporting.format_matrix(np.array([[80.0, 60.5], [NAN, 90.0]]))
  assert text.splitlines() == ["eval\\task      0      1",
                               "        0  80.00  60.50",
                               "        1      -  90.00"]
