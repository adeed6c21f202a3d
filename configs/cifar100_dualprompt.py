"""DualPrompt on Split CIFAR-100 (10 tasks x 10 classes), ViT-B/16, 8 x 24 images.

  python main.py --my_config configs/cifar100_dualprompt.py --workdir=./dualprompt \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published: 86.51 average accuracy, 5.16 forgetting.
"""

from configs import common


def set_dualprompt(config):
  """Switches the L2P base to DualPrompt's G-Prompt + E-Prompt layout."""
  config.method = "dualprompt"
  config.per_device_batch_size = 24
  config.vit_classifier = "token"
  config.use_g_prompt = True
  config.g_prompt_length = 5
  config.g_prompt_layer_idx = (0, 1)
  config.use_prefix_tune_for_g_prompt = True
  config.e_prompt_layer_idx = (2, 3, 4)
  config.use_prefix_tune_for_e_prompt = True
  config.prompt_pool_param.pool_size = 10
  config.prompt_pool_param.length = 5
  config.prompt_pool_param.top_k = 1
  config.prompt_pool_param.use_prompt_mask = True
  config.prompt_pool_param.shared_prompt_pool = True
  return config


def get_config(arg=None):
  return common.with_arg(set_dualprompt(common.get_base_config()), arg)
