"""L2P on 5-datasets (CIFAR-10, MNIST, SVHN, notMNIST, Fashion-MNIST; 5 x 10 classes).

  python main.py --my_config configs/five_datasets_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

notMNIST needs a one-time preparation step (README, "Datasets").
Published: 81.14 average accuracy, 4.64 forgetting.
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "5datasets"
  config.continual.num_tasks = 5
  config.prompt_pool_param.pool_size = 20
  config.prompt_pool_param.length = 10
  config.prompt_pool_param.top_k = 4
  config.prompt_pool_param.use_prompt_mask = True
  config.prompt_pool_param.shared_prompt_pool = True
  config.pull_constraint_coeff = 0.5
  return common.with_arg(config, arg)
