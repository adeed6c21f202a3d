"""CODA-Prompt on Split ImageNet-R (10 tasks x 20 classes), ViT-B/16, 8 x 16 images.

  python main.py --my_config configs/imr_coda.py --workdir=./coda_imr \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

The official settings (GT-RIPL/CODA-Prompt, experiments/imagenet-r.sh and
configs/imnet-r_prompt.yaml), as cifar100_coda.py but 50 epochs; the ImageNet-R split is this
project's (imr_dualprompt.py's), so that the three methods compare on the same data.
"""

from configs import cifar100_coda
from configs import common


def get_config(arg=None):
  config = cifar100_coda.set_coda(common.get_base_config())
  config.dataset = "imagenet_r"
  config.continual.num_classes_per_task = 20
  config.num_epochs = 50
  return common.with_arg(config, arg)
