"""Resize, crop and flip on the accelerators, inside the jitted steps (no TensorFlow).

When every image of a benchmark has one stored shape (CIFAR, 5-datasets, CORe50, digits),
the host sends the small decoded images as stored (uint8 [h, w, c]) with each training
example's crop window and flip, and the steps build the network input here. That moves
the bulk of the input work (two bilinear resizes to 224 x 224 float images) off the host
and cuts the host-to-device traffic about 200-fold for CIFAR (3 KiB instead of 588 KiB per image).

The pixels are those of `libml.preprocess` (TensorFlow's bilinear resize with half-pixel
centres, no antialiasing): each resize is a linear map per axis, so "resize to R, crop a
window, resize to I, flip" is out = Wy @ image @ Wx^T with Wy [I, h] and Wx [I, w] built
from the window, a few small matmuls per image. They agree up to float rounding, within
3e-5 of the pixel range: compiled, a sampling position near 224 may round one float32
step differently (in a fused multiply-add, say), far below the 4e-3 step of a bfloat16
input.
"""

import dataclasses

import jax
import jax.numpy as jnp

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


def _apply(wy: jax.Array, images: jax.Array, wx: jax.Array) -> jax.Array:
  """[B, I, h] x [B, h, w, c] x [B, I, w] -> [B, I, I, c]: out = Wy @ image @ Wx^T."""
  rows = jnp.einsum("nya,nabc->nybc", wy, images, precision=_HIGHEST)
  return jnp.einsum("nybc,nxb->nyxc", rows, wx, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class DevicePreprocess:
  """How stored images become network inputs (hashable: a static argument of the steps).

  Attributes:
    input_size: side of the network input.
    resize_size: side images are resized to before cropping.
    augment: random resized crop and flip in training, central crop in evaluation;
      False resizes straight to input_size.
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

  def _fixed(self, images: jax.Array) -> jax.Array:
    """The window every image shares (resize only, or the central crop): -> [B, I, I, c]."""
    b, h, w = images.shape[:3]
    size, side = self.input_size, self.resize_size

    def weights(stored: int) -> jax.Array:  # [I, stored]
      if not self.augment:
        return resize_weights(size, stored)
      # The central window of the resize_size square (a selection), after the resize to it.
      return jnp.matmul(resize_weights(size, size, (side - size) // 2, side),
                        resize_weights(side, stored), precision=_HIGHEST)

    wy, wx = weights(h), weights(w)
    return _apply(jnp.broadcast_to(wy, (b,) + wy.shape), images,
                  jnp.broadcast_to(wx, (b,) + wx.shape))

  def eval_images(self, batch: dict) -> jax.Array:
    """Resize, central crop: batch['image'] [B, h, w, c] as stored -> float32 [B, I, I, 3]."""
    return self._finish(self._fixed(self._to_float(batch["image"])))

  def train_images(self, batch: dict) -> jax.Array:
    """Resize, crop batch['crop'], flip where batch['flip']: -> float32 [B, I, I, 3].

    Args:
      batch: {'image': [B, h, w, c] as stored, 'crop': int32 [B, 4] (top, left, height,
        width of the window in the resize_size square), 'flip': bool [B]} ('crop' and
        'flip' only when `augment`).
    """
    images = self._to_float(batch["image"])
    if not self.augment:
      return self._finish(self._fixed(images))
    h, w = images.shape[1:3]
    size, side = self.input_size, self.resize_size
    up_y, up_x = resize_weights(side, h), resize_weights(side, w)
    top, left, height, width = (batch["crop"][:, i] for i in range(4))
    flip = batch["flip"]
    # The flip mirrors the stored image and the window (resizing commutes with mirroring).
    left = jnp.where(flip, side - left - width, left)
    window = jax.vmap(lambda n, o: resize_weights(size, n, o, side))
    wy = jnp.einsum("nyr,ra->nya", window(height, top), up_y, precision=_HIGHEST)
    wx = jnp.einsum("nxr,rb->nxb", window(width, left), up_x, precision=_HIGHEST)
    wx = jnp.where(flip[:, None, None], wx[:, :, ::-1], wx)
    return self._finish(_apply(wy, images, wx))


def train_images(batch: dict, preprocess: DevicePreprocess | None) -> jax.Array:
  """The network input of a training batch: prepared here, or by the host (None)."""
  return batch["image"] if preprocess is None else preprocess.train_images(batch)


def eval_images(batch: dict, preprocess: DevicePreprocess | None) -> jax.Array:
  """The network input of an eval batch: prepared here, or by the host (None)."""
  return batch["image"] if preprocess is None else preprocess.eval_images(batch)
