"""Embedded demo baseline: experience replay, fine-tuning the whole ViT with a rehearsal buffer
of 50 examples per class.

  python main.py --my_config configs/digits_er50.py --workdir=./runs/digits_er50

Starts from the shipped glyph-pretrained ViT, as digits_l2p.py.
"""

from configs import baselines
from configs import digits_l2p


def get_config(arg=None):
  return baselines.set_er(digits_l2p.get_config(arg), per_class=50,
                          learning_rate=baselines.DIGITS_FINETUNE_LEARNING_RATE)
