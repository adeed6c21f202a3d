"""The accuracy matrix drawn for people: a labelled heat map for TensorBoard."""

import matplotlib
import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
_MIN_WIDTH = 4.5  # Inches: at DPI, every image is at least 450 pixels wide.
_MIN_HEIGHT = 3.0  # Inches: room for the colour bar and its label.
_MARGIN = (2.2, 1.3)  # Inches around the cells: (ticks, labels, colour bar; title, labels).


def figure(matrix: np.ndarray) -> Figure:
  """Heat map of the matrix (0..100 %), each evaluated cell's value printed.

  Args:
    matrix: [E, T] accuracies in percent (rows: eval set; columns: after training task),
      NaN where not evaluated (drawn blank).

  Returns:
    A Figure on an Agg canvas, sized from E and T (not registered with pyplot).
  """
  a = np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64))
  rows, cols = a.shape
  cell = float(np.clip(6.0 / max(rows, cols), 0.4, 0.8))  # Inches per cell side.
  fontsize = float(np.clip(cell * 18, 7, 10))
  size = (max(cols * cell + _MARGIN[0], _MIN_WIDTH), max(rows * cell + _MARGIN[1], _MIN_HEIGHT))
  fig = Figure(figsize=size, dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
  norm = colors.Normalize(vmin=0.0, vmax=100.0)
  im = ax.imshow(a, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
  for (i, t), value in np.ndenumerate(a.filled(np.nan)):
    if not np.isnan(value):
      r, g, b, _ = cmap(norm(value))
      dark_cell = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
      ax.text(t, i, f"{value:.1f}", ha="center", va="center", fontsize=fontsize,
              color="white" if dark_cell else "black")
  ax.set_xticks(range(cols), [str(t) for t in range(cols)], fontsize=fontsize)
  ax.set_yticks(range(rows), [str(i) for i in range(rows)], fontsize=fontsize)
  ax.set_xlabel("after training task")
  ax.set_ylabel("task evaluated")
  ax.set_title("accuracy (%)")
  fig.colorbar(im, ax=ax).set_label("accuracy (%)")
  return fig


def image(matrix: np.ndarray) -> np.ndarray:
  """`figure(matrix)` rendered by Agg.

  Args:
    matrix: [E, T] accuracies in percent, NaN where not evaluated.

  Returns:
    [H, W, 3] uint8 RGB image, W >= 450.
  """
  fig = figure(matrix)
  fig.canvas.draw()
  rgb = np.array(fig.canvas.buffer_rgba())[..., :3]  # A copy: the figure can go.
  fig.clear()
  return rgb
