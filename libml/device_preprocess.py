"""Resize, crop and flip on the accelerators, inside the jitted steps (no TensorFlow).

When every image of a benchmark has one stored shape (CIFAR, 5-datasets, CORe50, digits),
the host sends the small decoded images as stored (uint8 [h, w, c]) with each training
example's crop window and flip, and the steps build the network input here. That moves
the bulk of the input work (two bilinear resizes to 224 x 224 float images) off the host
and cuts the host-to-device traffic about 200-fold for CIFAR (3 KiB instead of 588 KiB per image).

The pixels are those of `libml.preprocess` (TensorFlow's bilinear resize with half-pixel
centres, no antialiasing), in two stages as the original builds them:

1. Resize the stored image to R x R on its stored scale and truncate to the integer grid
   (the original's cast to uint8), with TensorFlow's own arithmetic (`resize_taps`: two
   source pixels and a lerp per output pixel and axis, x first). For the stored sizes of
   the benchmarks here (32, 28, 128 -> 256) the lerps are dyadic, every step is exact, and
   the truncated image equals TensorFlow's bit for bit. (At other scales a compiled fused
   multiply-add may, rarely, move a value across an integer: one step of 1 / 255.)
   Evaluation keeps the central I x I of it.
2. Training: scale to [0, 1], then resize the crop window to I x I, a linear map per axis:
   out = Wy @ image @ Wx^T with Wy, Wx [I, R] built from the window (`resize_weights`),
   and a flip mirrors the output columns. This agrees with TensorFlow up to float
   rounding, within 3e-5 of the pixel range: compiled, a sampling position near 224 may
   round one float32 step differently (in a fused multiply-add, say), far below the 4e-3
   step of a bfloat16 input.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def resize_weights(out_size: int, length, offset=0, total: int | None = None) -> jax.Array:
  """Bilinear resize weights of one axis, as TensorFlow computes them.

  Row i holds the weights that output pixel i gives to the input pixels when the window
  [offset, offset + length) of an axis of `total` pixels is resized to `out_size` pixels
  (half-pixel centres; out-of-range neighbours clamp to the window's edge).

  Args:
    out_size: output pixels (static).
    length: window length, int or traced int32 scalar (>= 1).
    offset: window start, int or traced int32 scalar.
    total: pixels of the axis (static); defaults to `length`, which must then be static.

  Returns:
    float32 [out_size, total].
  """
  total = length if total is None else total
  scale = jnp.asarray(length, jnp.float32) / out_size
  position = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  floor = jnp.floor(position)
  lerp = (position - floor)[:, None]
  last = jnp.asarray(length, jnp.int32) - 1
  lower = jnp.clip(floor.astype(jnp.int32), 0, last) + offset
  upper = jnp.clip(jnp.ceil(position).astype(jnp.int32), 0, last) + offset
  pixels = jnp.arange(total, dtype=jnp.int32)
  return ((1.0 - lerp) * (pixels == lower[:, None]) + lerp * (pixels == upper[:, None]))


def resize_taps(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source pixels and lerps of a bilinear resize of one axis, as TensorFlow computes them.

  Output pixel i reads input pixels lower[i] and upper[i] and weighs the upper one by
  lerp[i] (half-pixel centres, float32, neighbours clamped to the axis).

  Returns:
    (lower, upper, lerp): int32 [out_size], int32 [out_size], float32 [out_size].
  """
  scale = np.float32(in_size) / np.float32(out_size)
  position = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(position)
  lower = np.clip(floor, 0, in_size - 1).astype(np.int32)
  upper = np.clip(np.ceil(position), 0, in_size - 1).astype(np.int32)
  return lower, upper, (position - floor).astype(np.float32)


def resize_truncated(images: jax.Array, side: int, keep: slice = slice(None)) -> jax.Array:
  """The original's first resize: stored [B, h, w, c] -> float32 [B, side, side, c].

  Bilinear resize to side x side on the stored scale, in TensorFlow's order of operations
  (top = tl + (tr - tl) * x_lerp, likewise bottom, then top + (bottom - top) * y_lerp),
  truncated to the integer grid (the original's cast to uint8). `keep` selects the output
  rows and columns computed (the central crop in evaluation).
  """
  images = images.astype(jnp.float32)
  (y0, y1, ly), (x0, x1, lx) = (
      tuple(t[keep] for t in resize_taps(side, n)) for n in images.shape[1:3])
  lx = lx[:, None]

  def along_x(rows):  # [B, Y, w, c] -> [B, Y, X, c]
    left, right = jnp.take(rows, x0, axis=2), jnp.take(rows, x1, axis=2)
    return left + (right - left) * lx

  top = along_x(jnp.take(images, y0, axis=1))
  bottom = along_x(jnp.take(images, y1, axis=1))
  return jnp.floor(top + (bottom - top) * ly[:, None, None])


def _apply(wy: jax.Array, images: jax.Array, wx: jax.Array) -> jax.Array:
  """[B, I, h] x [B, h, w, c] x [B, I, w] -> [B, I, I, c]: out = Wy @ image @ Wx^T."""
  rows = jnp.einsum("nya,nabc->nybc", wy, images, precision=_HIGHEST)
  return jnp.einsum("nybc,nxb->nyxc", rows, wx, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class DevicePreprocess:
  """How stored images become network inputs (hashable: a static argument of the steps).

  Attributes:
    input_size: side of the network input.
    resize_size: side images are resized to (and truncated) before cropping.
    augment: random resized crop and flip in training, central crop in evaluation (or the
      training crop and flip where an eval batch carries them); False resizes straight to
      input_size.
    max_value: stored pixel value of white (255 for uint8, 16 for digits).
    norm_01: pixels in [0, 1]; False maps them to [-1, 1].
  """
  input_size: int
  resize_size: int
  augment: bool
  max_value: float
  norm_01: bool

  def _finish(self, images: jax.Array) -> jax.Array:
    if images.shape[-1] == 1:  # Grey: the same value in R, G and B.
      images = jnp.broadcast_to(images, images.shape[:-1] + (3,))
    return images if self.norm_01 else images * 2.0 - 1.0

  def _to_float(self, images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / self.max_value

  def _resized_only(self, images: jax.Array) -> jax.Array:
    """No augmentation: scale, resize straight to input_size: -> [B, I, I, c]."""
    b, h, w = images.shape[:3]
    wy, wx = resize_weights(self.input_size, h), resize_weights(self.input_size, w)
    return _apply(jnp.broadcast_to(wy, (b,) + wy.shape), self._to_float(images),
                  jnp.broadcast_to(wx, (b,) + wx.shape))

  def eval_images(self, batch: dict) -> jax.Array:
    """Resize, truncate, central crop: batch['image'] [B, h, w, c] as stored -> [B, I, I, 3].

    An eval batch that carries 'crop' and 'flip' (test images with the training
    augmentation, as the original evaluates CORe50) goes through `train_images` instead.
    """
    if "crop" in batch:
      return self.train_images(batch)
    if not self.augment:
      return self._finish(self._resized_only(batch["image"]))
    offset = (self.resize_size - self.input_size) // 2
    central = resize_truncated(batch["image"], self.resize_size,
                               slice(offset, offset + self.input_size))
    return self._finish(central / self.max_value)

  def train_images(self, batch: dict) -> jax.Array:
    """Resize, truncate, crop batch['crop'], flip where batch['flip']: -> [B, I, I, 3].

    Args:
      batch: {'image': [B, h, w, c] as stored, 'crop': int32 [B, 4] (top, left, height,
        width of the window in the resize_size square), 'flip': bool [B]} ('crop' and
        'flip' only when `augment`).
    """
    if not self.augment:
      return self._finish(self._resized_only(batch["image"]))
    size, side = self.input_size, self.resize_size
    resized = resize_truncated(batch["image"], side) / self.max_value  # [B, R, R, c]
    top, left, height, width = (batch["crop"][:, i] for i in range(4))
    window = jax.vmap(lambda n, o: resize_weights(size, n, o, side))
    wy, wx = window(height, top), window(width, left)  # [B, I, R]
    # The flip mirrors the output's columns.
    wx = jnp.where(batch["flip"][:, None, None], wx[:, ::-1], wx)
    return self._finish(_apply(wy, resized, wx))


def train_images(batch: dict, preprocess: DevicePreprocess | None) -> jax.Array:
  """The network input of a training batch: prepared here, or by the host (None)."""
  return batch["image"] if preprocess is None else preprocess.train_images(batch)


def eval_images(batch: dict, preprocess: DevicePreprocess | None) -> jax.Array:
  """The network input of an eval batch: prepared here, or by the host (None)."""
  return batch["image"] if preprocess is None else preprocess.eval_images(batch)
