"""Continual-learning metrics computed from the accuracy matrix.

The accuracy matrix A has shape [num_eval_sets, num_tasks]: A[i, t] is the top-1 accuracy
(in percent) on eval set i after training task t, NaN where that pair was not evaluated.
"""

from typing import Mapping

import numpy as np


def summarize(matrix: np.ndarray, task: int) -> Mapping[str, float]:
  """The metrics of the original after training `task`, in the matrix's unit.

  As the original, the formulas read a square [T, T] matrix with 0 wherever nothing was
  evaluated: rows past the eval sets (one shared test set, as CORe50's, fills row 0 only)
  and skipped evaluations (`eval_last_only`) count as accuracy 0.

  Args:
    matrix: [num_eval_sets, num_tasks] accuracy matrix, NaN where not evaluated.
    task: index t of the task just trained (a column of `matrix`).

  Returns:
    `avg_acc`: mean accuracy over the eval sets evaluated after task t.
    `learning_acc`: mean of the diagonal A[i, i], i <= t.
    `forgetting` (t > 0): mean over i < t of max(A[i, 0..t]) - A[i, t]; the max
      includes column t, so no term is negative.
    `backward` (t > 0): mean over i < t of A[i, t] - A[i, i].
  """
  a = np.asarray(matrix, dtype=np.float64)
  column = a[:, task][~np.isnan(a[:, task])]
  num_tasks = a.shape[1]
  square = np.zeros([num_tasks, num_tasks])
  square[:min(a.shape[0], num_tasks)] = np.nan_to_num(a[:num_tasks], nan=0.0)
  diagonal = np.diag(square)
  metrics = {"learning_acc": float(diagonal[:task + 1].mean())}
  if column.size:
    metrics["avg_acc"] = float(column.mean())
  if task > 0:
    seen = square[:task, :task + 1]
    metrics["forgetting"] = float((seen.max(axis=1) - seen[:, task]).mean())
    metrics["backward"] = float((seen[:, task] - diagonal[:task]).mean())
  return metrics


def matrix_to_json(matrix: np.ndarray) -> list[list[float | None]]:
  """[E, T] matrix as nested lists with None for NaN (JSON has no NaN)."""
  return [[None if np.isnan(x) else float(x) for x in row] for row in np.asarray(matrix)]


def matrix_from_json(rows) -> np.ndarray:
  return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float64)
