"""L2P on Split CIFAR-100 (10 tasks x 10 classes), ViT-B/16, 8 x 16 images.

  python main.py --my_config configs/cifar100_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published: 83.83 average accuracy, 7.63 forgetting.
"""

from configs import common


def get_config(arg=None):
  return common.with_arg(common.get_base_config(), arg)
