"""Resizing a ViT position embedding to another square patch grid.

A checkpoint trained at one resolution (ViT-B/16 at 224x224: a 14x14 grid) can
serve another (32x32 images with patch 8: a 4x4 grid) by interpolating the
patch part of its position embedding on the 2-D grid. The class-token entry has
no grid position and is copied unchanged.

Interpolation is bilinear with the grid corners aligned
(`scipy.ndimage.zoom(order=1)`): the first and last rows and columns of the old
grid land exactly on the first and last of the new one, the convention of the
original ViT release's loader.
"""

import math

import numpy as np
import scipy.ndimage

from libml.errors import UserError


def grid_side(num_patches: int, what: str) -> int:
  """Returns g with g * g == num_patches; raises UserError if there is none."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise UserError(
        f"{what} has {num_patches} patch positions, not a square grid; only "
        "square patch grids can be resized: use square images")
  return side


def resize_pos_embedding(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes a position embedding with a leading class-token entry.

  Args:
    posemb: [1, 1 + g*g, D] position embedding: class token, then the patch
      grid in row-major order.
    num_tokens: 1 + n*n, the number of positions wanted.

  Returns:
    [1, num_tokens, D] float32: posemb[:, :1] unchanged, then the g x g grid
    resized bilinearly (corners aligned) to n x n. Returned as a copy even
    when g == n.
  """
  posemb = np.asarray(posemb, np.float32)
  cls_part, grid_part = posemb[:, :1], posemb[0, 1:]
  old = grid_side(grid_part.shape[0], "the checkpoint's position embedding")
  new = grid_side(num_tokens - 1, "the model's position embedding")
  if old == new:
    return posemb.copy()
  grid = grid_part.reshape(old, old, -1).astype(np.float64)
  resized = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  # zoom derives the output size by rounding; make sure it rounded to `new`.
  assert resized.shape[:2] == (new, new), resized.shape
  resized = resized.reshape(1, new * new, -1).astype(np.float32)
  return np.concatenate([cls_part, resized], axis=1)
