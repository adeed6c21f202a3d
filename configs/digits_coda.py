"""Embedded demo: CODA-Prompt on scikit-learn's digits (5 tasks x 2 classes), CPU, no download.

  python main.py --my_config configs/digits_coda.py --workdir=./runs/digits_coda

From the shipped glyph-pretrained ViT, frozen, as digits_l2p.py; 4 components per task.
"""

from configs import cifar100_coda
from configs import common
from configs import digits_l2p


def get_config(arg=None):
  config = digits_l2p.set_demo(cifar100_coda.set_coda(common.get_base_config()))
  config.coda_prompt_param.pool_size = 20
  config.coda_prompt_param.length = 4
  config.learning_rate = 0.1
  return common.with_arg(config, arg)
