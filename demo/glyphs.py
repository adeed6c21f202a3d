"""Letters and symbols rendered from matplotlib's fonts, in the style of scikit-learn's digits.

The embedded demo's backbone is pretrained on these images, in the role ImageNet-21k plays for
the real configs: data the machine can make without a download, disjoint from the digits stream
(no digit is rendered). scikit-learn's digits are 32x32 binary bitmaps counted in 4x4 blocks,
so every pixel is an integer 0..16; the glyphs are made the same way:

1. each (font, character) is drawn once at 48 px with FreeType (matplotlib's `ft2font`) and
   cropped to its ink;
2. every sample maps it into a 32x32 frame with a random affine transform (height, aspect,
   rotation, shear, position), blurs it, binarises it at a random threshold (thin to bold
   strokes) and flips a few random pixels;
3. 4x4 blocks are counted: an [8, 8] image of integers 0..16.
"""

import dataclasses
import os

import matplotlib
from matplotlib import ft2font
import numpy as np
from scipy import ndimage

# matplotlib's bundled faces whose letters and ASCII symbols sit at their usual code points.
FONTS = (
    'DejaVuSans.ttf', 'DejaVuSans-Bold.ttf', 'DejaVuSans-Oblique.ttf',
    'DejaVuSans-BoldOblique.ttf', 'DejaVuSansMono.ttf', 'DejaVuSansMono-Bold.ttf',
    'DejaVuSansMono-Oblique.ttf', 'DejaVuSansMono-BoldOblique.ttf', 'DejaVuSerif.ttf',
    'DejaVuSerif-Bold.ttf', 'DejaVuSerif-Italic.ttf', 'DejaVuSerif-BoldItalic.ttf',
    'STIXGeneral.ttf', 'STIXGeneralBol.ttf', 'STIXGeneralItalic.ttf', 'STIXGeneralBolIta.ttf',
    'cmr10.ttf', 'cmss10.ttf', 'cmtt10.ttf', 'cmb10.ttf', 'cmti10.ttf',
)
# One class per character: 52 letters and 20 symbols, no digit.
CHARACTERS = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
              '+-=<>?!@#$%&*/()[]{}')
FRAME = 32  # side of the binary bitmap, as the digits' 32x32
BLOCK = 4  # counted block side: FRAME // BLOCK = 8 pixels per side, values 0..BLOCK**2


@dataclasses.dataclass(frozen=True)
class Glyph:
  """One character of one font, cropped to its ink: float32 [h, w] in [0, 1]."""
  image: np.ndarray
  label: int


def font_dir() -> str:
  return os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data', 'fonts', 'ttf')


def draw_glyphs(fonts=FONTS, characters=CHARACTERS, size: int = 48) -> list[Glyph]:
  """Every character of every font, anti-aliased at `size` px and cropped to its ink."""
  glyphs = []
  for name in fonts:
    font = ft2font.FT2Font(os.path.join(font_dir(), name))
    for label, char in enumerate(characters):
      font.set_size(size, 72)
      font.set_text(char)
      font.draw_glyphs_to_bitmap(antialiased=True)
      image = np.asarray(font.get_image(), np.float32) / 255.0
      rows = np.flatnonzero(image.max(axis=1) > 0.5)
      cols = np.flatnonzero(image.max(axis=0) > 0.5)
      if rows.size == 0 or cols.size == 0:
        raise ValueError(f'{name} has no ink for {char!r}')
      crop = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
      glyphs.append(Glyph(np.pad(crop, 2), label))
  return glyphs


def _frame_matrix(rng: np.random.Generator, shape: tuple[int, int]):
  """Random affine map of frame coordinates to glyph coordinates: (matrix [2, 2], offset [2])."""
  h, w = shape
  # Height in the frame as a fraction of FRAME; wide glyphs are shrunk to fit.
  height = rng.uniform(0.7, 1.0) * FRAME
  scale = height / h * rng.uniform(0.85, 1.15, size=2)  # per-axis: aspect jitter
  scale = scale * min(1.0, FRAME / (w * scale[1]))
  angle = np.deg2rad(rng.uniform(-12.0, 12.0))
  shear = rng.uniform(-0.25, 0.25)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  forward = rotation @ np.array([[1.0, 0.0], [shear, 1.0]]) @ np.diag(scale)
  inverse = np.linalg.inv(forward)
  center_out = np.array([FRAME / 2, FRAME / 2]) + rng.uniform(-2.5, 2.5, size=2) - 0.5
  center_in = np.array([h / 2, w / 2]) - 0.5
  return inverse, center_in - inverse @ center_out


def render(glyph: Glyph, rng: np.random.Generator) -> np.ndarray:
  """One random sample of `glyph`: uint8 [8, 8], values 0..16 like scikit-learn's digits."""
  matrix, offset = _frame_matrix(rng, glyph.image.shape)
  frame = ndimage.affine_transform(glyph.image, matrix, offset, output_shape=(FRAME, FRAME),
                                   order=1, mode='constant', cval=0.0)
  sigma = rng.uniform(0.0, 1.5)
  if sigma > 0.3:
    frame = ndimage.gaussian_filter(frame, sigma)
  bitmap = frame > rng.uniform(0.15, 0.5) * max(frame.max(), 1e-6)
  noise = rng.random(bitmap.shape) < rng.uniform(0.0, 0.02)
  bitmap = bitmap ^ noise
  n = FRAME // BLOCK
  return bitmap.reshape(n, BLOCK, n, BLOCK).sum(axis=(1, 3)).astype(np.uint8)


def make_dataset(glyphs: list[Glyph], num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`num` samples, glyphs drawn uniformly: (uint8 [num, 8, 8] in 0..16, int32 [num])."""
  rng = np.random.default_rng(seed)
  picks = rng.integers(len(glyphs), size=num)
  images = np.stack([render(glyphs[i], rng) for i in picks])
  labels = np.array([glyphs[i].label for i in picks], np.int32)
  return images, labels
