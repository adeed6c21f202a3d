"""Experience replay on Split CIFAR-100: fine-tuning the whole ViT-B/16 with a rehearsal
buffer of 10 examples per class (the papers' rehearsal baseline).

  python main.py --my_config configs/cifar100_er10.py --workdir=./runs/cifar100_er10 \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

From task 1 on every batch of 16 images per device is joined by 16 replayed ones.
"""

from configs import baselines
from configs import cifar100_l2p


def get_config(arg=None):
  return baselines.set_er(cifar100_l2p.get_config(arg), per_class=10)
