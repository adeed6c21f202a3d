"""Builds models from an experiment config and initialises their parameters."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from libml.errors import UserError
from models import vit
from models.prompted_vit import PromptedViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _layers(config, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
  value = config.get(key, default)
  if isinstance(value, int):
    return (value,)
  return tuple(int(i) for i in value)


def _backbone_kwargs(config, num_classes: int) -> dict[str, Any]:
  """Fields shared by the prompted model and the query model."""
  variant = vit.get_variant(config.model_name)
  dtype_name = config.get('dtype', 'float32')
  if dtype_name not in DTYPES:
    raise UserError(f'Unknown dtype {dtype_name!r}; use one of '
                    f'{", ".join(DTYPES)}.')
  return dict(
      hidden_size=variant.hidden_size, patch_size=variant.patch_size,
      num_layers=variant.num_layers, num_heads=variant.num_heads,
      mlp_dim=variant.mlp_dim, num_classes=num_classes,
      dtype=DTYPES[dtype_name],
      attention_impl=config.get('attention_impl', 'xla'),
      dropout_rate=_dropout_rate(config, variant))


def _dropout_rate(config, variant: vit.ViTVariant) -> float:
  """`config.dropout_rate`, or the variant's own rate (as the original) when None."""
  rate = config.get('dropout_rate', None)
  return variant.dropout_rate if rate is None else float(rate)


def _pool_kwargs(config) -> dict[str, Any]:
  """E-Prompt pool fields from `config.prompt_pool_param`."""
  if not config.get('prompt_pool', True):
    raise UserError('use_e_prompt=True draws E-Prompts from the keyed pool; '
                    'set prompt_pool=True or use_e_prompt=False.')
  pool = config.get('prompt_pool_param', None)
  if pool is None:
    raise UserError('use_e_prompt=True needs config.prompt_pool_param.')
  return dict(
      use_e_prompt=True,
      e_prompt_layers=_layers(config, 'e_prompt_layer_idx', (0,)),
      e_prompt_prefix=bool(config.get('use_prefix_tune_for_e_prompt', False)),
      pool_size=int(pool.get('pool_size', 10)),
      prompt_length=int(pool.get('length', 5)),
      top_k=int(pool.get('top_k', 1)),
      prompt_key=bool(pool.get('prompt_key', True)),
      prompt_key_init=pool.get('prompt_key_init', 'uniform'),
      embedding_key=pool.get('embedding_key', 'cls'),
      batchwise_prompt=bool(pool.get('batchwise_prompt', False)),
      batchwise_prompt_at_test=bool(
          pool.get('batchwise_prompt_at_test', True)),
      # The original voted per device (groups of per_device_batch_size images).
      vote_group_size=int(pool.get('vote_group_size', -1)) if pool.get('vote_group_size', -1) > 0
      else int(config.get('per_device_batch_size', 0)))


def create_model(config, num_classes: int) -> PromptedViT:
  """The trained model: backbone plus the prompts the config asks for.

  Args:
    config: experiment ConfigDict (keys read with `config.get`).
    num_classes: outputs of the shared head.

  Returns:
    A validated PromptedViT; bad settings raise UserError.
  """
  kwargs = _backbone_kwargs(config, num_classes)
  pool_param = config.get('prompt_pool_param', None)
  init = 'uniform' if pool_param is None else pool_param.get(
      'initializer', 'uniform')
  kwargs.update(
      classifier=config.get('vit_classifier', 'token'),
      use_cls_token=bool(config.get('use_cls_token', True)),
      norm_pre_logits=bool(config.get('norm_pre_logits', False)),
      temperature=float(config.get('temperature', 1.0)),
      prompt_init=init)
  if config.get('use_g_prompt', False):
    kwargs.update(
        use_g_prompt=True,
        g_prompt_length=int(config.get('g_prompt_length', 5)),
        g_prompt_layers=_layers(config, 'g_prompt_layer_idx', (0, 1)),
        g_prompt_prefix=bool(config.get('use_prefix_tune_for_g_prompt', True)))
  if config.get('use_e_prompt', False):
    kwargs.update(_pool_kwargs(config))
  return PromptedViT(**kwargs)


def create_query_model(config, num_classes: int) -> PromptedViT:
  """The frozen query ViT: same backbone, no prompts, class-token pre-logits.

  Its aux['pre_logits'] is the query feature of the prompt pool.
  """
  return PromptedViT(classifier='token', use_cls_token=True,
                     **_backbone_kwargs(config, num_classes))


def _dummy_inputs(model: PromptedViT, input_size: int):
  images = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  cls_features = jnp.zeros((1, model.hidden_size), jnp.float32)
  return images, cls_features


def init_params(model: PromptedViT, rng: jax.Array,
                input_size: int) -> dict[str, Any]:
  """Initialises `model` on a dummy [1, input_size, input_size, 3] batch."""
  # Runs once per process, so compile it quickly rather than well.
  init = jax.jit(functools.partial(model.init, train=False),
                 compiler_options={'xla_backend_optimization_level': 0})
  return init({'params': rng}, *_dummy_inputs(model, input_size))['params']


def param_shapes(model: PromptedViT, input_size: int) -> dict[str, Any]:
  """The parameter tree of `model` as jax.ShapeDtypeStruct leaves (nothing computed)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, {'params': jax.random.PRNGKey(0)},
                        *_dummy_inputs(model, input_size))['params']
