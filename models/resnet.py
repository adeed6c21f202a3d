"""ResNet v1 backbones (He et al., 2015) for fine-tuning and rehearsal baselines.

Parameter names follow the original release: 'init_conv', 'init_bn', 'stage{i}/block{j}/
{conv,bn}{k}', 'proj_conv', 'proj_bn' and 'head'. Downsampling sits in the first 3x3
convolution of a stage's first block, and a block's shortcut is a 1x1 convolution plus
BatchNorm exactly when its output shape differs from its input. Batch statistics live in
the 'batch_stats' collection; in training BatchNorm uses the per-device batch.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ResNetVariant:
  """Architecture settings of a named ResNet."""
  stage_sizes: tuple[int, ...]
  bottleneck: bool
  small_input: bool = False
  init_head: str = 'zero'


VARIANTS: dict[str, ResNetVariant] = {
    'resnet18': ResNetVariant((2, 2, 2, 2), bottleneck=False),
    'resnet18_he': ResNetVariant((2, 2, 2, 2), bottleneck=False, init_head='kaiming'),
    'resnet50': ResNetVariant((3, 4, 6, 3), bottleneck=True),
    # 3x3 stride-1 stem without max pool, for 32x32 inputs.
    'resnet18_cifar': ResNetVariant((2, 2, 2, 2), bottleneck=False, small_input=True),
    # Two one-block stages: the tests' tiny ResNet.
    'resnet-test': ResNetVariant((1, 1), bottleneck=False, small_input=True),
}

HEAD_INITS = {'zero': nn.initializers.zeros, 'kaiming': nn.initializers.kaiming_uniform()}


def is_resnet(name: str) -> bool:
  """Whether `name` is one of the ResNet variants."""
  return name in VARIANTS


def get_variant(name: str) -> ResNetVariant:
  """Returns the settings of the named ResNet, or raises ValueError."""
  if name not in VARIANTS:
    raise ValueError(f'Unknown model_name {name!r}; valid names: {", ".join(VARIANTS)}.')
  return VARIANTS[name]


class Block(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x width) residual block.

  Attributes:
    filters: width of the block's 3x3 convolution.
    bottleneck: bottleneck block instead of the basic one.
    strides: stride of the 3x3 convolution (and of the shortcut projection).
    norm: BatchNorm constructor.
    dtype: compute dtype.
  """

  filters: int
  bottleneck: bool
  strides: int
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H/strides, W/strides, filters (x4 for bottleneck)]."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32)
    s = (self.strides, self.strides)
    residual = x
    if self.bottleneck:
      y = nn.relu(self.norm(name='bn1')(conv(self.filters, (1, 1), name='conv1')(x)))
      y = nn.relu(self.norm(name='bn2')(conv(self.filters, (3, 3), s, name='conv2')(y)))
      y = conv(4 * self.filters, (1, 1), name='conv3')(y)
      y = self.norm(name='bn3')(y)  # Unlike the basic block, the scale starts at one.
    else:
      y = nn.relu(self.norm(name='bn1')(conv(self.filters, (3, 3), s, name='conv1')(x)))
      y = conv(self.filters, (3, 3), name='conv2')(y)
      y = self.norm(scale_init=nn.initializers.zeros, name='bn2')(y)
    if residual.shape != y.shape:
      residual = conv(y.shape[-1], (1, 1), s, name='proj_conv')(residual)
      residual = self.norm(name='proj_bn')(residual)
    return nn.relu(residual + y)


class Stage(Block):
  """`size` blocks; only the first strides (and may project its shortcut)."""

  size: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H/strides, W/strides, filters (x4 for bottleneck)]."""
    for j in range(self.size):
      x = Block(self.filters, self.bottleneck, self.strides if j == 0 else 1, self.norm,
                self.dtype, name=f'block{j + 1}')(x)
    return x


class ResNet(nn.Module):
  """ResNet v1 classifier with the call signature of the prompted ViT.

  Attributes:
    stage_sizes: blocks per stage; stage i has width 64 * 2**i.
    bottleneck: bottleneck blocks (ResNet-50) instead of basic ones (ResNet-18).
    num_classes: outputs of the head.
    small_input: 3x3 stride-1 stem with relu and no max pool (CIFAR) instead of
      the 7x7 stride-2 stem with 3x3 stride-2 max pool.
    init_head: head kernel init, 'zero' or 'kaiming' (he uniform).
    dtype: compute dtype; parameters and batch statistics stay float32.
  """

  stage_sizes: tuple[int, ...]
  bottleneck: bool
  num_classes: int
  small_input: bool = False
  init_head: str = 'zero'
  dtype: Any = jnp.float32

  method = None  # No prompt method.

  @property
  def needs_query(self) -> bool:
    """A ResNet uses no query features."""
    return False

  @nn.compact
  def __call__(self, images: Array, cls_features: Optional[Array] = None, task: Any = None,
               vote_mask: Optional[Array] = None, train: bool = False):
    """Classifies images; `cls_features`, `task` and `vote_mask` are ignored.

    Args:
      images: [B, H, W, 3] float images.
      train: use (and update) batch statistics instead of the running ones.

    Returns:
      logits [B, num_classes] float32 and aux {'pre_logits': [B, F] float32}, with F
      512 for basic blocks and 2048 for bottleneck ones.
    """
    del cls_features, task, vote_mask
    if self.init_head not in HEAD_INITS:
      raise ValueError(f'Unknown init_head {self.init_head!r}; use one of '
                       f'{", ".join(HEAD_INITS)}.')
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, param_dtype=jnp.float32)
    conv = functools.partial(nn.Conv, 64, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, name='init_conv')
    x = images.astype(self.dtype)
    if self.small_input:
      x = nn.relu(norm(name='init_bn')(conv((3, 3))(x)))
    else:
      # As in the original release: no relu between the stem's BatchNorm and max pool.
      x = norm(name='init_bn')(conv((7, 7), (2, 2))(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, size in enumerate(self.stage_sizes):
      x = Stage(64 * 2**i, self.bottleneck, 1 if i == 0 else 2, norm, self.dtype, size,
                name=f'stage{i + 1}')(x)
    pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=HEAD_INITS[self.init_head], name='head')(pre_logits)
    return logits.astype(jnp.float32), {'pre_logits': pre_logits}


def create(name: str, num_classes: int, dtype=jnp.float32) -> ResNet:
  """The named ResNet variant with a `num_classes` head; unknown names raise ValueError."""
  v = get_variant(name)
  return ResNet(stage_sizes=v.stage_sizes, bottleneck=v.bottleneck, num_classes=num_classes,
                small_input=v.small_input, init_head=v.init_head, dtype=dtype)
