"""Embedded demo: DualPrompt on scikit-learn's digits (5 tasks x 2 classes), CPU, no download.

  python main.py --my_config configs/digits_dualprompt.py --workdir=./runs/digits_dualprompt

From the shipped glyph-pretrained ViT, frozen, as digits_l2p.py.
"""

from configs import cifar100_dualprompt
from configs import common
from configs import digits_l2p


def get_config(arg=None):
  config = cifar100_dualprompt.set_dualprompt(common.get_base_config())
  config = digits_l2p.set_demo(config)
  config.g_prompt_length = 2
  config.prompt_pool_param.length = 2
  config.learning_rate = 0.03
  return common.with_arg(config, arg)
