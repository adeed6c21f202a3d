"""Embedded demo: L2P with a rehearsal buffer of 10 examples per class.

  python main.py --my_config configs/digits_l2p_replay.py --workdir=./runs/digits_l2p_replay
"""

from configs import baselines
from configs import digits_l2p


def get_config(arg=None):
  return baselines.set_replay(digits_l2p.get_config(arg), per_class=10)
