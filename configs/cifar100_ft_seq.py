"""Sequential fine-tuning of the whole ViT-B/16 on Split CIFAR-100 (the lower bound).

  python main.py --my_config configs/cifar100_ft_seq.py --workdir=./runs/cifar100_ft_seq \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published (DualPrompt paper, FT-seq): 33.61 average accuracy, 86.87 forgetting.
"""

from configs import baselines
from configs import cifar100_l2p


def get_config(arg=None):
  return baselines.set_ft_seq(cifar100_l2p.get_config(arg))
