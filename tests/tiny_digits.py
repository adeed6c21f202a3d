"""Config file of the tests' subprocess runs: `e2e_util.tiny_digits_config()`.

  python main.py --my_config tests/tiny_digits.py --workdir=/tmp/tiny
"""

from tests import e2e_util


def get_config():
  return e2e_util.tiny_digits_config()
