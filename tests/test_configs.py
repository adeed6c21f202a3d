"""Every original config builds and runs (tiny ViT, 2 tasks x 2 steps, mocked TFDS data)."""

import importlib
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import train_continual
from tests import e2e_util
from tests.test_input_pipeline import _fake_imagenet_r

ORIGINAL_CONFIGS = ("cifar100_l2p", "five_datasets_l2p", "core50_l2p", "cifar100_gaussian_l2p",
                    "imr_dualprompt", "cifar100_dualprompt")


def _tiny(name: str):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.model_name = "ViT-test"
  config.input_size = 16
  config.resize_size = 18
  config.per_device_batch_size = 2
  config.continual.num_tasks = 2
  config.continual.num_train_steps_per_task = 2
  config.num_eval_steps = 3
  config.shuffle_buffer_size = 16
  config.log_loss_every_steps = 1
  return config


def _mock(name: str):
  if name == "imr_dualprompt":
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(1000, 200, replace=False))  # the ImageNet-1k ids of ImageNet-R
    labels = rng.permutation(np.arange(500) % 200)
    return tfds.testing.mock_data(as_dataset_fn=_fake_imagenet_r(ids[labels]),
                                  policy=tfds.testing.MockPolicy.USE_CODE)
  return tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE)


@pytest.mark.parametrize("name", ORIGINAL_CONFIGS)
def test_original_config_trains_and_evaluates(name, tmp_path):
  workdir = str(tmp_path / name)
  with _mock(name):
    out = train_continual.train_and_evaluate(_tiny(name), workdir)
  matrix = np.asarray(out["accuracy_matrix"])
  with open(os.path.join(workdir, "results.json")) as f:
    doc = json.load(f)
  assert doc["config"]["model_name"] == "ViT-test"
  assert np.isfinite(doc["avg_acc"])
  tags = e2e_util.scalar_tags(workdir)
  assert len(tags["loss"]) == 4 and all(np.isfinite(v) for _, v in tags["loss"])
  if name == "cifar100_gaussian_l2p":
    assert matrix.shape[0] == 1 and not np.isnan(matrix[0, -1])  # full test set, last episode
  elif name == "core50_l2p":
    assert matrix.shape[0] == 1 and not np.isnan(matrix[0]).any()  # one shared test set
  else:
    assert matrix[:, :2].shape == (2, 2) and not np.isnan(matrix[:, 1]).any()
    for tag in ("accuracy_0", "accuracy_1", "avg_acc", "forgetting"):
      assert tag in tags, tag
