"""Optional extra training augmentations, all set in `config.augment`.

Per training image (`image_fn`, in the tf.data map after the random resized crop
and flip), in this order: RandAugment, cutout, colour jitter, mean/std
normalisation, random erasing. When any of these is on, eval images get the same
normalisation (`normalize_fn`). Per batch (`mix_fn`): mixup or cutmix with a
partner example; labels stay integers, with the partner's label and the weight
of the example's own label alongside. Every random choice comes from TensorFlow's
stateless ops and the seed passed in: a seed gives the same images on every run,
resumed or not, in whatever order the map's calls run. Pixels are float32 in
[0, 1] until the normalisation; posterize, equalize and the solarize thresholds
work on the 256-level grid.
"""

import functools
import math
from typing import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from libml.errors import UserError

# Random erasing fills: per-pixel N(0, 1) noise, one N(0, 1) colour, zeros.
ERASE_MODES = ('pixel', 'rand', 'const')
# Fill of the pixels geometric operations move in, and of cutout.
_GREY = 128.0 / 255.0
# Largest translation (pixels) at level 1 for a side; else 0.3 x the side.
_TRANSLATE = {224: 100, 128: 40, 96: 30, 32: 10}


class AugmentConfigError(UserError, ValueError):
  """A bad `config.augment` field: one line naming it and the fix."""


def _split(seed, num):
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed, shape=(), low=0.0, high=1.0):
  return tf.random.stateless_uniform(shape, seed, low, high)


def _box(height, width, top, left, box_h, box_w):
  """bool [..., height, width, 1]: True inside the boxes (float [...] args)."""
  rows = tf.range(height, dtype=tf.float32)
  cols = tf.range(width, dtype=tf.float32)
  inside_r = (rows >= top[..., None]) & (rows < (top + box_h)[..., None])
  inside_c = (cols >= left[..., None]) & (cols < (left + box_w)[..., None])
  return inside_r[..., :, None, None] & inside_c[..., None, :, None]


# --- RandAugment operations: float32 [H, W, 3] in [0, 1] -> the same. --------

def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 1.)


def _grey(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _levels(image):
  """int32 [H, W, 3] in 0..255: the pixels on the 256-level grid."""
  return tf.cast(tf.clip_by_value(image, 0., 1.) * 255., tf.int32)


def _transform(image, matrix):
  """Projective `matrix` (8 values, output -> input point), nearest, grey."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.stack(matrix), tf.float32)[None],
      output_shape=tf.shape(image)[:2], fill_value=_GREY,
      interpolation='NEAREST', fill_mode='CONSTANT')[0]


def _rotate(image, degrees):
  """Counterclockwise rotation about the image centre."""
  h, w = image.shape[0] - 1, image.shape[1] - 1
  c, s = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
  return _transform(image, [c, -s, (w - (c * w - s * h)) / 2, s, c,
                            (h - (s * w + c * h)) / 2, 0., 0.])


def _equalize(image):
  """Histogram equalisation of each channel, as PIL's ImageOps.equalize."""
  def channel(x):
    q = _levels(x)
    hist = tf.math.bincount(q, minlength=256, maxlength=256)
    step = (tf.reduce_sum(hist) - tf.gather(hist, tf.reduce_max(q))) // 255
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, q), tf.float32) / 255, x)
  return tf.stack([channel(image[..., c]) for c in range(3)], -1)


def _sharpness(image, factor):
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  # The smoothed interior inside the untouched one-pixel border.
  degenerate = image + tf.pad(smooth - image[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, factor)


def _autocontrast(image):
  """Stretches each channel to [0, 1] (unless it is flat)."""
  low, high = tf.reduce_min(image, [0, 1]), tf.reduce_max(image, [0, 1])
  scaled = tf.clip_by_value((image - low) / tf.maximum(high - low, 1e-12), 0., 1.)
  return tf.where(high > low, scaled, image)


def _posterize(image, level):
  """Keeps the top max(1, int(4 level)) bits of the 8."""
  shift = 8 - tf.maximum(tf.cast(level * 4, tf.int32), 1)
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(_levels(image), shift), shift)
  return tf.cast(kept, tf.float32) / 255.


def _translate(image, amount, axis):
  """Shifts along `axis` (1: x, 0: y) by `amount` x the side's largest shift."""
  pixels = amount * _TRANSLATE.get(image.shape[axis], int(0.3 * image.shape[axis]))
  return _transform(image, [1., 0., pixels if axis else 0., 0., 1., 0. if axis else pixels, 0., 0.])


# Operation name -> f(image, level in [0, 1], sign +-1 mirroring geometric ones).
# Color, Contrast, Brightness and Sharpness blend by a factor 0.1 + 1.8 level.
_OPS = {
    'AutoContrast': lambda x, m, s: _autocontrast(x),
    'Equalize': lambda x, m, s: _equalize(x),
    'Rotate': lambda x, m, s: _rotate(x, s * m * 30.),
    'Posterize': lambda x, m, s: _posterize(x, m),
    # Inverts the pixels at or above min(int(256 level), 255) / 255.
    'Solarize': lambda x, m, s: tf.where(
        x * 255. < tf.minimum(tf.floor(m * 256), 255.), x, 1. - x),
    'Color': lambda x, m, s: _blend(_grey(x), x, 0.1 + 1.8 * m),
    'Contrast': lambda x, m, s: _blend(tf.fill(
        tf.shape(x), tf.reduce_mean(tf.image.rgb_to_grayscale(x))), x, 0.1 + 1.8 * m),
    'Brightness': lambda x, m, s: _blend(tf.zeros_like(x), x, 0.1 + 1.8 * m),
    'Sharpness': lambda x, m, s: _sharpness(x, 0.1 + 1.8 * m),
    'ShearX': lambda x, m, s: _transform(x, [1., s * m * .3, 0., 0., 1., 0., 0., 0.]),
    'ShearY': lambda x, m, s: _transform(x, [1., 0., 0., s * m * .3, 1., 0., 0., 0.]),
    'TranslateX': lambda x, m, s: _translate(x, s * m, axis=1),
    'TranslateY': lambda x, m, s: _translate(x, s * m, axis=0),
    'Identity': lambda x, m, s: x,
    # Adds int(110 level) / 255 to the pixels below 128 / 255.
    'SolarizeAdd': lambda x, m, s: tf.where(
        x * 255. < 128., tf.minimum(x + tf.floor(m * 110) / 255., 1.), x),
    'Invert': lambda x, m, s: 1. - x,
}
# The RandAugment operations `config.augment.ops` may name.
OPS = tuple(_OPS)


def _randaugment(cfg, image, seed):
  """`num_layers` operations in turn, each drawn uniformly from `ops`."""
  ops = tuple(cfg.ops)

  @tf.function(autograph=False)  # Traced once, for all the layers.
  def layer(image, index, level, sign):
    return tf.switch_case(index, [functools.partial(
        lambda n: tf.ensure_shape(_OPS[n](image, level, sign), image.shape), name)
        for name in ops])

  for layer_seed in _split(seed, cfg.num_layers):
    s_op, s_apply, s_level, s_sign = _split(layer_seed, 4)
    if cfg.magnitude is None:  # A level in {0, 1/num_levels, ..., 1}.
      level = tf.cast(tf.random.stateless_uniform(
          [], s_level, 0, cfg.num_levels + 1, tf.int32), tf.float32) / cfg.num_levels
    else:
      level = tf.constant(cfg.magnitude, tf.float32)
    sign = tf.where(_uniform(s_sign) < 0.5, -1., 1.)
    index = tf.random.stateless_uniform([], s_op, 0, len(ops), tf.int32)
    augmented = layer(image, index, level, sign)
    image = tf.where(_uniform(s_apply) < cfg.prob_to_apply, augmented, image)
  return image


def _cutout(image, seed):
  """A grey box of half the sides at a random centre, clipped to the image."""
  h, w = image.shape[0], image.shape[1]
  s_h, s_w = _split(seed, 2)
  half_h, half_w = (h * 0.5) // 2, (w * 0.5) // 2
  top = tf.round(_uniform(s_h, (), 0, h)) - half_h
  left = tf.round(_uniform(s_w, (), 0, w)) - half_w
  return tf.where(_box(h, w, top, left, 2 * half_h, 2 * half_w), _GREY, image)


def _color_jitter(cfg, image, seed):
  """Brightness, contrast, saturation and hue jitter in a random order (with
  probability `color_jitter_prob`), then grey with `grayscale_prob`."""
  brightness = contrast = saturation = 0.8 * cfg.color_jitter_strength
  hue = 0.2 * cfg.color_jitter_strength
  s_apply, s_grey, s_order, s_b, s_c, s_s, s_h = _split(seed, 7)
  steps = [
      lambda x: x * _uniform(s_b, (), max(1 - brightness, 0), 1 + brightness),
      lambda x: tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, s_c),
      lambda x: tf.image.stateless_random_saturation(
          x, 1 - saturation, 1 + saturation, s_s),
      lambda x: tf.image.stateless_random_hue(x, hue, s_h)]

  def jitter():
    x = image
    for step in tf.unstack(tf.argsort(_uniform(s_order, (4,)))):
      x = tf.clip_by_value(
          tf.switch_case(step, [functools.partial(f, x) for f in steps]), 0., 1.)
    return x
  image = tf.cond(_uniform(s_apply) < cfg.color_jitter_prob, jitter, lambda: image)
  image = tf.where(_uniform(s_grey) < cfg.grayscale_prob, _grey(image), image)
  return tf.clip_by_value(image, 0., 1.)


def _erase(cfg, image, seed):
  """With `erase_prob`, fills a box of random area and aspect (height/width)
  lying wholly inside the image."""
  h, w = image.shape[0], image.shape[1]
  s_apply, s_area, s_aspect, s_top, s_left, s_fill = _split(seed, 6)
  area = _uniform(s_area, (), *cfg.erase_area) * (h * w)
  low, high = cfg.erase_aspect
  aspect = tf.exp(_uniform(s_aspect, (), math.log(low), math.log(high)))
  box_h = tf.clip_by_value(tf.round(tf.sqrt(area * aspect)), 1., h)
  box_w = tf.clip_by_value(tf.round(tf.sqrt(area / aspect)), 1., w)
  top = tf.floor(_uniform(s_top) * (h - box_h + 1))
  left = tf.floor(_uniform(s_left) * (w - box_w + 1))
  if cfg.erase_mode == 'const':
    fill = 0.
  else:
    fill = tf.random.stateless_normal(
        image.shape if cfg.erase_mode == 'pixel' else [1, 1, 3], s_fill)
  erased = tf.where(_box(h, w, top, left, box_h, box_w), fill, image)
  return tf.where(_uniform(s_apply) < cfg.erase_prob, erased, image)


# --- Public API. -------------------------------------------------------------

def enabled(cfg: ml_collections.ConfigDict) -> bool:
  """Whether any per-image augmentation is on (then images are normalised)."""
  return bool(cfg.num_layers > 0 or cfg.cutout or cfg.color_jitter_strength > 0
              or cfg.erase_prob > 0)


def normalize_fn(cfg: ml_collections.ConfigDict) -> Callable:
  """Eval images: [..., 3] in [0, 1] -> (x - mean) / std; identity when off."""
  if not enabled(cfg):
    return lambda image: image
  mean = np.asarray(cfg.mean, np.float32)
  std = np.asarray(cfg.std, np.float32)
  return lambda image: (image - mean) / std


def image_fn(cfg: ml_collections.ConfigDict
             ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Per-image training augmentation: (image, seed) -> image.

  image: float32 [H, W, 3] in [0, 1], H and W static; seed: int64 [2].
  Returns float32 [H, W, 3], normalised when `enabled`; identity otherwise.
  """
  cfg = ml_collections.FrozenConfigDict(cfg)
  if not enabled(cfg):
    return lambda image, seed: image
  normalize = normalize_fn(cfg)

  @tf.autograph.experimental.do_not_convert
  def augment(image, seed):
    s_rand, s_cut, s_jitter, s_erase = _split(seed, 4)
    if cfg.num_layers > 0:
      image = _randaugment(cfg, image, s_rand)
    if cfg.cutout:
      image = _cutout(image, s_cut)
    if cfg.color_jitter_strength > 0:
      image = _color_jitter(cfg, image, s_jitter)
    image = normalize(image)
    if cfg.erase_prob > 0:
      image = _erase(cfg, image, s_erase)
    return image
  return augment


def mix_fn(cfg: ml_collections.ConfigDict) -> Callable | None:
  """Batch mixup / cutmix: (batch, seed) -> batch; None when both are off.

  batch: {'image': float32 [B, H, W, 3] (H, W static), 'label': int [B], ...};
  seed: int64 [2]. Adds 'mix_label' (the partner's label, [B]) and
  'mix_weight' (float32 [B], weight of the example's own label). With
  probability `mix_prob` the batch is mixed (else weights 1, partner = self),
  by cutmix with probability `switch_prob` when both are on. Mixup: image =
  w x + (1 - w) x[partner], partner a random permutation, w = 1 - u^(1/alpha)/2
  for u ~ U(0, 1). Cutmix: a box of the reversed batch's image (area fraction
  about u^(1/alpha)/2, the image's aspect) pasted; w = 1 - its pixel fraction.
  """
  mixup_alpha, cutmix_alpha = cfg.mixup_alpha, cfg.cutmix_alpha
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    return None
  mix_prob, switch_prob = cfg.mix_prob, cfg.switch_prob

  @tf.autograph.experimental.do_not_convert
  def mix(batch, seed):
    images, labels = batch['image'], batch['label']
    n, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    s_apply, s_switch, s_weight, s_partner, s_top, s_left = _split(seed, 6)
    u = _uniform(s_weight, [n])

    def mixup():
      weight = 1. - u**(1. / mixup_alpha) / 2.
      partner = tf.argsort(_uniform(s_partner, [n]))
      wx = weight[:, None, None, None]
      return wx * images + (1. - wx) * tf.gather(images, partner), partner, weight

    def cutmix():
      ratio = tf.sqrt(u**(1. / cutmix_alpha) / 2.)
      box_h, box_w = tf.floor(ratio * h), tf.floor(ratio * w)
      top = tf.floor(_uniform(s_top, [n]) * (h - box_h + 1))
      left = tf.floor(_uniform(s_left, [n]) * (w - box_w + 1))
      partner = tf.reverse(tf.range(n), [0])
      box = _box(h, w, top, left, box_h, box_w)
      return (tf.where(box, tf.gather(images, partner), images), partner,
              1. - box_h * box_w / (h * w))

    if mixup_alpha > 0 and cutmix_alpha > 0:
      mixed = lambda: tf.cond(_uniform(s_switch) < switch_prob, cutmix, mixup)
    else:
      mixed = cutmix if cutmix_alpha > 0 else mixup
    image, partner, weight = tf.cond(
        _uniform(s_apply) < mix_prob, mixed,
        lambda: (images, tf.range(n), tf.ones([n])))
    return {**batch, 'image': image, 'mix_label': tf.gather(labels, partner),
            'mix_weight': weight}
  return mix


def check(cfg: ml_collections.ConfigDict) -> None:
  """Raises AugmentConfigError (a ValueError) naming the first bad field."""
  off, probability = ' (0 turns it off).', 'use a probability in [0, 1].'
  area, aspect = cfg.erase_area, cfg.erase_aspect
  rules = [
      ('num_layers', cfg.num_layers >= 0, 'use an integer >= 0' + off),
      ('magnitude', cfg.magnitude is None or 0 <= cfg.magnitude <= 1,
       'use a level in [0, 1], or None for a random level per operation.'),
      ('num_levels', cfg.num_levels >= 1, 'use an integer >= 1.'),
      ('ops', bool(cfg.ops) and set(cfg.ops) <= set(OPS),
       f'name one or more of {", ".join(OPS)}.'),
      *[(field, 0 <= cfg[field] <= 1, probability) for field in (
          'prob_to_apply', 'color_jitter_prob', 'grayscale_prob', 'erase_prob',
          'mix_prob', 'switch_prob')],
      ('color_jitter_strength', 0 <= cfg.color_jitter_strength <= 1.25,
       'use a value in [0, 1.25]' + off),
      ('mean', len(cfg.mean) == 3, 'give 3 values, one per RGB channel.'),
      ('std', len(cfg.std) == 3 and min(cfg.std) > 0, 'give 3 values > 0, one per RGB channel.'),
      ('erase_area', len(area) == 2 and 0 < area[0] <= area[1] <= 1,
       'use (min, max) fractions of the image, 0 < min <= max <= 1.'),
      ('erase_aspect', len(aspect) == 2 and 0 < aspect[0] <= aspect[1],
       'use (min, max) height / width ratios, 0 < min <= max.'),
      ('erase_mode', cfg.erase_mode in ERASE_MODES, f'use one of {", ".join(ERASE_MODES)}.'),
      ('mixup_alpha', cfg.mixup_alpha >= 0, 'use a value >= 0' + off),
      ('cutmix_alpha', cfg.cutmix_alpha >= 0, 'use a value >= 0' + off)]
  for field, valid, fix in rules:
    if not valid:
      raise AugmentConfigError(f'config.augment.{field} = {cfg[field]!r}: {fix}')
