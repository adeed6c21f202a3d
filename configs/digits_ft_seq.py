"""Embedded demo baseline: sequential fine-tuning of the whole ViT on the digits (lower bound).

  python main.py --my_config configs/digits_ft_seq.py --workdir=./runs/digits_ft_seq

Starts from the shipped glyph-pretrained ViT, as digits_l2p.py.
"""

from configs import baselines
from configs import digits_l2p


def get_config(arg=None):
  return baselines.set_ft_seq(digits_l2p.get_config(arg),
                             learning_rate=baselines.DIGITS_FINETUNE_LEARNING_RATE)
