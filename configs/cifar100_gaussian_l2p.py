"""Task-free L2P on CIFAR-100 with a Gaussian class schedule (200 episodes), ViT-B/16.

  python main.py --my_config configs/cifar100_gaussian_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Each class owns a Gaussian bump over the stream; every episode's label set holds each class
with the bump's value at the episode, and the episode trains on all training images of its
set for `num_epochs` epochs. There are no task boundaries for the learner (the optimizer is
never reset); the full test set is evaluated every 10 episodes. As in the original, the
shipped `continual.num_train_steps_per_task = -1` gives label sets of about 50 classes; a
positive value s gives epochs of s steps and narrower sets (s = 5: about 12 classes).
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.gaussian_schedule = True
  config.continual.num_tasks = 200
  config.continual.num_classes_per_task = 100
  config.reinit_optimizer = False
  config.eval_per_epochs = 100
  config.prompt_histogram = False
  config = common.with_arg(config, arg)
  if arg == "tiny":
    # The 100 class peaks lie whole steps apart: 2 episodes need a stream of >= 100 steps.
    # One epoch of 50 steps each.
    config.continual.num_train_steps_per_task = 50
    config.num_epochs = 1
  return config
