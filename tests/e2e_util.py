"""Shared helpers of the end-to-end tests: tiny configs and reading TensorBoard events."""

import glob
import os

import jax
import numpy as np
import tensorflow as tf

import train_continual
from configs import digits_l2p
from libml import evaluation
from libml import steps
from models import factory


def tiny_digits_config(**overrides):
  """`configs/digits_l2p.py:tiny` (2 tasks x 4 steps on the random test ViT) with `overrides`.

  Overrides are flattened field names ("prompt_pool_param.top_k"); a name the config does
  not define raises.
  """
  config = digits_l2p.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


def scalar_tags(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalar summaries in `workdir`'s event files: tag -> [(step, value)]."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
        elif value.metadata.plugin_data.plugin_name == "scalars":
          number = float(tf.make_ndarray(value.tensor).reshape(-1)[0])
          out.setdefault(value.tag, []).append((event.step, number))
  return out


def all_tags(workdir: str) -> set[str]:
  """Every summary tag in `workdir`'s event files (scalars, histograms, images)."""
  return {value.tag
          for path in glob.glob(os.path.join(workdir, "**", "events.out.tfevents.*"), recursive=True)
          for event in tf.compat.v1.train.summary_iterator(path)
          for value in event.summary.value}


def snapshot(directory: str) -> dict[str, bytes]:
  """Every file under `directory`: relative path -> content."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def method_task(model, benchmark, task: int) -> dict:
  """The prompt method's arrays for `task`, which the loop passes the evaluator after it."""
  return train_continual._method_arrays(benchmark, task, model)  # pylint: disable=protected-access


def evaluator_setup(config, benchmark):
  """Models with a random non-zero head and Evaluators over `benchmark`, for cache tests.

  Returns:
    (make, rparams, rquery, query_model, method_task): `make(cache)` builds an Evaluator that
    caches the query features or not; rparams / rquery are the replicated model / query
    parameters; method_task the method's arrays after the benchmark's last task.
  """
  model = factory.create_model(config, benchmark.num_classes)
  query_model = factory.create_query_model(config, benchmark.num_classes)
  params = factory.init_params(model, jax.random.PRNGKey(0), config.input_size)
  # A non-zero head so that accuracies and losses depend on the prompts chosen.
  params["head"]["kernel"] = np.random.default_rng(0).normal(size=params["head"]["kernel"].shape)
  query_params = {k: params[k] for k in factory.param_shapes(query_model, config.input_size)}
  assert model.needs_query

  def make(cache: bool) -> evaluation.Evaluator:
    return evaluation.Evaluator(benchmark, model, query_model, cache_query_features=cache,
                                num_eval_steps=config.num_eval_steps, task_incremental=False)

  last = method_task(model, benchmark, benchmark.num_tasks - 1)
  return make, steps.replicate(params), steps.replicate(query_params), query_model, last
