"""The papers' baselines as configs: sequential fine-tuning, frozen fine-tuning, joint training."""

import importlib

from flax import traverse_util
import jax
import numpy as np
import pytest

import train_continual
from libml import optim
from libml import validation
from models import factory
from tests import run_util

BENCHMARKS = {"digits": ("digits_l2p", 10), "cifar100": ("cifar100_l2p", 100),
              "imr": ("imr_dualprompt", 200)}
KINDS = ("ft_seq", "ft_frozen", "joint")


def _trainable_roots(config) -> set[str]:
  """Top-level parameter names the optimizer trains, from the model the config builds."""
  model = factory.create_model(config, num_classes=10)
  shapes = factory.param_shapes(model, 16)
  mask = optim.trainable_mask(shapes, config.freeze_part)
  return {root for root in shapes if any(jax.tree.leaves(mask[root]))}


@pytest.mark.parametrize("benchmark", BENCHMARKS)
@pytest.mark.parametrize("kind", KINDS)
def test_baseline_config_is_its_benchmark_without_prompts(benchmark, kind):
  base_name, num_classes = BENCHMARKS[benchmark]
  config = importlib.import_module(f"configs.{benchmark}_{kind}").get_config()
  base = importlib.import_module(f"configs.{base_name}").get_config()
  validation.check_config(config)
  config.model_name = "ViT-test"  # the structure, not the size, is under test
  config.init_checkpoint = None
  # No prompts anywhere: the class token feeds the head.
  assert config.method == "none" and config.vit_classifier == "token"
  roots = set(factory.param_shapes(factory.create_model(config, 10), 16))
  assert not roots & {"e_prompt", "g_prompt"}
  trained = _trainable_roots(config)
  if kind == "ft_frozen":
    assert trained == {"head"}
  else:
    assert trained == roots and {"embedding", "cls", "Transformer", "head"} <= roots
  tasks = config.continual.num_tasks * config.continual.num_classes_per_task
  assert tasks == num_classes
  assert config.continual.num_tasks == (1 if kind == "joint" else base.continual.num_tasks)
  # Everything else is the benchmark's protocol.
  for field in ("dataset", "num_epochs", "per_device_batch_size", "input_size", "optim",
                "learning_rate_schedule", "continual.train_mask", "reinit_optimizer"):
    value = config
    expected = base
    for part in field.split("."):
      value, expected = value[part], expected[part]
    assert value == expected, field


def test_frozen_fine_tuning_keeps_the_pretrained_backbone(tmp_path):
  """Only the head moves; that FT-seq trains every parameter is checked above."""
  kind = "ft_frozen"
  config = importlib.import_module(f"configs.digits_{kind}").get_config()
  config.continual.num_tasks = 1
  config.continual.num_train_steps_per_task = 2
  config.per_device_batch_size = 4
  config.log_loss_every_steps = 2
  workdir = str(tmp_path / kind)
  train_continual.train_and_evaluate(config, workdir)
  checkpoints = run_util.read_checkpoints(workdir)
  params = traverse_util.flatten_dict(checkpoints[max(checkpoints)][1]["params"], sep="/")
  with np.load(config.init_checkpoint) as pretrained:
    for key in ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", "embedding/kernel"):
      assert np.array_equal(params[key], pretrained[key]), key
  assert np.abs(params["head/kernel"]).max() > 0  # trained from its zero start
