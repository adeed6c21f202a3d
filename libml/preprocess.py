"""Per-image preprocessing (TensorFlow, inside tf.data), as the original's.

Images enter as stored: [h, w, 1 or 3] pixels on their stored scale (0..255;
digits 0..16). Train: resize to `resize_size` (bilinear), truncate to the
integer grid (the original casts to uint8 there), random resized crop (5%-100%
of the area, aspect ratios 0.75-1.33), scale to [0, 1], resize to
`input_size`, random horizontal flip. Eval: resize, truncate, central crop,
scale. The original also re-encodes the resized training image as JPEG
(quality 95) before cropping; that step is left out (see README). All
randomness is stateless: the same seed gives the same crop and flip. With
`preprocess_on_device` only `random_window` runs here, and
`libml.device_preprocess` builds the same pixels on the accelerators.
"""

import tensorflow as tf

AREA_RANGE = (0.05, 1.0)
# TensorFlow's defaults, which the original keeps.
ASPECT_RATIO_RANGE = (0.75, 1.33)
MAX_ATTEMPTS = 100


def to_float_rgb(image: tf.Tensor, max_value: float = 255.0) -> tf.Tensor:
  """[h, w, 1 or 3] integer or float image -> float32 [h, w, 3] in [0, 1]."""
  image = tf.cast(image, tf.float32) / max_value
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return image


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  return tf.image.resize(image, size, method='bilinear')


def resize_truncated(pixels: tf.Tensor, side: int) -> tf.Tensor:
  """The original's first resize: stored pixels -> float32 [side, side, 3].

  Bilinear resize on the stored scale, then truncation to the integer grid
  (the original's cast to uint8; the values lie in [0, max]), still unscaled.
  """
  image = tf.cast(pixels, tf.float32)
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return tf.floor(_resize(image, [side, side]))


def sample_crop(seed: tf.Tensor, side: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Random window of a side x side image, drawn as the original draws it.

  The original's call (no boxes: the whole image, min_object_covered=0) with
  AREA_RANGE and TensorFlow's default ASPECT_RATIO_RANGE and MAX_ATTEMPTS: the
  same seed gives the same window.

  Returns:
    (begin, size): int32 [2] top-left corner and [2] height, width.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      [side, side, 3],
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=ASPECT_RATIO_RANGE,
      area_range=AREA_RANGE,
      max_attempts=MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def random_window(seed: tf.Tensor, side: int) -> tuple[tf.Tensor, tf.Tensor]:
  """The training crop window and flip of one example.

  Returns:
    (window, flip): int32 [4] top, left, height, width of the crop in the
    side x side resized image; bool [] whether to mirror left to right.
  """
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  begin, size = sample_crop(crop_seed, side)
  flip = tf.random.stateless_uniform([], flip_seed) < 0.5
  return tf.concat([begin, size], 0), flip


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The centred size x size window of a square [side, side, 3] image."""
  offset = (image.shape[0] - size) // 2
  return image[offset:offset + size, offset:offset + size]


def train_image(pixels: tf.Tensor, seed: tf.Tensor, *, resize_size: int,
                input_size: int, max_value: float = 255.0,
                resize_only: bool = False) -> tf.Tensor:
  """Training augmentation: resize, truncate, random resized crop, flip.

  Args:
    pixels: [h, w, 1 or 3] as stored (integer or float, 0..max_value).
    seed: int [2] stateless seed of this example.
    resize_size: side the image is first resized to.
    input_size: side of the output.
    max_value: stored value of white.
    resize_only: skip crop and flip; scale and resize straight to input_size
      (no truncation).

  Returns:
    float32 [input_size, input_size, 3] in [0, 1].
  """
  if resize_only:
    return _resize(to_float_rgb(pixels, max_value), [input_size, input_size])
  window, flip = random_window(seed, resize_size)
  resized = resize_truncated(pixels, resize_size)
  crop = tf.slice(resized, tf.concat([window[:2], [0]], 0),
                  tf.concat([window[2:], [3]], 0))
  crop.set_shape([None, None, 3])
  image = _resize(crop / max_value, [input_size, input_size])
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def eval_image(pixels: tf.Tensor, *, resize_size: int, input_size: int,
               max_value: float = 255.0, resize_only: bool = False
               ) -> tf.Tensor:
  """Resize, truncate, central input_size crop: float32 [in, in, 3] in [0, 1].

  `pixels`, `max_value`, `resize_only`: as `train_image` takes them.
  """
  if resize_only:
    return _resize(to_float_rgb(pixels, max_value), [input_size, input_size])
  resized = resize_truncated(pixels, resize_size)
  return central_crop(resized, input_size) / max_value


def normalize(image: tf.Tensor, norm_01: bool) -> tf.Tensor:
  """[0, 1] pixels kept as they are (norm_01) or mapped to [-1, 1]."""
  return image if norm_01 else image * 2.0 - 1.0
