"""CODA-Prompt on Split CIFAR-100 (10 tasks x 10 classes), ViT-B/16, 8 x 16 images.

  python main.py --my_config configs/cifar100_coda.py --workdir=./coda \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

The official settings (GT-RIPL/CODA-Prompt, experiments/cifar-100.sh and
configs/cifar-100_prompt.yaml): 100 components over the 10 tasks, 8 prefix tokens (4 keys,
4 values) at blocks 0-4, no orthogonality penalty, Adam at 0.001 for a global batch of 128,
the official per-epoch cosine, no gradient clipping, 20 epochs; prompts, keys, attention
vectors and the head train, the backbone stays frozen. The official code starts from timm's ImageNet-1k fine-tuned
`vit_base_patch16_224`: pass that file as init_checkpoint to reproduce its numbers (README,
"CODA-Prompt").
"""

from configs import common


def set_coda(config):
  """Switches the L2P base to CODA-Prompt with the official settings."""
  config.method = "coda"
  config.vit_classifier = "token"
  config.coda_prompt_param.pool_size = 100
  config.coda_prompt_param.length = 8
  config.coda_prompt_param.layer_idx = (0, 1, 2, 3, 4)
  config.coda_prompt_param.ortho_mu = 0.0
  config.optim = "adam"
  # 0.001 at the official global batch of 128 (learning_rate is scaled by global batch / 256).
  config.learning_rate = 0.002
  config.learning_rate_schedule = "coda_cosine"
  config.grad_clip_max_norm = 0.0
  # No clipping, so no frozen-weight gradients are needed for its norm.
  config.grad_clip_mode = "trainable"
  config.weight_decay = 0.0
  config.num_epochs = 20
  return config


def get_config(arg=None):
  return common.with_arg(set_coda(common.get_base_config()), arg)
