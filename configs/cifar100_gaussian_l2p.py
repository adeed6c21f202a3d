"""Task-free L2P on CIFAR-100 with a Gaussian class schedule (200 episodes), ViT-B/16.

  python main.py --my_config configs/cifar100_gaussian_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Each class's sampling probability rises and falls along a Gaussian over the stream; there
are no task boundaries for the learner (the optimizer is never reset) and the full test set
is evaluated every 10 episodes. `continual.num_train_steps_per_task` is the number of
batches per episode; -1 means the schedule's default of 5.
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.gaussian_schedule = True
  config.continual.num_tasks = 200
  config.continual.num_classes_per_task = 100
  config.reinit_optimizer = False
  config.eval_per_epochs = 100
  config.prompt_histogram = False
  return config
