"""Evaluation of eval sets, with the query ViT's features computed once per image."""

import functools
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds

from libml import steps


class Evaluator:
  """Runs the pmapped eval step over a benchmark's eval sets.

  The query ViT never changes, so when `cache_query_features` is set its features of each
  eval image are computed on the first evaluation of a set and kept on the devices; every
  later evaluation costs one prompted forward pass per image.
  """

  def __init__(self, benchmark, model, query_model, *, cache_query_features: bool, num_eval_steps: int,
               task_incremental: bool):
    self._benchmark = benchmark
    self._cache = {} if (cache_query_features and model.needs_query) else None
    self._num_eval_steps = num_eval_steps
    self._task_incremental = task_incremental
    preprocess = benchmark.device_preprocess
    self._eval_step = jax.pmap(
        functools.partial(steps.eval_step, model=model, query_model=query_model, preprocess=preprocess),
        axis_name=steps.AXIS, in_axes=(0, 0, 0, None, None, 0))
    self._query_step = jax.pmap(
        functools.partial(steps.query_step, query_model=query_model, preprocess=preprocess),
        axis_name=steps.AXIS)

  def _batches(self, eval_set: int):
    dataset = self._benchmark.eval_dataset(eval_set)
    if self._num_eval_steps > 0:
      dataset = dataset.take(self._num_eval_steps)
    return steps.device_batches(iter(tfds.as_numpy(dataset)))

  def _class_mask(self, eval_set: int) -> np.ndarray:
    mask = np.ones([self._benchmark.num_classes], bool)
    if self._task_incremental:
      mask[:] = False
      mask[self._benchmark.eval_set_classes(eval_set)] = True
    return mask

  def evaluate(self, params: Any, query_params: Any, eval_set: int, method_task: dict[str, Any],
               batch_stats: Any = None) -> dict[str, Any]:
    """Accuracy (%), mean loss and prompt-id counts of `eval_set`.

    Args:
      params: replicated model parameters.
      query_params: replicated query ViT parameters.
      eval_set: index into the benchmark's eval sets.
      method_task: host arrays of the prompt method for the task trained last (`task_arrays`).
      batch_stats: replicated BatchNorm statistics of a ResNet (None for a ViT).

    Returns:
      {'accuracy': float, 'loss': float, 'count': int, 'prompt_counts': [pool] int or None}.
    """
    class_mask = self._class_mask(eval_set)
    cached = None if self._cache is None else self._cache.get(eval_set)
    features = []
    totals = []
    for i, batch in enumerate(self._batches(eval_set)):
      if self._cache is not None:
        if cached is None:
          features.append(self._query_step(query_params, batch))
          batch["cls_features"] = features[-1]
        else:
          batch["cls_features"] = cached[i]
      totals.append(self._eval_step(params, query_params, batch, class_mask, method_task, batch_stats))
    if self._cache is not None and cached is None:
      self._cache[eval_set] = features
    summed = jax.tree.map(lambda *xs: np.sum([np.asarray(x[0]) for x in xs], axis=0), *totals)
    count = max(float(summed["count"]), 1.0)
    return {
        "accuracy": 100.0 * float(summed["correct"]) / count,
        "loss": float(summed["loss_sum"]) / count,
        "count": int(summed["count"]),
        "prompt_counts": summed.get("prompt_counts"),
    }
