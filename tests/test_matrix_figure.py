"""The accuracy-matrix figure: what it prints, its labels, colours and image size."""

import numpy as np
import pytest
from matplotlib import colors

from libml import matrix_figure, reporting

NAN = np.nan
# Rows: eval set; columns: after training task; NaN where not yet evaluated.
MATRIX = np.array([[97.5, 80.04, 70.0],
                   [NAN, 85.96, 0.0],
                   [NAN, NAN, 100.0]])
VIRIDIS_0 = (68, 1, 84)  # #440154
VIRIDIS_HALF = (33, 145, 140)  # #21918c


def _render(matrix):
  """(figure, its [H, W, 3] pixels) drawn by the figure's own canvas."""
  fig = matrix_figure.figure(matrix)
  fig.canvas.draw()
  return fig, np.asarray(fig.canvas.buffer_rgba())[..., :3]


def _cell_pixel(fig, pixels, row, col):
  """Pixel near the top-left corner of cell (row, col): inside it, away from its text."""
  x, y = fig.axes[0].transData.transform((col - 0.35, row - 0.35))
  return pixels[pixels.shape[0] - int(round(y)), int(round(x))].astype(int)


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (10, 10), (21, 21), (1, 21), (21, 1)])
def test_image_is_uint8_rgb_and_wide_enough(shape):
  img = matrix_figure.image(np.full(shape, 50.0))
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert img.shape[1] >= 400 and img.shape[0] >= 200


def test_texts_are_the_evaluated_values_in_their_cells():
  fig = matrix_figure.figure(MATRIX)
  texts = {(t.get_position()[1], t.get_position()[0]): t.get_text() for t in fig.axes[0].texts}
  assert texts == {(0, 0): "97.5", (0, 1): "80.0", (0, 2): "70.0",
                   (1, 1): "86.0", (1, 2): "0.0", (2, 2): "100.0"}


def test_axis_labels_and_one_tick_per_task():
  ax = matrix_figure.figure(np.full((2, 4), 50.0)).axes[0]
  assert ax.get_xlabel() == "after training task" and ax.get_ylabel() == "task evaluated"
  assert "accuracy" in ax.get_title()
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]


def test_colour_bar_is_labelled():
  fig = matrix_figure.figure(MATRIX)
  assert len(fig.axes) == 2
  assert fig.axes[1].get_ylabel() == "accuracy (%)"


def test_colours_span_0_to_100_whatever_the_values():
  # Autoscaled colours would draw 50 as the darkest and 60 as the brightest.
  fig, pixels = _render(np.array([[50.0, 60.0]]))
  np.testing.assert_allclose(_cell_pixel(fig, pixels, 0, 0), VIRIDIS_HALF, atol=3)


def test_nan_cell_is_blank_and_unlike_a_zero_cell():
  fig, pixels = _render(np.array([[0.0, NAN]]))
  zero, nan = _cell_pixel(fig, pixels, 0, 0), _cell_pixel(fig, pixels, 0, 1)
  np.testing.assert_allclose(zero, VIRIDIS_0, atol=3)
  np.testing.assert_array_equal(nan, [255, 255, 255])
  assert [t.get_text() for t in fig.axes[0].texts] == ["0.0"]


def test_text_contrasts_with_its_cell():
  fig = matrix_figure.figure(np.array([[0.0, 100.0]]))
  luminance = {t.get_text(): np.dot(colors.to_rgb(t.get_color()), [0.299, 0.587, 0.114])
               for t in fig.axes[0].texts}
  assert luminance["0.0"] > 0.8 and luminance["100.0"] < 0.2  # Light on purple, dark on yellow.


def test_changing_one_cell_changes_the_image():
  other = MATRIX.copy()
  other[0, 1] = 20.0
  np.testing.assert_array_equal(matrix_figure.image(MATRIX), matrix_figure.image(MATRIX))
  assert not np.array_equal(matrix_figure.image(MATRIX), matrix_figure.image(other))
  (fig_a, pixels_a), (fig_b, pixels_b) = _render(MATRIX), _render(other)
  assert not np.array_equal(_cell_pixel(fig_a, pixels_a, 0, 1), _cell_pixel(fig_b, pixels_b, 0, 1))


class _ImageWriter:

  def __init__(self):
    self.images = {}

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    self.images.update(images)

  def flush(self):
    pass


def test_evaluation_writes_the_figure_image():
  writer = _ImageWriter()
  results = {0: {"accuracy": 97.5, "loss": 0.1}}
  reporting.write_evaluation(writer, 3, 0, np.array([[97.5]]), results, histogram=False)
  np.testing.assert_array_equal(writer.images["accuracy_matrix"],
                                matrix_figure.image(np.array([[97.5]])))
