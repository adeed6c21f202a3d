"""Sequential training of the head on a frozen ViT-B/16, Split ImageNet-R (FT-seq-frozen).

  python main.py --my_config configs/imr_ft_frozen.py --workdir=./runs/imr_ft_frozen \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz
"""

from configs import baselines
from configs import imr_dualprompt


def get_config(arg=None):
  return baselines.set_ft_frozen(imr_dualprompt.get_config(arg))
