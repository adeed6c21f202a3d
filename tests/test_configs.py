"""The configs: every field documented and locked, the `tiny` switch, and every original config
builds and runs (tiny ViT, 2 tasks x 2 steps, mocked TFDS data)."""

import ast
import glob
import importlib
import inspect
import json
import os

import flax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import train_continual
from configs import common
from configs import digits_l2p
from libml import input_pipeline
from libml import validation
from tests import e2e_util
from tests.test_input_pipeline import _fake_imagenet_r

# Every config file (configs/<name>.py with a get_config).
CONFIG_NAMES = tuple(sorted(
    os.path.basename(path)[:-3] for path in glob.glob(os.path.join(os.path.dirname(common.__file__), "*.py"))
    if os.path.basename(path) not in ("__init__.py", "common.py", "baselines.py")))
ORIGINAL_CONFIGS = ("cifar100_l2p", "five_datasets_l2p", "core50_l2p", "cifar100_gaussian_l2p",
                    "imr_dualprompt", "cifar100_dualprompt")
# The benchmark configs that run end to end here: the original's, CODA-Prompt's and L2P with a
# rehearsal buffer (replay batches through the device crop path).
RUN_CONFIGS = ORIGINAL_CONFIGS + ("cifar100_coda", "imr_coda", "cifar100_l2p_replay")


# The original's six config files, evaluated: every field that changes a result, per config in
# ORIGINAL_CONFIGS order. None: the original leaves the field unset (its G-Prompt fields
# when there is no G-Prompt).
ORIGINAL_VALUES = {
    "model_name": ("ViT-B_16",) * 6,
    "dataset": ("cifar100", "5datasets", "core50", "cifar100", "imagenet_r", "cifar100"),
    "gaussian_schedule": (False, False, False, True, False, False),
    "per_device_batch_size": (16, 16, 16, 16, 24, 24),
    "optim": ("adam", "adam", "sgd", "adam", "adam", "adam"),
    "sgd_momentum": (0.9,) * 6,
    "learning_rate": (0.03, 0.03, 0.03, 0.03, 0.005, 0.03),
    "learning_rate_schedule": ("constant",) * 6,
    "warmup_epochs": (0,) * 6,
    "weight_decay": (0,) * 6,
    "grad_clip_max_norm": (1.0,) * 6,
    "reinit_optimizer": (True, True, True, False, True, True),
    "num_epochs": (5, 5, 5, 5, 50, 5),
    "shuffle_buffer_size": (10000,) * 6,
    "seed": (42,) * 6,
    "trial": (0,) * 6,
    "input_size": (224,) * 6,
    "resize_size": (256,) * 6,
    "norm_01": (True,) * 6,
    "reverse_task": (False,) * 6,
    "subsample_rate": (-1,) * 6,
    "continual.num_tasks": (10, 5, 8, 200, 10, 10),
    "continual.num_classes_per_task": (10, 10, 50, 100, 20, 10),
    "continual.rand_seed": (-1,) * 6,
    "continual.num_train_steps_per_task": (-1,) * 6,
    "continual.train_mask": (True, True, False, True, True, True),
    "continual.eval_task_inc": (False,) * 6,
    "vit_classifier": ("prompt", "prompt", "prompt", "prompt", "token", "token"),
    "use_cls_token": (True,) * 6,
    "norm_pre_logits": (False,) * 6,
    "temperature": (1,) * 6,
    "freeze_part": (("encoder", "embedding", "cls"),) * 2 + ((),) + (("encoder", "embedding", "cls"),) * 3,
    "use_g_prompt": (False, False, False, False, True, True),
    "g_prompt_length": (None,) * 4 + (5, 5),
    "g_prompt_layer_idx": (None,) * 4 + ((0, 1), (0, 1)),
    "use_prefix_tune_for_g_prompt": (None,) * 4 + (True, True),
    "use_e_prompt": (True,) * 6,
    "e_prompt_layer_idx": ((0,),) * 4 + ((2, 3, 4),) * 2,
    "use_prefix_tune_for_e_prompt": (False,) * 4 + (True, True),
    "prompt_pool": (True,) * 6,
    "prompt_pool_param.pool_size": (10, 20, 10, 10, 10, 10),
    "prompt_pool_param.length": (10, 10, 5, 10, 20, 5),
    "prompt_pool_param.top_k": (4, 4, 4, 4, 1, 1),
    "prompt_pool_param.initializer": ("uniform",) * 6,
    "prompt_pool_param.prompt_key": (True,) * 6,
    "prompt_pool_param.prompt_key_init": ("uniform",) * 6,
    "prompt_pool_param.embedding_key": ("cls",) * 6,
    "prompt_pool_param.use_prompt_mask": (False, True, False, False, True, True),
    "prompt_pool_param.mask_first_epoch": (False,) * 6,
    "prompt_pool_param.shared_prompt_pool": (False, True, False, False, True, True),
    "prompt_pool_param.shared_prompt_key": (False,) * 6,
    "prompt_pool_param.batchwise_prompt": (True, True, True, True, False, True),
    "pull_constraint": (True,) * 6,
    "pull_constraint_coeff": (1.0, 0.5, 1.0, 1.0, 1.0, 1.0),
    "eval_last_only": (False,) * 6,
    "num_eval_steps": (-1,) * 6,
    "eval_every_steps": (-1,) * 6,
    "prompt_histogram": (True, True, False, False, True, True),
}
# Defaults of fields the original configs do not set, as the original's code reads them.
ORIGINAL_DEFAULTS = {"dropout_rate": None, "min_learning_rate": 0.0, "grad_clip_mode": "full",
                     "prompt_pool_param.vote_group_size": -1,
                     "prompt_pool_param.batchwise_prompt_at_test": True}


def _field(config, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return tuple(config) if isinstance(config, (list, tuple)) else config


@pytest.mark.parametrize("index,name", enumerate(ORIGINAL_CONFIGS))
def test_configs_hold_the_original_values(index, name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for field, values in {**ORIGINAL_VALUES, **{k: (v,) * 6 for k, v in ORIGINAL_DEFAULTS.items()}}.items():
    if values[index] is not None or field in ORIGINAL_DEFAULTS:
      assert _field(config, field) == values[index], (name, field)


def _tiny(name: str):
  """The config's `tiny` variant with the config's own prompt pool shape, 18 x 18 images,
  2 images per device, 2 steps per task and 3 eval batches."""
  module = importlib.import_module(f"configs.{name}")
  full, config = module.get_config(), module.get_config("tiny")
  config.prompt_pool_param.length = full.prompt_pool_param.length
  config.prompt_pool_param.top_k = full.prompt_pool_param.top_k
  config.resize_size = 18
  config.per_device_batch_size = 2
  config.continual.num_train_steps_per_task = 2
  config.num_eval_steps = 3
  config.shuffle_buffer_size = 16
  config.log_loss_every_steps = 1
  if name == "cifar100_gaussian_l2p":
    # Two episodes of a stream long enough for 100 peaks (-1000 "batches" each), of 2 epochs.
    config.continual.num_train_steps_per_task = -1000
    config.num_epochs = 2
  return config


def _mock(name: str):
  if name.startswith("imr_"):
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(1000, 200, replace=False))  # the ImageNet-1k ids of ImageNet-R
    labels = rng.permutation(np.arange(500) % 200)
    return tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r(ids[labels]),
                                  policy=tfds.testing.MockPolicy.USE_CODE)
  return tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_benchmark_config_trains_and_evaluates(name, tmp_path):
  workdir = str(tmp_path / name)
  with _mock(name):
    out = train_continual.train_and_evaluate(_tiny(name), workdir)
    benchmark = input_pipeline.create_benchmark(_tiny(name))
  total_steps = sum(benchmark.num_train_steps(t) for t in range(benchmark.num_tasks))
  matrix = np.asarray(out["accuracy_matrix"])
  with open(os.path.join(workdir, "results.json")) as f:
    doc = json.load(f)
  assert doc["config"]["model_name"] == "ViT-test"
  assert np.isfinite(doc["avg_acc"])
  tags = e2e_util.scalar_tags(workdir)
  assert len(tags["loss"]) == total_steps and all(np.isfinite(v) for _, v in tags["loss"])
  if name == "cifar100_gaussian_l2p":
    assert matrix.shape[0] == 1 and not np.isnan(matrix[0, -1])  # full test set, last episode
  elif name == "core50_l2p":
    assert matrix.shape[0] == 1 and not np.isnan(matrix[0]).any()  # one shared test set
  else:
    assert matrix[:, :2].shape == (2, 2) and not np.isnan(matrix[:, 1]).any()
    for tag in ("accuracy_0", "accuracy_1", "avg_acc", "forgetting"):
      assert tag in tags, tag


def test_digits_dualprompt_config_trains_and_evaluates(tmp_path):
  """The DualPrompt demo as shipped passes the config checks; 2 tasks x 2 steps of it run."""
  from libml import validation  # pylint: disable=g-import-not-at-top
  from tests import run_util  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.digits_dualprompt").get_config()
  validation.check_config(config)  # all 5 tasks, as `python main.py` would run it
  assert config.dataset == "digits" and config.use_g_prompt and config.prompt_pool_param.shared_prompt_pool
  config.continual.num_tasks = 2
  config.continual.num_train_steps_per_task = 2
  config.per_device_batch_size = 4
  config.log_loss_every_steps = 1
  config.shuffle_buffer_size = 16
  config.model_name = "ViT-test"  # the run checks the method's wiring, not the backbone
  config.init_checkpoint = None
  workdir = str(tmp_path / "digits_dualprompt")
  out = train_continual.train_and_evaluate(config, workdir)
  matrix = np.asarray(out["accuracy_matrix"])
  assert matrix.shape == (2, 2) and np.isnan(matrix[1, 0]) and not np.isnan(matrix[:, 1]).any()
  with open(os.path.join(workdir, "results.json")) as f:
    doc = json.load(f)
  assert doc["config"]["dataset"] == "digits" and np.isfinite(doc["avg_acc"])
  tags = e2e_util.scalar_tags(workdir)
  assert len(tags["loss"]) == 4 and all(np.isfinite(v) for _, v in tags["loss"])
  for tag in ("accuracy_0", "accuracy_1", "avg_acc", "forgetting"):
    assert tag in tags, tag
  # The checkpointed model is DualPrompt's: a G-Prompt and a pool of E-Prompts with keys.
  checkpoints = run_util.read_checkpoints(workdir)
  params = checkpoints[max(checkpoints)][1]["params"]
  assert "g_prompt" in params and params["e_prompt"]["prompt"].shape[0] == config.prompt_pool_param.pool_size
  assert params["e_prompt"]["key"].shape[0] == config.prompt_pool_param.pool_size


def _flat(tree: dict) -> dict:
  """Nested dicts -> {"dotted.field": value}."""
  return flax.traverse_util.flatten_dict(tree, sep=".")


def _assigned_fields(source: str) -> dict[str, int]:
  """Dotted field -> line of `config.<field> = ...` in get_base_config (sub-dicts left out)."""
  function = next(node for node in ast.parse(source).body
                  if isinstance(node, ast.FunctionDef) and node.name == "get_base_config")
  out = {}
  for node in ast.walk(function):
    if isinstance(node, ast.Assign) and not ast.unparse(node.value).endswith("ConfigDict()"):
      target = ast.unparse(node.targets[0])
      if target.startswith("config."):
        out[target[len("config."):]] = node.lineno
  return out


def test_every_base_field_has_a_comment_directly_above_it():
  source = inspect.getsource(common)
  lines = source.splitlines()
  fields = _assigned_fields(source)
  assert set(fields) == set(_flat(common.get_base_config().to_dict()))  # The parse saw every field.
  for field, line in fields.items():
    above = lines[line - 2].strip()  # Line numbers count from 1.
    assert above.startswith("#") and not above.startswith("# ---"), f"{field} (line {line}) has no comment"


def test_configs_are_locked_against_new_fields():
  with pytest.raises(AttributeError, match="leraning_rate"):
    common.get_base_config().leraning_rate = 1.0
  with pytest.raises(AttributeError, match="pool_sise"):
    common.get_base_config().prompt_pool_param.pool_sise = 20
  for name in CONFIG_NAMES:
    module = importlib.import_module(f"configs.{name}")
    assert module.get_config().is_locked and module.get_config("tiny").is_locked, name


# What `common.set_tiny` changes; "tiny" changes nothing else of a config, except where a config
# adjusts to the tiny task count (joint training's classes, the Gaussian stream's epochs).
_TINY = {"model_name": "ViT-test", "init_checkpoint": None, "input_size": 16, "resize_size": 16,
         "prompt_pool_param.length": 2, "prompt_pool_param.top_k": 2, "continual.num_tasks": 2,
         "continual.num_train_steps_per_task": 4, "per_device_batch_size": 4, "log_loss_every_steps": 2,
         "checkpoint_every_steps": 2, "save_last_ckpt_only": False, "shuffle_buffer_size": 64}
# And for CODA-Prompt, whose orthogonal keys must fit the tiny ViT's width.
_TINY_CODA = {"coda_prompt_param.pool_size": 8}
_ADJUSTED = {"cifar100_gaussian_l2p": {"continual.num_train_steps_per_task", "num_epochs"},
             "cifar100_joint": {"continual.num_tasks", "continual.num_classes_per_task"},
             "digits_joint": {"continual.num_tasks", "continual.num_classes_per_task"},
             "imr_joint": {"continual.num_tasks", "continual.num_classes_per_task"}}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_tiny_argument_shrinks_the_config_and_keeps_method_and_protocol(name):
  module = importlib.import_module(f"configs.{name}")
  full, tiny = _flat(module.get_config().to_dict()), _flat(module.get_config("tiny").to_dict())
  adjusted = _ADJUSTED.get(name, set())
  expected = {**_TINY, **(_TINY_CODA if full["method"] == "coda" else {})}
  changed = {k for k in full if full[k] != tiny[k]}
  assert changed <= set(expected) | adjusted, name
  assert all(tiny[k] == v for k, v in expected.items() if k not in adjusted), name
  validation.check_config(module.get_config("tiny"))
  with pytest.raises(ValueError, match=r"Unknown config argument 'huge'; valid: tiny"):
    module.get_config("huge")


def test_tiny_digits_is_the_tests_config():
  """The tests' e2e runs use digits_l2p's tiny variant: the demo with `_TINY`'s fields."""
  expected = digits_l2p.get_config()
  expected.update_from_flattened_dict(_TINY)
  assert expected == digits_l2p.get_config("tiny")
