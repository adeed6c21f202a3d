"""L2P with a rehearsal buffer of 10 examples per class on Split CIFAR-100 (the papers' L2P
with rehearsal).

  python main.py --my_config configs/cifar100_l2p_replay.py --workdir=./runs/cifar100_l2p_replay \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

A buffer of 50 per class: add --my_config.continual.replay.num_samples_per_class=50.
"""

from configs import baselines
from configs import cifar100_l2p


def get_config(arg=None):
  return baselines.set_replay(cifar100_l2p.get_config(arg), per_class=10)
