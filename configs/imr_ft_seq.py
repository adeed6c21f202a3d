"""Sequential fine-tuning of the whole ViT-B/16 on Split ImageNet-R (the lower bound).

  python main.py --my_config configs/imr_ft_seq.py --workdir=./runs/imr_ft_seq \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published (DualPrompt paper, FT-seq): 28.87 average accuracy, 63.80 forgetting.
"""

from configs import baselines
from configs import imr_dualprompt


def get_config(arg=None):
  return baselines.set_ft_seq(imr_dualprompt.get_config(arg))
