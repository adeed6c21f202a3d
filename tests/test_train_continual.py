"""End-to-end runs of the continual loop on the embedded digits benchmark (2 CPU devices)."""

import json
import os

import jax
import numpy as np
import pytest

import train_continual
from tests import e2e_util
from tests import run_util


def test_end_to_end_writes_metrics_results_and_checkpoints(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  with caplog.at_level("INFO"):
    out = train_continual.train_and_evaluate(e2e_util.tiny_digits_config(), workdir)
  matrix = np.asarray(out["accuracy_matrix"])
  assert matrix.shape == (2, 2)
  assert np.isnan(matrix[1, 0]) and not np.isnan(matrix[:, 1]).any()
  with open(os.path.join(workdir, "results.json")) as f:
    doc = json.load(f)
  assert np.array(doc["accuracy_matrix"], dtype=float).shape == (2, 2)
  assert doc["avg_acc"] == pytest.approx(np.mean(matrix[:, 1]))
  assert doc["forgetting"] == pytest.approx(max(matrix[0, 0], matrix[0, 1]) - matrix[0, 1])
  assert doc["config"]["dataset"] == "digits"
  assert doc["accuracy_unit"] == "percent"
  tags = e2e_util.scalar_tags(workdir)
  for tag in ("accuracy_0", "accuracy_1", "avg_acc", "forgetting", "loss", "loss_std", "task_id",
              "train_accuracy", "learning_rate", "l2_grads", "eval_loss_0", "backward", "learning_acc"):
    assert tag in tags, tag
  # TensorBoard holds the original's fractions in [0, 1]; results.json percent.
  last = lambda tag: tags[tag][-1][1]
  assert last("accuracy_0") == pytest.approx(matrix[0, 1] / 100, abs=1e-6)
  assert last("accuracy_1") == pytest.approx(matrix[1, 1] / 100, abs=1e-6)
  assert last("avg_acc") == pytest.approx(doc["avg_acc"] / 100, abs=1e-6)
  assert last("forgetting") == pytest.approx(doc["forgetting"] / 100, abs=1e-6)
  assert last("learning_acc") == pytest.approx(np.mean(np.diag(matrix)) / 100, abs=1e-6)
  assert {v for _, v in tags["task_id"]} == {0.0, 1.0}
  assert {"histogram_0", "histogram_1"} <= e2e_util.all_tags(workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  # The log: a short hparams line, one matrix and one progress line per task.
  log = [r.getMessage() for r in caplog.records]
  assert [m.split(":")[0] for m in log if m.startswith(("Task 0 trained", "Task 1 trained", "After task"))] == [
      "Task 0 trained", "After task 0 (accuracy, %; test images per eval set", "Task 1 trained",
      "After task 1 (accuracy, %; test images per eval set"]
  assert sum("eval\\task" in m for m in log) == 2
  hparams = [m for m in log if "Hyperparameters" in m]
  assert len(hparams) == 1 and len(hparams[0]) < 300 and hparams[0].endswith("config.json."), hparams


def test_resume_in_the_middle_of_task_two_matches_uninterrupted_run(tmp_path, monkeypatch):
  config = e2e_util.tiny_digits_config()
  reference = run_util.train_in_process(config, str(tmp_path / "reference"))
  # Killed right after the mid-task checkpoint of the second task.
  workdir = run_util.killed_copy(str(tmp_path / "reference"), str(tmp_path / "interrupted"), 1, 2)
  save, saved = train_continual._Runner.save, []  # pylint: disable=protected-access

  def recorded_save(self, rstate, progress):
    saved.append((progress["task"], progress["task_step"]))
    save(self, rstate, progress)
  monkeypatch.setattr(train_continual._Runner, "save", recorded_save)  # pylint: disable=protected-access
  resumed = train_continual.train_and_evaluate(config, workdir)
  np.testing.assert_array_equal(resumed["accuracy_matrix"], reference["accuracy_matrix"])
  # Training went on from the checkpoint: the first task was not trained again.
  assert saved == [(1, 4), (2, 0)]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["avg_acc"] == pytest.approx(reference["avg_acc"])


@pytest.mark.slow
def test_one_and_two_devices_agree_for_the_same_global_batch(tmp_path):
  # Two devices of 4 images, each its own vote group: the reliability and multi-host tests'
  # reference run, shared. One device of 8 images in groups of 4: main.py in a process of its own.
  two = run_util.train_in_process(e2e_util.tiny_digits_config(log_loss_every_steps=3), str(tmp_path / "two"))
  assert jax.device_count() == 2
  workdir = str(tmp_path / "one")
  flags = run_util.tiny_flags(log_loss_every_steps=3, per_device_batch_size=8,
                              **{"prompt_pool_param.vote_group_size": 4})
  done = run_util.run(run_util.command(workdir, flags), run_util.env(1))
  assert done.returncode == 0, done.stderr[-3000:]
  np.testing.assert_allclose(run_util.results_matrix(workdir), two["accuracy_matrix"], atol=1e-6, equal_nan=True)
  # The trained parameters too, up to the order of the sums over the batch.
  got, want = run_util.read_checkpoints(workdir), run_util.read_checkpoints(str(tmp_path / "two"))
  assert sorted(got) == sorted(want)
  got_params, want_params = (dict(jax.tree_util.tree_leaves_with_path(c[max(c)][1]["params"])) for c in (got, want))
  assert got_params.keys() == want_params.keys()
  for path, leaf in want_params.items():
    np.testing.assert_allclose(got_params[path], leaf, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_prompt_mask_beyond_the_pool_falls_back_to_key_matching(tmp_path, monkeypatch, caplog):
  # pool 3, top_k 2: task 0 trains on prompt ids 0..1; task 1's ids 2..3 leave the pool, so
  # task 1 selects by key matching, as the original, with a warning (not a refusal).
  config = e2e_util.tiny_digits_config(**{"prompt_pool_param.use_prompt_mask": True,
                                          "prompt_pool_param.pool_size": 3, "prompt_pool_param.top_k": 2})
  forced = []  # Per train step: the steps of its task that force the task's prompt ids.
  original_init = train_continual._Runner.__init__

  def recording_init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    fn = self.train_step

    def step(rstate, batch, query_params, task, rng):
      forced.append(int(np.asarray(task["method"]["mask_steps"])[0]))
      return fn(rstate, batch, query_params, task, rng)
    self.train_step = step

  monkeypatch.setattr(train_continual._Runner, "__init__", recording_init)
  with caplog.at_level("WARNING"):
    train_continual.train_and_evaluate(config, str(tmp_path / "run"))
  assert forced == [4] * 4 + [0] * 4
  assert any("prompt ids 2..3 are outside pool_size=3" in r.getMessage() for r in caplog.records)


class _FakeBenchmark:
  num_tasks = 3

  def num_steps(self, task):  # Training and review session.
    return 100


def test_progress_line_per_task_measures_speed_without_compilation_and_gives_eta(caplog):
  progress = train_continual._Progress(_FakeBenchmark())  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    # Task 0 compiles until its first fetch of metrics (step 20, at 10 s); 80 steps in 2 s then.
    progress.task_trained(0, 100, 12.5, [(10.0, 20), (11.0, 60), (12.0, 100)])
    progress.task_trained(1, 100, 4.0, [(20.0, 50), (22.0, 100)])  # Counts whole: 25 steps/s.
    progress.task_trained(2, 100, 4.0, [(30.0, 100)])
  assert [r.getMessage() for r in caplog.records] == [
      "Task 0 trained: 100 steps in 12.5 s (40.0 steps/s from step 20 on); 2 of 3 tasks left, "
      "200 steps, training ETA 5.0 s.",
      # 180 steps in 6 s so far: 100 steps left take 3.3 s.
      "Task 1 trained: 100 steps in 4.0 s (25.0 steps/s); 1 of 3 tasks left, 100 steps, training ETA 3.3 s.",
      "Task 2 trained: 100 steps in 4.0 s (25.0 steps/s)."]
