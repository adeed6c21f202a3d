"""Builds models from an experiment config and initialises their parameters.

Fields are read as `config.field`: the config files are the one source of defaults. Bad
values raise ValueError (from here, models.vit and the prompt methods).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from models import methods
from models import resnet
from models import vit
from models.prompted_vit import PromptedViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _backbone_kwargs(config, num_classes: int) -> dict[str, Any]:
  """Fields shared by the prompted model and the query model."""
  if config.model_name not in vit.VARIANTS:
    raise ValueError(f'Unknown model_name {config.model_name!r}; valid names: '
                     f'{", ".join([*vit.VARIANTS, *resnet.VARIANTS])}.')
  variant = vit.get_variant(config.model_name)
  # None: the variant's own rate, as the original.
  dropout = variant.dropout_rate if config.dropout_rate is None else float(config.dropout_rate)
  return dict(
      hidden_size=variant.hidden_size, patch_size=variant.patch_size,
      num_layers=variant.num_layers, num_heads=variant.num_heads,
      mlp_dim=variant.mlp_dim, num_classes=num_classes,
      dtype=_dtype(config), attention_impl=config.attention_impl, dropout_rate=dropout)


def _dtype(config):
  if config.dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {config.dtype!r}; use one of {", ".join(DTYPES)}.')
  return DTYPES[config.dtype]


def create_model(config, num_classes: int) -> PromptedViT | resnet.ResNet:
  """The trained model: a ViT with the prompts of `config.method`, or a ResNet.

  Args:
    config: experiment ConfigDict.
    num_classes: outputs of the shared head.

  Returns:
    A validated PromptedViT or ResNet; bad settings raise ValueError.
  """
  if resnet.is_resnet(config.model_name):
    if config.method != 'none':
      raise ValueError(f'{config.model_name} takes no prompts: set method="none" (method '
                       f'{config.method!r} needs a ViT).')
    return resnet.create(config.model_name, num_classes, _dtype(config))
  return PromptedViT(
      classifier=config.vit_classifier, use_cls_token=config.use_cls_token,
      norm_pre_logits=config.norm_pre_logits, temperature=float(config.temperature),
      method=methods.from_config(config), **_backbone_kwargs(config, num_classes))


def create_query_model(config, num_classes: int) -> PromptedViT | None:
  """The frozen query ViT: same backbone, no prompts, class-token pre-logits (None for a
  ResNet, which has no prompts to choose).

  Its aux['pre_logits'] is the query feature of the prompt methods.
  """
  if resnet.is_resnet(config.model_name):
    return None
  return PromptedViT(classifier='token', use_cls_token=True,
                     **_backbone_kwargs(config, num_classes))


def _dummy_inputs(model: PromptedViT, input_size: int):
  images = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  cls_features = jnp.zeros((1, model.hidden_size), jnp.float32) if isinstance(model, PromptedViT) else None
  return images, cls_features


def _dummy_task(model: PromptedViT):
  """Task 0's arrays of the model's method (their shapes are the same for every task)."""
  if model.method is None:
    return None
  return model.method.task_arrays(0, steps_per_epoch=1, num_steps=1)


def init_variables(model, rng: jax.Array, input_size: int) -> dict[str, Any]:
  """Initialises `model` on a dummy [1, input_size, input_size, 3] batch.

  Returns:
    {'params': ...}, plus 'batch_stats' for a ResNet.
  """
  # Runs once per process, so compile it quickly rather than well.
  init = jax.jit(functools.partial(model.init, train=False),
                 compiler_options={'xla_backend_optimization_level': 0})
  return dict(init({'params': rng}, *_dummy_inputs(model, input_size), _dummy_task(model)))


def init_params(model, rng: jax.Array, input_size: int) -> dict[str, Any]:
  """The parameters of `init_variables`."""
  return init_variables(model, rng, input_size)['params']


def param_shapes(model: PromptedViT, input_size: int) -> dict[str, Any]:
  """The parameter tree of `model` as jax.ShapeDtypeStruct leaves (nothing computed)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, {'params': jax.random.PRNGKey(0)},
                        *_dummy_inputs(model, input_size), _dummy_task(model))['params']
