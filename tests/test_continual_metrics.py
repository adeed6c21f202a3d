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


def test_shared_eval_set_matrix():
  # Domain-incremental: one eval set evaluated after every task.
  a = np.array([[50.0, 60.0, 55.0]])
  m = continual_metrics.summarize(a, 2)
  assert m["avg_acc"] == 55.0
  assert m["forgetting"] == pytest.approx(5.0)  # max(50, 60) - 55


def test_json_round_trip_keeps_nan():
  back = continual_metrics.matrix_from_json(continual_metrics.matrix_to_json(MATRIX))
  np.testing.assert_array_equal(np.isnan(back), np.isnan(MATRIX))
  np.testing.assert_array_equal(np.nan_to_num(back), np.nan_to_num(MATRIX))


def test_matrix_image_shape_and_colours():
  img = continual_metrics.matrix_image(MATRIX, cell=4)
  assert img.shape == (1, 12, 12, 3) and img.dtype == np.uint8
  assert (img[0, 4, 0] == 0).all()  # NaN cell is black
  assert img[0, 0, 0].sum() > img[0, 0, 8].sum()  # 90% brighter than 70%
