"""L2P on CORe50, domain-incremental (8 training sessions, 50 classes), ViT-B/16.

  python main.py --my_config configs/core50_l2p.py --workdir=./l2p \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

CORe50 needs a one-time preparation step (README, "Datasets"). Every task trains all
50 classes and is evaluated on one shared test set (sessions 3, 7, 10).
Published: 78.33 accuracy.
"""

from configs import common


def get_config(arg=None):
  config = common.get_base_config()
  config.dataset = "core50"
  config.continual.num_tasks = 8
  config.continual.num_classes_per_task = 50
  config.continual.train_mask = False
  config.optim = "sgd"
  config.eval_per_epochs = 5
  config.prompt_pool_param.length = 5
  config.prompt_pool_param.top_k = 4
  # The whole backbone trains (the query ViT stays as pretrained).
  config.freeze_part = ()
  config.prompt_histogram = False
  return common.with_arg(config, arg)
