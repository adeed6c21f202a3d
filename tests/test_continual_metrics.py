"""Continual metrics against a hand-computed accuracy matrix."""

import numpy as np
import pytest

from libml import continual_metrics

NAN = np.nan
# Rows: eval set; columns: after training task.
MATRIX = np.array([[90.0, 80.0, 70.0],
                   [NAN, 85.0, 75.0],
                   [NAN, NAN, 95.0]])


def test_after_first_task_has_no_forgetting():
  m = continual_metrics.summarize(MATRIX, 0)
  assert m == {"avg_acc": 90.0, "learning_acc": 90.0}


def test_after_second_task():
  m = continual_metrics.summarize(MATRIX, 1)
  assert m["avg_acc"] == pytest.approx(82.5)
  assert m["forgetting"] == pytest.approx(10.0)  # 90 - 80
  assert m["backward"] == pytest.approx(-10.0)
  assert m["learning_acc"] == pytest.approx(87.5)


def test_after_third_task_uses_max_over_earlier_columns():
  m = continual_metrics.summarize(MATRIX, 2)
  assert m["avg_acc"] == pytest.approx(80.0)  # (70 + 75 + 95) / 3
  assert m["forgetting"] == pytest.approx(15.0)  # ((90 - 70) + (85 - 75)) / 2
  assert m["backward"] == pytest.approx(-15.0)  # ((70 - 90) + (75 - 85)) / 2
  assert m["learning_acc"] == pytest.approx(90.0)


def test_an_old_task_that_improves_forgets_nothing():
  # Task 0 rises from 80 to 85: the max includes the current column, so 0, not -5.
  a = np.array([[80.0, 85.0], [NAN, 90.0]])
  m = continual_metrics.summarize(a, 1)
  assert m["forgetting"] == 0.0
  assert m["backward"] == pytest.approx(5.0)


def _original_metrics(full, t):
  """The original's loop: a zero [T, T] matrix filled column by column up to t."""
  acc_matrix = np.zeros((full.shape[1], full.shape[1]))
  for col in range(t + 1):
    for i in range(full.shape[0]):
      if not np.isnan(full[i, col]):
        acc_matrix[i, col] = full[i, col]
  diagonal = np.diag(acc_matrix)
  out = {"learning_acc": np.mean(diagonal[:t + 1])}
  if t > 0:
    out["forgetting"] = np.mean((np.max(acc_matrix, axis=1) - acc_matrix[:, t])[:t])
    out["backward"] = np.mean((acc_matrix[:, t] - diagonal)[:t])
  return out


@pytest.mark.parametrize("seed", range(5))
def test_random_matrices_equal_the_original_formulas(seed):
  rng = np.random.default_rng(seed)
  full = np.triu(rng.uniform(0, 100, size=(10, 10)))
  full[np.tril_indices(10, -1)] = NAN
  for t in range(10):
    got = continual_metrics.summarize(full, t)
    for key, value in _original_metrics(full, t).items():
      assert got[key] == pytest.approx(value, abs=1e-9), (key, t)


def test_shared_eval_set_matrix():
  # Domain-incremental: one eval set evaluated after every task. As the original, the
  # rows past it count as zeros: forgetting (max(50, 60) - 55 + 0) / 2.
  a = np.array([[50.0, 60.0, 55.0]])
  m = continual_metrics.summarize(a, 2)
  assert m["avg_acc"] == 55.0
  assert m["forgetting"] == pytest.approx(5.0 / 2)
  assert m["learning_acc"] == pytest.approx(50.0 / 3)
  for t in range(3):
    got = continual_metrics.summarize(a, t)
    for key, value in _original_metrics(a, t).items():
      assert got[key] == pytest.approx(value), (key, t)


def test_skipped_evaluations_count_as_zero():
  # eval_last_only: only the last column is evaluated.
  a = np.array([[NAN, 70.0], [NAN, 90.0]])
  m = continual_metrics.summarize(a, 1)
  assert m["avg_acc"] == 80.0
  assert m["forgetting"] == 0.0 and m["backward"] == 70.0
  assert m["learning_acc"] == 45.0


def test_json_round_trip_keeps_nan():
  back = continual_metrics.matrix_from_json(continual_metrics.matrix_to_json(MATRIX))
  np.testing.assert_array_equal(np.isnan(back), np.isnan(MATRIX))
  np.testing.assert_array_equal(np.nan_to_num(back), np.nan_to_num(MATRIX))
