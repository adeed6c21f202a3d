"""Continual-learning metrics computed from the accuracy matrix.

The accuracy matrix A has shape [num_eval_sets, num_tasks]: A[i, t] is the top-1 accuracy
(in percent) on eval set i after training task t, NaN where that pair was not evaluated.
"""

from typing import Mapping

import numpy as np


def _nanmean(values) -> float:
  values = np.asarray(values, dtype=np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def summarize(matrix: np.ndarray, task: int) -> Mapping[str, float]:
  """The metrics of the original after training `task`.

  Args:
    matrix: [num_eval_sets, num_tasks] accuracy matrix, NaN where not evaluated.
    task: index of the task just trained (a column of `matrix`).

  Returns:
    `avg_acc`: mean accuracy over the eval sets evaluated after `task`.
    `learning_acc`: mean of the diagonal A[i, i] for i <= task.
    `forgetting` (task > 0): mean over eval sets i < task of
      (max of A[i, j] over the earlier columns j < task) - A[i, task].
    `backward` (task > 0): mean over i < task of A[i, task] - A[i, i].
  """
  a = np.asarray(matrix, dtype=np.float64)
  column = a[:, task]
  diagonal = np.array([a[i, i] for i in range(min(a.shape[0], task + 1))])
  metrics = {"avg_acc": _nanmean(column), "learning_acc": _nanmean(diagonal)}
  if task > 0:
    earlier = np.arange(min(a.shape[0], task))
    forgetting, backward = [], []
    for i in earlier:
      if np.isnan(a[i, task]):
        continue
      previous = a[i, :task]
      if np.all(np.isnan(previous)):
        continue
      forgetting.append(np.nanmax(previous) - a[i, task])
      if i < a.shape[1] and not np.isnan(a[i, i]):
        backward.append(a[i, task] - a[i, i])
    metrics["forgetting"] = _nanmean(forgetting)
    metrics["backward"] = _nanmean(backward)
  return {k: v for k, v in metrics.items() if not np.isnan(v)}


def matrix_to_json(matrix: np.ndarray) -> list[list[float | None]]:
  """[E, T] matrix as nested lists with None for NaN (JSON has no NaN)."""
  return [[None if np.isnan(x) else float(x) for x in row] for row in np.asarray(matrix)]


def matrix_from_json(rows) -> np.ndarray:
  return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float64)


def matrix_image(matrix: np.ndarray, cell: int = 16) -> np.ndarray:
  """Renders the matrix as an RGB heat map for TensorBoard.

  Args:
    matrix: [E, T] accuracies in percent, NaN where not evaluated (drawn black).
    cell: pixels per cell side.

  Returns:
    [1, E * cell, T * cell, 3] uint8 image: dark blue (0%) to yellow (100%).
  """
  a = np.nan_to_num(np.asarray(matrix, dtype=np.float64) / 100.0, nan=-1.0)
  low, high = np.array([30, 30, 120.0]), np.array([250, 230, 40.0])
  rgb = low + np.clip(a, 0, 1)[..., None] * (high - low)
  rgb[a < 0] = 0
  rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
  return rgb.astype(np.uint8)[None]
