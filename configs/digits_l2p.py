"""Embedded demo: L2P on scikit-learn's digits (5 tasks x 2 classes), CPU, no download.

  python main.py --my_config configs/digits_l2p.py --workdir=./runs/digits_l2p

The backbone is `ViT-demo` pretrained on rendered letters and symbols (no digits), shipped as
`demo/ViT-demo_glyphs.npz` and made by `python -m demo.pretrain_vit`: it plays the part
ImageNet-21k's ViT-B/16 plays in the real configs, and is loaded and frozen the same way.
"""

import os

from configs import common

# The shipped checkpoint, found from this file so that any working directory works.
DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "demo", "ViT-demo_glyphs.npz")


def set_demo(config):
  """Shrinks a config to the embedded digits benchmark on the shipped pretrained ViT."""
  config.dataset = "digits"
  config.model_name = "ViT-demo"
  config.init_checkpoint = DEMO_CHECKPOINT
  config.input_size = 16
  config.resize_size = 16
  config.continual.num_tasks = 5
  config.continual.num_classes_per_task = 2
  config.per_device_batch_size = 16
  config.learning_rate = 0.1
  # Clip by the trained parameters' gradients alone and skip the frozen backbone's (faster on
  # CPU; the reproduction configs keep the original's "full").
  config.grad_clip_mode = "trainable"
  config.num_epochs = 3
  config.shuffle_buffer_size = 2000
  config.log_loss_every_steps = 20
  config.checkpoint_every_steps = 200
  return config


def get_config(arg=None):
  config = set_demo(common.get_base_config())
  config.prompt_pool_param.pool_size = 10
  config.prompt_pool_param.length = 5
  config.prompt_pool_param.top_k = 1
  return common.with_arg(config, arg)
