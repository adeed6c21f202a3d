"""Embedded demo baseline: the whole ViT trained on all ten digits at once (upper bound).

  python main.py --my_config configs/digits_joint.py --workdir=./runs/digits_joint

Starts from the shipped glyph-pretrained ViT, as digits_l2p.py.
"""

from configs import baselines
from configs import digits_l2p


def get_config(arg=None):
  # arg first: "tiny" joins the tiny run's tasks into one.
  return baselines.set_joint(digits_l2p.get_config(arg),
                            learning_rate=baselines.DIGITS_FINETUNE_LEARNING_RATE)
