"""Kill -9 anywhere, resume exactly: SIGKILLed runs of main.py against an uninterrupted run."""

import asyncio
import glob
import json
import logging
import os

import numpy as np
import pytest

import train_continual
from libml import checkpointing
from libml import validation
from tests import e2e_util
from tests import run_util
from tests.test_checkpointing import CORRUPTIONS
from tests.test_checkpointing import corrupt

# Written by ReportProgress from wall-clock time; every other scalar must match exactly.
_TIMING_TAGS = ("steps_per_sec", "uptime")


def _temporary_dirs(workdir: str) -> list[str]:
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


def test_half_written_checkpoints_are_never_restored_and_get_cleaned_up(tmp_path, monkeypatch):
  # Orbax's own clean-up deletes in the background; a slow filesystem must not leave the
  # half-written directory there once the checkpointer is open.
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  original_rmtree = async_path.rmtree

  async def slow_rmtree(*args, **kwargs):
    await asyncio.sleep(1)
    return await original_rmtree(*args, **kwargs)
  monkeypatch.setattr(async_path, "rmtree", slow_rmtree)
  state = {"w": np.arange(4, dtype=np.float32)}
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=False)
  checkpointer.save(state, {"task": 0, "task_step": 1})
  checkpointer.save({"w": state["w"] + 1}, {"task": 0, "task_step": 2})
  checkpointer.close()
  # What a run killed while writing checkpoint 2 leaves: a temporary directory, half full.
  torn = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
  (torn / "state").mkdir(parents=True)
  (torn / "state" / "manifest.ocdbt").write_bytes(b"\x00\x01truncated")
  reopened = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=False)
  restored, progress = reopened.latest(state)
  np.testing.assert_array_equal(restored["w"], [1, 2, 3, 4])
  assert progress["task_step"] == 2
  assert not _temporary_dirs(str(tmp_path))
  reopened.save(restored, {"task": 0, "task_step": 3})  # Index 2 is free to take.
  assert reopened.latest(state)[1]["task_step"] == 3
  reopened.close()


def _assert_same_curves(got_dir: str, want_dir: str) -> None:
  """Every scalar point of `got_dir` equals the uninterrupted run's, and none is missing."""
  got, want = e2e_util.scalar_tags(got_dir), e2e_util.scalar_tags(want_dir)
  assert set(got) == set(want)
  for tag, points in want.items():
    if tag in _TIMING_TAGS:
      continue
    expected = dict(points)
    assert len(expected) == len(points), tag
    assert {step for step, _ in got[tag]} == set(expected), tag
    for step, value in got[tag]:
      assert value == expected[step], (tag, step, value, expected[step])


@pytest.mark.slow
def test_runs_killed_in_training_evaluation_and_checkpointing_resume_exactly(tmp_path):
  # Tasks of 4 steps; checkpoints every 2 global steps and after each task's evaluation; loss
  # means logged every 3 steps of a task and at each checkpoint.
  flags = run_util.tiny_flags(log_loss_every_steps=3)
  config = e2e_util.tiny_digits_config(log_loss_every_steps=3)
  reference_dir = str(tmp_path / "reference")
  reference = run_util.train_in_process(config, reference_dir)

  workdir, marker = str(tmp_path / "killed"), str(tmp_path / "paused")
  cmd, environment = run_util.command(workdir, flags), run_util.env(2)
  run_util.run_and_kill(cmd, environment, "step", 3, marker)
  assert run_util.latest_progress(workdir) == (0, 2)
  run_util.run_and_kill(cmd, environment, "eval", 1, marker)  # Resumed at step 2, evaluating task 0.
  assert run_util.latest_progress(workdir) == (0, 4)
  run_util.run_and_kill(cmd, environment, "commit", 2, marker)  # Writing the checkpoint of step 6.
  assert run_util.latest_progress(workdir) == (1, 0)
  assert len(_temporary_dirs(workdir)) == 1
  # The second and third starts resumed through main.py; this one finishes in this process.
  train_continual.train_and_evaluate(config, workdir)

  with open(os.path.join(workdir, validation.CONFIG_FILE)) as f:  # Same config as the reference.
    assert validation.config_differences(json.load(f), validation.config_json(config)) == []
  np.testing.assert_array_equal(run_util.results_matrix(workdir), reference["accuracy_matrix"])
  assert not _temporary_dirs(workdir)
  run_util.assert_same_last_checkpoint(workdir, reference_dir)
  _assert_same_curves(workdir, reference_dir)


def _copy_of_reference(tmp_path, task: int, task_step: int) -> tuple[str, dict]:
  """(workdir, results): the uninterrupted tiny run as a run killed after its checkpoint of
  (task, task_step) leaves it."""
  reference = run_util.train_in_process(e2e_util.tiny_digits_config(), str(tmp_path / "reference"))
  return run_util.killed_copy(str(tmp_path / "reference"), str(tmp_path / "run"), task, task_step), reference


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_an_unreadable_newest_checkpoint_resumes_from_the_one_before_it(tmp_path, caplog, how):
  # Checkpoints of the tiny run: 0 (task 0, step 2), 1 (0, 4), 2 (1, 0), 3 (1, 2), 4 (1, 4), 5 (2, 0).
  workdir, reference = _copy_of_reference(tmp_path, 1, 2)  # Checkpoint 3.
  corrupt(os.path.join(workdir, "checkpoints", "3"), how)
  caplog.set_level(logging.WARNING)
  results = train_continual.train_and_evaluate(e2e_util.tiny_digits_config(), workdir)
  np.testing.assert_array_equal(results["accuracy_matrix"], reference["accuracy_matrix"])
  np.testing.assert_array_equal(run_util.results_matrix(workdir), reference["accuracy_matrix"])
  about_it = [r.getMessage() for r in caplog.records if os.path.join("checkpoints", "3") in r.getMessage()]
  assert len(about_it) == 1 and "\n" not in about_it[0], about_it
  assert about_it[0].startswith("Skipped unreadable checkpoint") and "checkpoint 2 (task 1, step 0)" in about_it[0]
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3.corrupt"))  # Set aside, not deleted.
  assert [p["task_step"] for p, _ in run_util.read_checkpoints(workdir).values()] == [2, 4, 0, 2, 4, 0]


def test_a_single_unreadable_checkpoint_is_one_line_with_exit_status_2_and_nothing_deleted(tmp_path):
  workdir, _ = _copy_of_reference(tmp_path, 0, 2)  # Checkpoint 0.
  checkpoint = os.path.join(workdir, "checkpoints", "0")
  corrupt(checkpoint, "truncated_array_file")
  before = e2e_util.snapshot(workdir)
  done = run_util.run(run_util.command(workdir, run_util.tiny_flags()), run_util.env(2), timeout=240)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert errors == [done.stderr.strip().splitlines()[-1]]
  assert errors[0].startswith(f"error: Cannot restore checkpoint {checkpoint} (") and "--restart" in errors[0]
  after = e2e_util.snapshot(workdir)
  assert {path: after.get(path) for path in before} == before  # New event files at most.
