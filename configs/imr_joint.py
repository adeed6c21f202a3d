"""Joint fine-tuning of the whole ViT-B/16 on all 200 classes of ImageNet-R (the upper bound).

  python main.py --my_config configs/imr_joint.py --workdir=./runs/imr_joint \
      --my_config.init_checkpoint=<path>/ViT-B_16.npz

Published (DualPrompt paper, upper bound): 79.13 accuracy.
"""

from configs import baselines
from configs import imr_dualprompt


def get_config(arg=None):
  # arg first: "tiny" joins the tiny run's tasks into one.
  return baselines.set_joint(imr_dualprompt.get_config(arg))
