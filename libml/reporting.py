"""What a run writes for people: TensorBoard summaries and `results.json`."""

import json
import os
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np
from clu import metric_writers

from libml import continual_metrics
from libml import matrix_figure


# ReportProgress's timing scalars: TensorBoard's; the log has one progress line per task.
_TIMING_SCALARS = ("steps_per_sec", "uptime")


class _ScalarLoggingWriter(metric_writers.LoggingWriter):
  """Logs scalars only: histograms, images and hyperparameters belong in TensorBoard."""

  def __init__(self, workdir: str):
    super().__init__()
    self._workdir = workdir

  def write_scalars(self, step, scalars):
    scalars = {k: v for k, v in scalars.items() if k not in _TIMING_SCALARS}
    if scalars:
      super().write_scalars(step, scalars)

  def write_hparams(self, hparams):
    # The whole config, one line of thousands of characters, is in config.json.
    logging.info("Hyperparameters (%d): in TensorBoard and %s.", len(hparams),
                 os.path.join(self._workdir, "config.json"))

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_images(self, step, images):
    del step, images


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log writer on process 0; nothing is written by the other processes."""
  writers = [_ScalarLoggingWriter(workdir)]
  if jax.process_index() == 0:
    writers.append(metric_writers.SummaryWriter(workdir))
  return metric_writers.MultiWriter(writers)


def write_hparams(writer, config: ml_collections.ConfigDict) -> None:
  flat = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, (dict, ml_collections.ConfigDict)):
        visit(name + ".", value)
      else:
        flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

  visit("", config)
  writer.write_hparams(flat)


def eval_scalars(results: Mapping[int, dict]) -> dict[str, float]:
  """The original's tags of one evaluation: `accuracy_i` and `avg_acc` as fractions in [0, 1].

  Args:
    results: eval set -> Evaluator.evaluate output (accuracy in percent).

  Returns:
    {'accuracy_i', 'eval_loss_i' for each eval set i, 'avg_acc'}.
  """
  scalars = {}
  for i, r in results.items():
    scalars[f"accuracy_{i}"] = r["accuracy"] / 100.0
    scalars[f"eval_loss_{i}"] = r["loss"]
  scalars["avg_acc"] = float(np.mean([r["accuracy"] for r in results.values()])) / 100.0
  return scalars


def write_histograms(writer, step: int, results: Mapping[int, dict]) -> None:
  """`histogram_i`: the pool ids chosen for eval set i's images (as the original names it)."""
  hists = {f"histogram_{i}": np.repeat(np.arange(len(r["prompt_counts"])), r["prompt_counts"])
           for i, r in results.items() if r.get("prompt_counts") is not None}
  if hists:
    writer.write_histograms(step, hists)


def write_evaluation(writer, step: int, task: int, matrix: np.ndarray, results: Mapping[int, dict],
                     *, histogram: bool) -> dict[str, float]:
  """Writes the end-of-task evaluation: `eval_scalars`, the continual metrics, histograms.

  Accuracies and the continual metrics are written as the original wrote them, fractions in
  [0, 1] (the matrix, `results.json` and the log keep percent).

  Args:
    writer: metric writer.
    step: global train step.
    task: task just trained; column of `matrix` filled by `results`.
    matrix: [E, T] accuracy matrix in percent (already holding this evaluation).
    results: eval set -> Evaluator.evaluate output.
    histogram: also write one histogram of chosen prompt ids per eval set.

  Returns:
    The continual metrics in percent.
  """
  final = dict(continual_metrics.summarize(matrix, task))
  scalars = eval_scalars(results)
  scalars.update({k: v / 100.0 for k, v in final.items() if k != "avg_acc"})
  writer.write_scalars(step, scalars)
  if histogram:
    write_histograms(writer, step, results)
  writer.write_images(step, {"accuracy_matrix": matrix_figure.image(matrix)})
  writer.flush()
  return final


def write_results(workdir: str, matrix: np.ndarray, config: ml_collections.ConfigDict,
                  final: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> str:
  """Writes `workdir/results.json` atomically (process 0 only); returns its path.

  `run` (from `validation.record_run`: topology, versions, git_commit, starts) is written
  before the config, so that two runs' files tell their devices and libraries apart.
  """
  path = os.path.join(workdir, "results.json")
  if jax.process_index() != 0:
    return path
  doc = {
      "accuracy_matrix": continual_metrics.matrix_to_json(matrix),
      "accuracy_matrix_layout": "rows: eval set (task) evaluated; columns: after training task",
      # TensorBoard holds the original's fractions; this file, like the log, percent.
      "accuracy_unit": "percent",
      **{k: float(v) for k, v in final.items()},
      **(run or {}),
      "config": json.loads(config.to_json_best_effort()),
  }
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)
  return path


def format_matrix(matrix: np.ndarray) -> str:
  """Human-readable accuracy matrix for the log and the demo."""
  header = "eval\\task " + " ".join(f"{t:>6d}" for t in range(matrix.shape[1]))
  rows = [f"{i:>9d} " + " ".join("     -" if np.isnan(x) else f"{x:6.2f}" for x in row)
          for i, row in enumerate(matrix)]
  return "\n".join([header] + rows)
