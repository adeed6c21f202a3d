"""`configs/digits_l2p.py:tiny` as a config file of its own, for commands that take a path only.

  python main.py --my_config tests/tiny_digits.py --workdir=/tmp/tiny

is the same run as `python main.py --my_config configs/digits_l2p.py:tiny --workdir=/tmp/tiny`.
"""

from configs import digits_l2p


def get_config():
  return digits_l2p.get_config("tiny")
