"""Embedded demo: L2P on scikit-learn's digits (5 tasks x 2 classes), small ViT, CPU.

  python main.py --my_config configs/digits_l2p.py --workdir=./runs/digits_l2p

Needs no download and no checkpoint: the backbone is randomly initialised and, as in L2P,
frozen, so only prompts, keys and the head learn on random features. Expect accuracies far
below those of a pretrained backbone; the demo shows the whole run (training, evaluation
after every task, metrics, TensorBoard, checkpoints) in under a minute on 2 CPU cores.
"""

from configs import common


def set_demo(config):
  """Shrinks a config to the embedded digits benchmark on a small, trainable ViT."""
  config.dataset = "digits"
  config.model_name = "ViT-test"
  config.input_size = 16
  config.resize_size = 16
  config.continual.num_tasks = 5
  config.continual.num_classes_per_task = 2
  config.per_device_batch_size = 16
  config.learning_rate = 0.1
  # Nothing to gain from the frozen random backbone's gradients.
  config.grad_clip_mode = "trainable"
  config.num_epochs = 3
  config.shuffle_buffer_size = 2000
  config.log_loss_every_steps = 20
  config.checkpoint_every_steps = 200
  return config


def get_config():
  config = set_demo(common.get_base_config())
  config.prompt_pool_param.pool_size = 10
  config.prompt_pool_param.length = 2
  config.prompt_pool_param.top_k = 2
  return config
