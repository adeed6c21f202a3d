"""The extra augmentations (config.augment) in the input pipeline and the loss: where they
apply, their normalisation, their seeding and the mixed-label loss."""

import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from libml import input_pipeline
from libml import steps
from libml import validation
from libml.errors import UserError
from tests import e2e_util
from tests.data_fixtures import pipeline_config

MEAN, STD = np.array([0.5071, 0.4867, 0.4408], np.float32), np.array([0.2675, 0.2565, 0.2761], np.float32)
EXTRA = {"augment.num_layers": 2, "augment.color_jitter_strength": 0.5, "augment.erase_prob": 0.5,
         "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0}


@pytest.fixture(scope="module", autouse=True)
def mock_cifar():
  with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _benchmark(**overrides):
  config = pipeline_config("cifar100", **{"continual.num_tasks": 2, "continual.num_classes_per_task": 50,
                                          "preprocess_on_device": True, **overrides})
  return input_pipeline.create_benchmark(config, num_local_devices=2, process_index=0, process_count=1)


def _batches(ds):
  return list(tfds.as_numpy(ds))


def test_extra_augmentation_runs_on_the_host_and_normalises_test_images_by_mean_and_std():
  plain, extra = _benchmark(), _benchmark(**EXTRA)
  assert plain.device_preprocess is not None and extra.device_preprocess is None
  host = _benchmark(preprocess_on_device=False)
  for a, b in zip(_batches(host.eval_dataset(0)), _batches(extra.eval_dataset(0))):
    real = a["mask"]  # Padding stays zeros.
    np.testing.assert_allclose(b["image"][real], (a["image"][real] - MEAN) / STD, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a["label"], b["label"])


def test_training_batches_are_augmented_mixed_and_seeded_per_example():
  extra = _benchmark(**EXTRA)
  batches = _batches(extra.train_dataset(0))
  again = _batches(_benchmark(**EXTRA).train_dataset(0, 2))  # A fresh run resumed at step 2.
  assert len(again) == len(batches) - 2
  for a, b in zip(again, batches[2:]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  host = _batches(_benchmark(preprocess_on_device=False).train_dataset(0))
  first = batches[0]
  assert set(first) == {"image", "label", "mix_label", "mix_weight"}
  assert first["mix_weight"].shape == first["label"].shape == (2, 2)
  np.testing.assert_array_equal(first["label"], host[0]["label"])
  per_image = _batches(_benchmark(**{k: v for k, v in EXTRA.items() if "mix" not in k}).train_dataset(0))
  assert set(per_image[0]) == {"image", "label"}
  assert not np.allclose(per_image[0]["image"], (host[0]["image"] - MEAN) / STD, atol=1e-3)
  weights = np.concatenate([b["mix_weight"].ravel() for b in batches])
  assert np.all((weights >= 0) & (weights <= 1)) and np.any(weights < 1)
  # The partner is an example of the same device's batch.
  for b in batches:
    for d in range(2):
      assert set(b["mix_label"][d]) <= set(b["label"][d])


def test_mixed_labels_weigh_the_cross_entropy():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
  batch = {"label": np.array([0, 2]), "mix_label": np.array([1, 2]), "mix_weight": np.array([0.7, 1.0], np.float32)}
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = [-(0.7 * log_p[0, 0] + 0.3 * log_p[0, 1]), -log_p[1, 2]]
  np.testing.assert_allclose(steps._cross_entropy(logits, batch), expected, rtol=1e-6)  # pylint: disable=protected-access
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  np.testing.assert_allclose(steps._cross_entropy(logits, {"label": batch["label"]}), plain)  # pylint: disable=protected-access


def test_bad_augment_settings_are_refused_with_the_field():
  with pytest.raises(UserError, match="erase_prob"):
    validation.check_config(e2e_util.tiny_digits_config(**{"augment.erase_prob": 1.5}))
