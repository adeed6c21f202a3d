"""Evaluation: cached query features give exactly what recomputing them gives."""

import jax
import numpy as np
import pytest

from libml import device_preprocess
from libml import evaluation
from libml import input_pipeline
from libml import record_sources
from libml import steps
from models import factory
from tests import e2e_util


@pytest.mark.parametrize("on_device", [True, False])
def test_cached_query_features_equal_recomputed(on_device):
  config = e2e_util.tiny_digits_config(**{"prompt_pool_param.batchwise_prompt_at_test": False,
                                          "preprocess_on_device": on_device})
  benchmark = input_pipeline.create_benchmark(config)
  assert (benchmark.device_preprocess is not None) == on_device
  assert config.num_eval_steps == -1  # every batch
  evaluator, rparams, rquery, query_model, method_task = e2e_util.evaluator_setup(config, benchmark)
  cached = evaluator(True)
  first = cached.evaluate(rparams, rquery, 1, method_task)  # computes and stores the features
  features = cached._cache[1]
  second = cached.evaluate(rparams, rquery, 1, method_task)  # reuses them
  fresh = evaluator(False).evaluate(rparams, rquery, 1, method_task)
  for result in (first, second):
    assert result["accuracy"] == fresh["accuracy"] and result["count"] == fresh["count"]
    np.testing.assert_allclose(result["loss"], fresh["loss"], rtol=1e-6)
    np.testing.assert_array_equal(result["prompt_counts"], fresh["prompt_counts"])
  # The stored features are the query ViT's pre-logits of the eval images, in order.
  query = jax.pmap(lambda p, b: steps.query_features(
      query_model, p, device_preprocess.eval_images(b, benchmark.device_preprocess)), axis_name=steps.AXIS)
  for batch, stored in zip(cached._batches(1), features):
    np.testing.assert_allclose(np.asarray(stored), np.asarray(query(rquery, batch)), rtol=1e-6, atol=1e-6)
  assert first["count"] > 0


def test_padding_is_not_counted_and_task_incremental_masks_other_classes():
  # 2 devices x 5 images: the 72 test images of digits 0-1 (and of 2-3) fill 8 batches of 10
  # and are padded with 8 images labelled 0.
  config = e2e_util.tiny_digits_config(per_device_batch_size=5)
  benchmark = input_pipeline.create_benchmark(config)
  labels = record_sources.digits_splits()["test"][2]
  counts = np.bincount(labels, minlength=10)
  assert counts[0] + counts[1] == counts[2] + counts[3] == 72 and 72 % 10
  model = factory.create_model(config, benchmark.num_classes)
  query_model = factory.create_query_model(config, benchmark.num_classes)
  params = factory.init_params(model, jax.random.PRNGKey(0), config.input_size)
  # A zero head kernel makes the logits the bias for every image: the model always predicts
  # class 0 over all classes, class 0 among {0, 1} and class 3 among {2, 3}.
  params["head"]["kernel"] = np.zeros_like(params["head"]["kernel"])
  params["head"]["bias"] = np.array([3.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
  query_params = {k: params[k] for k in factory.param_shapes(query_model, config.input_size)}
  rparams, rquery = steps.replicate(params), steps.replicate(query_params)
  method_task = e2e_util.method_task(model, benchmark, 1)

  evaluators = {task_incremental: evaluation.Evaluator(
      benchmark, model, query_model, cache_query_features=False, num_eval_steps=-1,
      task_incremental=task_incremental) for task_incremental in (False, True)}
  expected = {(False, 0): counts[0], (False, 1): 0, (True, 0): counts[0], (True, 1): counts[3]}
  for (task_incremental, eval_set), correct in expected.items():
    result = evaluators[task_incremental].evaluate(rparams, rquery, eval_set, method_task)
    assert result["count"] == 72, (task_incremental, eval_set)
    assert result["accuracy"] == pytest.approx(100.0 * correct / 72), (task_incremental, eval_set)
