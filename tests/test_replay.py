"""The rehearsal buffer: what it keeps, what each step replays, the logit masks, the review
session, and runs with it that resume exactly."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import train_continual
from libml import input_pipeline
from libml import replay
from libml import steps
from libml import validation
from libml.errors import UserError
from models import methods
from tests import e2e_util
from tests import run_util
from tests.data_fixtures import pipeline_config

SEED = 0


# --- The buffer's arithmetic. ------------------------------------------------------------------

def test_kept_positions_are_distinct_sorted_and_capped_by_the_stream():
  kept = replay.kept_positions(SEED, 3, stream_size=20, count=6)
  assert kept.dtype == np.int64 and len(kept) == 6 and len(set(kept.tolist())) == 6
  assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < 20
  np.testing.assert_array_equal(kept, replay.kept_positions(SEED, 3, stream_size=20, count=6))
  assert not np.array_equal(kept, replay.kept_positions(SEED, 4, stream_size=20, count=6))
  np.testing.assert_array_equal(replay.kept_positions(SEED, 0, stream_size=5, count=9), np.arange(5))


def _buffer():
  """Task 0 keeps positions 1, 6, 9; task 1 keeps 0, 3, 12 (global batch 4, 2 per host)."""
  buffer = replay.Buffer.empty()
  buffer = buffer.add_task(0, np.array([10, 11, 12]), np.array([20, 21, 22]), np.array([9, 1, 6]))
  return buffer.add_task(1, np.array([13, 14, 15]), np.array([23, 24, 25]), np.array([0, 12, 3]))


def test_buffer_orders_by_task_then_position_and_survives_json():
  buffer = _buffer()
  np.testing.assert_array_equal(buffer.task, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(buffer.positions, [1, 6, 9, 0, 3, 12])
  np.testing.assert_array_equal(buffer.ids, [11, 12, 10, 13, 15, 14])
  np.testing.assert_array_equal(buffer.keys, [21, 22, 20, 23, 25, 24])
  again = replay.Buffer.from_json(buffer.to_json())
  for a, b in zip(again.fields(), buffer.fields()):
    np.testing.assert_array_equal(a, b)
  assert buffer.has_task(1) and not buffer.has_task(2) and len(buffer) == 6


def test_each_host_keeps_the_examples_its_block_of_the_stream_held():
  # Global batch 4 = 2 hosts x 2: slots 0-1 belong to host 0, slots 2-3 to host 1.
  shards = [replay.host_shard(_buffer(), host=h, global_batch=4, local_batch=2) for h in (0, 1)]
  np.testing.assert_array_equal(shards[0].positions, [1, 9, 0, 12])
  np.testing.assert_array_equal(shards[1].positions, [6, 3])


def test_available_counts_earlier_tasks_and_with_include_new_task_the_seen_ones():
  buffer = _buffer()
  count = lambda step, new: replay.available(buffer, 1, step, include_new_task=new, global_batch=4)
  assert count(0, False) == count(5, False) == 3
  assert count(0, True) == 5  # Positions 0 and 3 are in step 0's batch (positions 0-3).
  assert count(2, True) == 5 and count(3, True) == 6  # Position 12 waits for step 3.


def test_draws_replace_only_when_the_buffer_holds_less_than_a_batch():
  without = replay.draw(SEED, 1, 0, 0, available_count=10, size=4)
  assert len(set(without.tolist())) == 4 and without.max() < 10
  with_ = replay.draw(SEED, 1, 0, 0, available_count=3, size=8)
  assert len(with_) == 8 and set(with_.tolist()) <= {0, 1, 2}
  np.testing.assert_array_equal(without, replay.draw(SEED, 1, 0, 0, available_count=10, size=4))
  assert not np.array_equal(without, replay.draw(SEED, 1, 1, 0, available_count=10, size=4))


# --- The input pipeline. ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mock_cifar():
  with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _benchmark(on_device: bool, **overrides):
  """Two tasks of 5 CIFAR classes, 2 devices x 2 images, 2 kept examples per class."""
  config = pipeline_config("cifar100", **{
      "continual.num_tasks": 2, "continual.num_classes_per_task": 5,
      "continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True,
      "preprocess_on_device": on_device, **overrides})
  return input_pipeline.create_benchmark(config, num_local_devices=2, process_index=0,
                                         process_count=1)


def _flat(batch_list, key):
  """[steps, devices, B, ...] of `key` -> [steps * devices * B, ...] in stream order."""
  return np.concatenate([b[key].reshape((-1,) + b[key].shape[2:]) for b in batch_list])


@pytest.mark.parametrize("on_device", [False, True])
def test_replayed_examples_are_the_views_the_stream_showed(mock_cifar, on_device):
  benchmark = _benchmark(on_device, **{"continual.replay.include_new_task": False})
  buffer = replay.Buffer.empty().add_task(0, *benchmark.kept_examples(0))
  assert len(buffer) == 2 * 5
  stream = list(tfds.as_numpy(benchmark.train_dataset(0)))
  shown = {k: _flat(stream, k) for k in stream[0]}
  buffer = buffer.add_task(1, *benchmark.kept_examples(1))
  joined = list(tfds.as_numpy(benchmark.train_dataset(1, 0, buffer)))
  plain = list(tfds.as_numpy(benchmark.train_dataset(1)))
  assert len(joined) == len(plain) == benchmark.num_train_steps(1)
  for step, (batch, new) in enumerate(zip(joined, plain)):
    assert batch["image"].shape[:2] == (2, 4)
    np.testing.assert_array_equal(batch["replayed"], [[False, False, True, True]] * 2)
    for k in new:  # The task's own examples come first, unchanged.
      np.testing.assert_array_equal(batch[k][:, :2], new[k])
    # Drawn from task 0's kept examples only (include_new_task=False), as the stream showed them.
    picks = replay.draw(SEED, 1, step, 0, available_count=10, size=4)
    positions = buffer.positions[picks]
    for k in new:
      np.testing.assert_array_equal(batch[k][:, 2:].reshape((4,) + batch[k].shape[2:]), shown[k][positions])
    assert set(batch["label"][:, 2:].ravel()) <= set(benchmark.class_masks[0].tolist())
  if on_device:
    assert "crop" in shown  # The device path's crop windows are replayed too.


def test_a_resumed_pipeline_replays_the_same_batches(mock_cifar):
  benchmark = _benchmark(True)
  buffer = replay.Buffer.empty().add_task(0, *benchmark.kept_examples(0))
  buffer = buffer.add_task(1, *benchmark.kept_examples(1))
  whole = list(tfds.as_numpy(benchmark.train_dataset(1, 0, buffer)))
  # A fresh benchmark (a resumed run reads the kept records of task 0 from the data).
  resumed = list(tfds.as_numpy(_benchmark(True).train_dataset(1, 3, buffer)))
  assert len(resumed) == len(whole) - 3
  for a, b in zip(resumed, whole[3:]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # With include_new_task (the default) some draws come from task 1's kept examples.
  labels = np.concatenate([b["label"][:, 2:].ravel() for b in whole])
  assert set(labels) & set(benchmark.class_masks[1].tolist())


def test_review_batches_are_replay_alone_from_the_whole_buffer(mock_cifar):
  benchmark = _benchmark(False, **{"continual.review_trick": True, "continual.num_review_epochs": 2})
  # -1 steps: 2 epochs over one task's 10 kept examples at the global batch of 4: 5 steps,
  # rounded down to whole epochs of 2.
  assert benchmark.num_review_steps(1) == 4 and benchmark.review_eval_every(1) == 2
  assert benchmark.num_steps(1) == benchmark.num_train_steps(1) + 4
  buffer = replay.Buffer.empty().add_task(0, *benchmark.kept_examples(0))
  buffer = buffer.add_task(1, *benchmark.kept_examples(1))
  # With the review trick the training batches are not joined.
  assert "replayed" not in next(iter(tfds.as_numpy(benchmark.train_dataset(1, 0, buffer))))
  review = list(tfds.as_numpy(benchmark.review_dataset(1, buffer)))
  assert len(review) == 4
  assert all(b["image"].shape[:2] == (2, 2) and b["replayed"].all() for b in review)
  kept_labels = set(benchmark.class_masks[0].tolist()) | set(benchmark.class_masks[1].tolist())
  assert set(np.concatenate([b["label"].ravel() for b in review])) <= kept_labels
  tail = list(tfds.as_numpy(benchmark.review_dataset(1, buffer, 2)))
  for a, b in zip(tail, review[2:]):
    np.testing.assert_array_equal(a["image"], b["image"])
  last_only = _benchmark(False, **{"continual.review_trick": True, "continual.num_review_steps": 3,
                                   "continual.num_review_epochs": 1, "continual.review_last_only": True})
  assert last_only.num_review_steps(0) == 0 and last_only.num_review_steps(1) == 3


def test_each_host_replays_its_own_kept_examples(mock_cifar):
  """2 hosts x 2 devices: each host's replay block comes from the examples its block of the
  global batches held, as the same global stream on one host showed them."""
  config = pipeline_config("cifar100", **{
      "continual.num_tasks": 2, "continual.num_classes_per_task": 5,
      "continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True,
      "continual.replay.include_new_task": False})
  one_host = input_pipeline.create_benchmark(config, num_local_devices=4, process_index=0, process_count=1)
  shown = _flat(list(tfds.as_numpy(one_host.train_dataset(0))), "image")
  buffer = replay.Buffer.empty().add_task(0, *one_host.kept_examples(0))
  buffer = buffer.add_task(1, *one_host.kept_examples(1))
  for host in range(2):
    benchmark = input_pipeline.create_benchmark(config, num_local_devices=2, process_index=host,
                                                process_count=2)
    # Global batches of 8: host 0 holds slots 0-3 of each, host 1 slots 4-7.
    shard = buffer.select((buffer.positions % 8 >= 4 * host) & (buffer.positions % 8 < 4 * host + 4))
    assert 0 < len(shard) < len(buffer)
    for step, batch in enumerate(tfds.as_numpy(benchmark.train_dataset(1, 0, buffer))):
      picks = replay.draw(SEED, 1, step, host, available_count=int(np.sum(shard.task == 0)), size=4)
      replayed = batch["image"][:, 2:].reshape((4,) + batch["image"].shape[2:])
      np.testing.assert_array_equal(replayed, shown[shard.positions[picks]])


# --- The logit masks. ----------------------------------------------------------------------------

def test_replayed_rows_take_the_replay_mask():
  task = {"class_mask": np.array([True, True, False, False]),
          "replay_mask": np.array([False, False, True, True])}
  batch = {"replayed": np.array([False, True])}
  mask = np.asarray(steps._logit_mask(task, batch))  # pylint: disable=protected-access
  np.testing.assert_array_equal(mask, [[True, True, False, False], [False, False, True, True]])
  assert np.asarray(steps._logit_mask(task, {})).shape == (4,)  # pylint: disable=protected-access


@pytest.mark.parametrize("reverse,review,replayed_keep", [
    (False, False, [1, 1, 1, 1]), (True, False, [1, 1, 0, 0]), (True, True, [1, 1, 1, 1])])
def test_task_arrays_hold_the_original_mask_variants(mock_cifar, reverse, review, replayed_keep):
  benchmark = _benchmark(False, **{"continual.num_classes_per_task": 2, "continual.rand_seed": -1})
  # Head of 100 classes; task 1 trains classes 2 and 3.
  arrays = train_continual._task_arrays(benchmark, 1, {}, reverse_mask=reverse,  # pylint: disable=protected-access
                                        review=review)
  np.testing.assert_array_equal(arrays["replay_mask"][:4], np.array(replayed_keep, bool))
  assert arrays["replay_mask"][4:].all()
  expected_class_mask = np.ones(100, bool) if review else np.isin(np.arange(100), [2, 3])
  np.testing.assert_array_equal(arrays["class_mask"], expected_class_mask)


# --- Settings that cannot run. ---------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"continual.replay.num_samples_per_class": -1}, "num_samples_per_class=-1"),
    ({"continual.replay_no_mask": True}, "replay_no_mask needs a rehearsal buffer"),
    ({"continual.review_trick": True}, "review_trick needs a rehearsal buffer"),
    ({"continual.replay.num_samples_per_class": 2}, "set continual.replay_no_mask=True"),
    ({"continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True,
      "continual.replay_reverse_mask": False, "gaussian_schedule": True}, "Gaussian schedule"),
    ({"continual.replay.num_samples_per_class": 2, "continual.replay_reverse_mask": True,
      "continual.train_mask": False}, "replay_reverse_mask refines replay_no_mask"),
    ({"continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True,
      "continual.replay_reverse_mask": True}, "set continual.replay.include_new_task=False"),
    ({"continual.replay.num_samples_per_class": 2, "continual.review_trick": True,
      "continual.num_review_epochs": 0}, "num_review_epochs=0"),
])
def test_bad_rehearsal_settings_are_refused(overrides, message):
  config = e2e_util.tiny_digits_config(**overrides)
  with pytest.raises(UserError, match=message):
    validation.check_config(config)


def test_a_review_session_without_steps_is_refused_before_anything_is_written(tmp_path):
  config = e2e_util.tiny_digits_config(**{
      "continual.replay.num_samples_per_class": 1, "continual.review_trick": True})
  with pytest.raises(UserError, match="review session of task 0 has no step"):
    train_continual.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# --- Runs. -----------------------------------------------------------------------------------

def _final_state(workdir: str):
  checkpoints = run_util.read_checkpoints(workdir)
  return checkpoints[max(checkpoints)]


# ER: a ResNet (its BatchNorm statistics checkpointed too) fine-tuned with 2 kept examples per
# class, replayed examples of the current task's classes masked, and every extra augmentation
# (RandAugment, colour jitter, random erasing, mixup and cutmix); the review session: L2P with 4
# review steps (2 review epochs, an evaluation after each) after each task.
RUNS = {
    "er_resnet_augment": {
        "method": "none", "model_name": "resnet-test", "freeze_part": (),
        "continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True,
        "continual.replay_reverse_mask": True, "continual.replay.include_new_task": False,
        "augment.num_layers": 2, "augment.color_jitter_strength": 0.5, "augment.erase_prob": 0.5,
        "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0},
    "review": {"continual.replay.num_samples_per_class": 2, "continual.review_trick": True,
               "continual.num_review_steps": 4, "continual.num_review_epochs": 2},
}
# Where the killed run dies, right after a checkpoint: task 1 mid-training (joined batches), or
# mid-review (step 6 of 8).
KILL_AT = {"er_resnet_augment": (1, 2), "review": (1, 6)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_rehearsal_runs_resume_exactly_after_a_kill(tmp_path, name):
  config = e2e_util.tiny_digits_config(**RUNS[name])
  whole = run_util.train_in_process(config, str(tmp_path / "whole"))
  progress, state = _final_state(str(tmp_path / "whole"))

  # Every kept example of both tasks is in the final checkpoint, as the benchmark keeps them.
  benchmark = input_pipeline.create_benchmark(config)
  expected = replay.Buffer.empty()
  for task in range(2):
    expected = expected.add_task(task, *benchmark.kept_examples(task))
  assert progress["replay"] == expected.to_json() and len(expected) == 2 * 2 * 2
  tags = e2e_util.scalar_tags(str(tmp_path / "whole"))
  # A mean loss every 2 steps (log_loss_every_steps), over the review sessions too.
  assert len(tags["loss"]) == sum(benchmark.num_steps(t) for t in range(2)) // 2
  if name == "er_resnet_augment":
    assert jax.tree.leaves(state["batch_stats"])
  if name == "review":  # Evaluated mid-review (review step 2 of 4) besides the task ends.
    assert benchmark.num_steps(1) == 8
    assert len(tags["accuracy_0"]) == 2 + 2

  killed = run_util.killed_copy(str(tmp_path / "whole"), str(tmp_path / "killed"), *KILL_AT[name])
  resumed = train_continual.train_and_evaluate(config, killed)
  np.testing.assert_array_equal(resumed["accuracy_matrix"], whole["accuracy_matrix"])
  run_util.assert_same_last_checkpoint(killed, str(tmp_path / "whole"))


@pytest.mark.parametrize("overrides,group", [
    ({}, 4),
    ({"continual.replay.num_samples_per_class": 2, "continual.replay_no_mask": True}, 8),
    ({"continual.replay.num_samples_per_class": 2, "continual.review_trick": True}, 4)])
def test_the_prompt_vote_covers_a_devices_whole_batch_replayed_images_included(overrides, group):
  # As the original under pmap: one vote per device batch, which replay doubles (4 -> 8 images).
  method = methods.from_config(e2e_util.tiny_digits_config(**overrides))
  assert method.vote_group_size == group
