"""DualPrompt on Split ImageNet-R (10 tasks x 20 classes), ViT-B/16, 8 x 24 images.

  python main.py --my_config configs/imr_dualprompt.py --workdir=./dualprompt \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published: 68.13 average accuracy, 4.68 forgetting.
"""

from configs import cifar100_dualprompt
from configs import common


def get_config(arg=None):
  config = cifar100_dualprompt.set_dualprompt(common.get_base_config())
  config.dataset = "imagenet_r"
  config.continual.num_classes_per_task = 20
  config.learning_rate = 0.005
  config.num_epochs = 50
  config.eval_per_epochs = 10
  config.prompt_pool_param.length = 20
  config.prompt_pool_param.batchwise_prompt = False
  return common.with_arg(config, arg)
