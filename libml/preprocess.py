"""Per-image preprocessing (TensorFlow, inside tf.data).

Images enter as float32 [h, w, 3] in [0, 1] (see `to_float_rgb`). Train: resize
to `resize_size`, random resized crop (5%-100% of the area) to `input_size`,
random horizontal flip. Eval: resize, central crop. All randomness is
stateless: the same seed gives the same crop and flip. With
`preprocess_on_device` only `random_window` runs here, and
`libml.device_preprocess` builds the same pixels on the accelerators.
"""

import tensorflow as tf

AREA_RANGE = (0.05, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def to_float_rgb(image: tf.Tensor, max_value: float = 255.0) -> tf.Tensor:
  """[h, w, 1 or 3] integer or float image -> float32 [h, w, 3] in [0, 1]."""
  image = tf.cast(image, tf.float32) / max_value
  if image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return image


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  return tf.image.resize(image, size, method='bilinear')


def sample_crop(seed: tf.Tensor, side: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Random window of a side x side image (AREA_RANGE, ASPECT_RATIO_RANGE).

  Returns:
    (begin, size): int32 [2] top-left corner and [2] height, width.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      [side, side, 1],
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.0,
      aspect_ratio_range=ASPECT_RATIO_RANGE,
      area_range=AREA_RANGE,
      max_attempts=10,
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


def train_image(image: tf.Tensor, seed: tf.Tensor, *, resize_size: int,
                input_size: int, resize_only: bool = False) -> tf.Tensor:
  """Training augmentation: resize, random resized crop, random flip.

  Same pixels as resize, crop, resize, flip; but the flip mirrors the small
  source image and the crop window instead of the output (resizing commutes
  with mirroring), which is cheaper.

  Args:
    image: float32 [h, w, 3] in [0, 1].
    seed: int [2] stateless seed of this example.
    resize_size: side the image is first resized to.
    input_size: side of the output.
    resize_only: skip crop and flip; resize straight to input_size.

  Returns:
    float32 [input_size, input_size, 3] in [0, 1].
  """
  if resize_only:
    return _resize(image, [input_size, input_size])
  window, flip = random_window(seed, resize_size)
  begin, size = window[:2], window[2:]
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  left = tf.where(flip, resize_size - begin[1] - size[1], begin[1])
  resized = _resize(image, [resize_size, resize_size])
  crop = tf.slice(resized, tf.stack([begin[0], left, 0]),
                  tf.concat([size, [3]], 0))
  crop.set_shape([None, None, 3])
  return _resize(crop, [input_size, input_size])


def eval_image(image: tf.Tensor, *, resize_size: int, input_size: int,
               resize_only: bool = False) -> tf.Tensor:
  """Resize, then the central input_size crop; float32 [in, in, 3] in [0, 1]."""
  if resize_only:
    return _resize(image, [input_size, input_size])
  return central_crop(_resize(image, [resize_size, resize_size]), input_size)


def normalize(image: tf.Tensor, norm_01: bool) -> tf.Tensor:
  """[0, 1] pixels kept as they are (norm_01) or mapped to [-1, 1]."""
  return image if norm_01 else image * 2.0 - 1.0
