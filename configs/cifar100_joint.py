"""Joint fine-tuning of the whole ViT-B/16 on all 100 classes of CIFAR-100 (the upper bound).

  python main.py --my_config configs/cifar100_joint.py --workdir=./runs/cifar100_joint \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published (L2P paper, upper bound): 90.85 accuracy.
"""

from configs import baselines
from configs import cifar100_l2p


def get_config(arg=None):
  # arg first: "tiny" joins the tiny run's tasks into one.
  return baselines.set_joint(cifar100_l2p.get_config(arg))
