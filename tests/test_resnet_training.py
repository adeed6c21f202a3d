"""ResNet backbones in the train and eval steps: BatchNorm statistics under pmap, frozen or not,
and the config checks that keep them to the baselines."""

import functools

import jax
import numpy as np
import pytest

from libml import optim
from libml import steps
from libml import train_state
from libml import validation
from libml.errors import UserError
from models import factory
from tests import e2e_util

NUM_CLASSES = 4


def _setup(freeze_bn_stats: bool):
  config = e2e_util.tiny_digits_config(**{"method": "none", "vit_classifier": "token", "freeze_part": (),
                                          "model_name": "resnet-test", "freeze_bn_stats": freeze_bn_stats})
  model = factory.create_model(config, NUM_CLASSES)
  variables = factory.init_variables(model, jax.random.PRNGKey(0), 8)
  tx = optim.create_optimizer(config, variables["params"])
  state = train_state.create(variables["params"], tx, variables["batch_stats"])
  options = steps.StepOptions.from_config(config, global_batch=8)
  step = jax.pmap(functools.partial(steps.train_step, model=model, query_model=None, tx=tx, options=options),
                  axis_name=steps.AXIS)
  # Two devices with very different batches: their BatchNorm statistics differ.
  images = np.random.default_rng(0).normal(size=(2, 4, 8, 8, 3)).astype(np.float32)
  images[1] = images[1] * 3.0 + 2.0
  batch = {"image": images, "label": np.array([[0, 1, 0, 1], [1, 0, 1, 0]], np.int32)}
  task = {"class_mask": np.ones([NUM_CLASSES], bool), "method": {}, "steps_per_epoch": np.float32(4),
          "num_epochs": np.float32(1)}
  return model, state, step, batch, task


def _per_device_stats(model, state, images):
  """The running statistics one device's batch alone gives (BatchNorm in training mode)."""
  _, updated = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                           mutable=["batch_stats"])
  return updated["batch_stats"]


def test_running_statistics_take_the_mean_over_devices():
  model, state, step, batch, task = _setup(freeze_bn_stats=False)
  new, _ = step(steps.replicate(state), batch, steps.replicate({}), steps.replicate(task),
                steps.replicate(jax.random.PRNGKey(1)))
  per_device = [_per_device_stats(model, state, batch["image"][d]) for d in range(2)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *per_device)
  for path, leaf in jax.tree_util.tree_leaves_with_path(new.batch_stats):
    want = expected
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(leaf[0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(leaf[0], leaf[1])  # Every replica holds the same statistics.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a[0], b), new.batch_stats, state.batch_stats))
  assert all(moved)


def test_frozen_running_statistics_stay_while_the_weights_train():
  _, state, step, batch, task = _setup(freeze_bn_stats=True)
  new, _ = step(steps.replicate(state), batch, steps.replicate({}), steps.replicate(task),
                steps.replicate(jax.random.PRNGKey(1)))
  for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(state.batch_stats), strict=True):
    np.testing.assert_array_equal(a[0], b)
  assert not np.allclose(new.params["head"]["kernel"][0], state.params["head"]["kernel"])


def test_evaluation_uses_the_running_statistics():
  model, state, _, batch, _ = _setup(freeze_bn_stats=False)
  stats = jax.tree.map(lambda x: x + 0.5, state.batch_stats)
  params = dict(state.params)
  params["head"] = {"kernel": np.random.default_rng(1).normal(size=params["head"]["kernel"].shape),
                    "bias": params["head"]["bias"]}
  eval_step = jax.pmap(functools.partial(steps.eval_step, model=model, query_model=None),
                       axis_name=steps.AXIS, in_axes=(0, 0, 0, None, None, 0))
  eval_batch = {**batch, "mask": np.ones([2, 4], bool)}
  out = eval_step(steps.replicate(params), steps.replicate({}), eval_batch, np.ones([NUM_CLASSES], bool),
                  {}, steps.replicate(stats))
  logits, _ = model.apply({"params": params, "batch_stats": stats}, batch["image"].reshape(8, 8, 8, 3))
  losses = -jax.nn.log_softmax(logits)[np.arange(8), batch["label"].reshape(-1)]
  np.testing.assert_allclose(out["loss_sum"][0], np.sum(losses), rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"model_name": "resnet-test"}, 'set method="none"'),
    ({"model_name": "resnet-test", "method": "none", "init_checkpoint": "/x/ViT-B_16.npz"},
     "leave init_checkpoint unset"),
    ({"model_name": "resnet19", "method": "none"}, "Unknown model_name .*ViT-B_16.*resnet18_cifar"),
])
def test_resnet_settings_that_cannot_run_are_refused(overrides, message):
  with pytest.raises(UserError, match=message):
    validation.check_config(e2e_util.tiny_digits_config(**overrides))
