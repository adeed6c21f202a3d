"""Embedded demo baseline: the head alone trained on the frozen ViT, task after task.

  python main.py --my_config configs/digits_ft_frozen.py --workdir=./runs/digits_ft_frozen

Starts from the shipped glyph-pretrained ViT, as digits_l2p.py.
"""

from configs import baselines
from configs import digits_l2p


def get_config(arg=None):
  return baselines.set_ft_frozen(digits_l2p.get_config(arg))
