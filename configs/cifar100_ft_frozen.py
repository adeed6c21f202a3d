"""Sequential training of the head on a frozen ViT-B/16, Split CIFAR-100 (FT-seq-frozen).

  python main.py --my_config configs/cifar100_ft_frozen.py --workdir=./runs/cifar100_ft_frozen \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published (L2P paper, FT-seq-frozen): 17.72 average accuracy, 59.09 forgetting.
"""

from configs import baselines
from configs import cifar100_l2p


def get_config(arg=None):
  return baselines.set_ft_frozen(cifar100_l2p.get_config(arg))
