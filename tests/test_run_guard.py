"""One run per workdir, on the devices it began with, and what a run records about itself."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import train_continual
from libml import validation
from libml.errors import UserError
from tests import e2e_util
from tests import run_util
from tests.test_bad_input import _main_in_process  # pylint: disable=g-importing-member

LOCK = "run.lock"
RUN = "run.json"
# The config of the reliability and multi-host tests' reference run, shared within a process.
_OVERRIDES = {"log_loss_every_steps": 3}
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow", "numpy", "python")


def _config():
  return e2e_util.tiny_digits_config(**_OVERRIDES)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """(workdir, results) of a finished 2-device run of `_config()` (do not modify; copy it)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  return workdir, run_util.train_in_process(_config(), workdir)


def _copy(source: str, workdir: str) -> str:
  shutil.copytree(source, workdir)
  return workdir


def _write_lock(workdir: str, **holder) -> dict:
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-05-01T12:00:00Z", **holder}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK), "w") as f:
    json.dump(holder, f)
  return holder


def _exited_pid() -> int:
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True, check=True)
  return int(done.stdout)


def _expected_commit() -> str | None:
  def git(*args):
    return subprocess.run(["git", *args], cwd=run_util.ROOT, capture_output=True, text=True)
  try:
    head = git("rev-parse", "HEAD")
  except OSError:
    return None
  if head.returncode:
    return None
  dirty = git("status", "--porcelain").stdout.strip()
  return head.stdout.strip() + ("-dirty" if dirty else "")


# --- Another topology. ----------------------------------------------------------------------

def test_resume_on_other_devices_is_refused_in_one_line_naming_both(tmp_path, finished_run):
  # As a run killed after its first checkpoint (task 0, step 2) leaves it.
  workdir = run_util.killed_copy(finished_run[0], str(tmp_path / "run"), 0, 2)
  before = e2e_util.snapshot(workdir)
  # Two devices of 4 images began the run; one device of 4 images would halve the global batch.
  done = run_util.run(run_util.command(workdir, run_util.tiny_flags(**_OVERRIDES)), run_util.env(1), timeout=240)
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert errors == [done.stderr.strip().splitlines()[-1]]
  assert errors[0] == (
      f"error: workdir {workdir!r} holds a run made on 1 process x 2 cpu devices, 4 images per device, "
      "global batch 8; this start has 1 process x 1 cpu device, 4 images per device, global batch 4: "
      "resuming would change its batches and prompt-vote groups, so its results; resume on the devices it "
      "began with, or pass --restart to move that run aside and start over, or choose another --workdir.")
  assert e2e_util.snapshot(workdir) == before
  # On the devices it began with, the same run resumes and ends as the uninterrupted run.
  results = train_continual.train_and_evaluate(_config(), workdir)
  np.testing.assert_array_equal(results["accuracy_matrix"], finished_run[1]["accuracy_matrix"])
  with open(os.path.join(workdir, RUN)) as f:
    starts = json.load(f)["starts"]
  assert len(starts) == 2 and starts[1]["pid"] == os.getpid() and starts[1]["host"] == socket.gethostname()


def _record_run(workdir: str, config=None) -> None:
  config = config or _config()
  validation.claim_workdir(workdir, config, restart=False).release()
  validation.record_run(workdir, config)


def test_each_difference_of_topology_is_refused_and_another_device_kind_warns(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  _record_run(workdir)
  path = os.path.join(workdir, RUN)
  with open(path) as f:
    original = json.load(f)
  topology = original["topology"]
  assert topology == {"process_count": 1, "device_count": 2, "local_device_counts": [2], "platform": "cpu",
                      "device_kind": "cpu", "per_device_batch_size": 4, "global_batch": 8}
  changes = {
      "process_count": ({"process_count": 2, "local_device_counts": [1, 1]},
                        "2 processes x 1 cpu device (2 in all), 4 images per device, global batch 8"),
      "devices_per_process": ({"process_count": 2, "device_count": 3, "local_device_counts": [2, 1],
                               "global_batch": 12},
                              "2 processes with 2+1 cpu devices (3 in all), 4 images per device, global batch 12"),
      "per_device_batch": ({"per_device_batch_size": 2, "global_batch": 4},
                           "1 process x 2 cpu devices, 2 images per device, global batch 4"),
  }
  for name, (change, described) in changes.items():
    with open(path, "w") as f:
      json.dump({**original, "topology": {**topology, **change}}, f)
    with pytest.raises(UserError) as error:
      validation.check_workdir(workdir, _config(), restart=False)
    assert f"holds a run made on {described}; this start has 1 process x 2 cpu devices" in str(error.value), name
    validation.check_workdir(workdir, _config(), restart=True)  # --restart moves it aside.
  # Another kind of device with the same counts and batches continues, with a warning.
  with open(path, "w") as f:
    json.dump({**original, "topology": {**topology, "platform": "tpu", "device_kind": "TPU v4"}}, f)
  validation.check_workdir(workdir, _config(), restart=False)
  with caplog.at_level("WARNING"):
    _record_run(workdir)
  assert any("began on TPU v4 devices and continues on cpu devices" in r.getMessage() for r in caplog.records)


def test_a_run_from_before_run_json_resumes_and_records_its_topology(tmp_path, finished_run, caplog):
  workdir = _copy(finished_run[0], str(tmp_path / "run"))
  os.remove(os.path.join(workdir, RUN))
  validation.check_workdir(workdir, _config(), restart=False)
  with caplog.at_level("WARNING"):
    _record_run(workdir)
  assert any("cannot be checked" in r.getMessage() for r in caplog.records)
  with open(os.path.join(workdir, RUN)) as f:
    assert json.load(f)["topology"]["device_count"] == 2


def test_a_run_from_before_run_json_with_a_checkpoint_past_the_task_is_refused(tmp_path, finished_run):
  # Saved at step 6 of a task that, with this global batch, has 4 steps (so made on other devices).
  # As a run killed after its first checkpoint (task 0, step 2) leaves it.
  workdir = run_util.killed_copy(finished_run[0], str(tmp_path / "run"), 0, 2)
  os.remove(os.path.join(workdir, RUN))
  (progress_file,) = glob.glob(os.path.join(workdir, "checkpoints", "*", "progress", "metadata"))
  with open(progress_file) as f:
    progress = json.load(f)
  with open(progress_file, "w") as f:
    json.dump({**progress, "task_step": 6}, f)
  with pytest.raises(UserError, match=r"is at step 6 of task 0, past its 4 steps with this global batch"):
    train_continual.train_and_evaluate(_config(), workdir)
  assert not os.path.exists(os.path.join(workdir, RUN)) and not os.path.exists(os.path.join(workdir, LOCK))


# --- One run at a time. ---------------------------------------------------------------------

def test_a_second_run_is_refused_in_one_line_naming_the_holder(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  holder = _write_lock(workdir)  # This test's own process: alive.
  before = e2e_util.snapshot(workdir)
  status, err = _main_in_process(capsys, _config(), workdir)
  assert status == 2
  assert err.strip().splitlines() == [
      f"error: workdir {workdir!r} is in use by another run: pid {holder['pid']} on host {holder['host']}, "
      f"since {holder['started']} ({os.path.join(workdir, LOCK)}); wait for it to end or stop it, or choose "
      "another --workdir."]
  assert e2e_util.snapshot(workdir) == before
  # --restart does not move a live run aside.
  with pytest.raises(UserError, match="is in use by another run"):
    train_continual.train_and_evaluate(_config(), workdir, restart=True)
  assert e2e_util.snapshot(workdir) == before and not os.path.exists(workdir + ".old")


def test_a_workdir_of_another_config_is_refused_before_its_lock_matters(tmp_path, finished_run):
  workdir = _copy(finished_run[0], str(tmp_path / "run"))
  _write_lock(workdir)
  with pytest.raises(UserError, match="holds a run of a different config"):
    validation.check_workdir(workdir, e2e_util.tiny_digits_config(learning_rate=0.5), restart=False)


def test_a_stale_lock_is_taken_over_and_released_at_the_end(tmp_path, finished_run):
  workdir = _copy(finished_run[0], str(tmp_path / "run"))
  _write_lock(workdir, pid=_exited_pid())
  results = train_continual.train_and_evaluate(_config(), workdir)  # Resumes the finished run.
  np.testing.assert_array_equal(results["accuracy_matrix"], finished_run[1]["accuracy_matrix"])
  assert not os.path.exists(os.path.join(workdir, LOCK))
  assert not [n for n in os.listdir(workdir) if n.startswith(LOCK)]


def test_the_lock_is_held_while_running_and_released_after_a_failure(tmp_path, finished_run, monkeypatch):
  workdir = _copy(finished_run[0], str(tmp_path / "run"))
  seen = []

  def failing(*args, **kwargs):
    del args, kwargs
    with open(os.path.join(workdir, LOCK)) as f:
      seen.append(json.load(f))
    raise RuntimeError("lost the accelerator")
  monkeypatch.setattr(train_continual, "_train_tasks", failing)
  with pytest.raises(RuntimeError, match="lost the accelerator"):
    train_continual.train_and_evaluate(_config(), workdir)
  assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
  assert not os.path.exists(os.path.join(workdir, LOCK))


_RACER = """
import sys, time
from libml import run_lock
from libml.errors import UserError
try:
  lock = run_lock.acquire(sys.argv[1])
except UserError as e:
  print("refused:", e)
else:
  print("took it")
  time.sleep(3)
  lock.release()
"""


def test_racing_starts_over_a_stale_lock_let_exactly_one_in(tmp_path):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, pid=_exited_pid())
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, workdir], cwd=run_util.ROOT, env=run_util.env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
  outputs = [p.communicate(timeout=60)[0] for p in procs]
  assert sum("took it" in out for out in outputs) == 1, outputs
  assert sum("refused: workdir" in out and "is in use by another run" in out for out in outputs) == 3, outputs
  assert os.listdir(workdir) == []


def test_a_lock_of_another_host_is_taken_only_once_its_heartbeat_stops(tmp_path, monkeypatch):
  from libml import run_lock  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
  monkeypatch.setattr(run_lock, "WATCH_S", 1.0)
  workdir = str(tmp_path / "run")
  path = os.path.join(workdir, LOCK)
  # A live run on another host: its heartbeat rewrites the lock.
  holder = _write_lock(workdir, host="elsewhere", pid=1)
  stop = threading.Event()

  def beat():
    n = 0
    while not stop.wait(0.1):
      n += 1
      with open(path + ".tmp", "w") as f:
        json.dump({**holder, "beat": n}, f)
      os.replace(path + ".tmp", path)
  beating = threading.Thread(target=beat)
  beating.start()
  try:
    with pytest.raises(UserError, match=r"in use by another run: pid 1 on host elsewhere, since .* "
                       r"if that run is gone, delete .*run\.lock"):
      run_lock.acquire(workdir)
  finally:
    stop.set()
    beating.join()
  # The same lock with no heartbeat: a run that is gone.
  started = time.time()
  lock = run_lock.acquire(workdir)
  assert time.time() - started >= 1.0
  with open(path) as f:
    assert json.load(f)["pid"] == os.getpid()
  time.sleep(0.5)  # Its own heartbeat keeps it.
  with open(path) as f:
    assert json.load(f)["beat"] >= 1
  lock.release()
  assert not os.path.exists(path)


# --- What a run records. --------------------------------------------------------------------

def test_results_and_run_json_record_topology_versions_and_commit(finished_run):
  workdir = finished_run[0]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, RUN)) as f:
    run = json.load(f)
  topology = {"process_count": 1, "device_count": 2, "local_device_counts": [2], "platform": "cpu",
              "device_kind": "cpu", "per_device_batch_size": 4, "global_batch": 8}
  assert results["topology"] == run["topology"] == topology
  assert results["starts"] == len(run["starts"]) == 1
  assert set(_LIBRARIES) <= set(results["versions"])
  assert results["versions"]["jax"] == jax.__version__ and results["versions"]["numpy"] == np.__version__
  assert run["starts"][0]["versions"] == results["versions"]
  # The run may come from another test process of the session (run_util.train_in_process).
  assert run["starts"][0]["pid"] > 0 and run["starts"][0]["host"] == socket.gethostname()
  commit = _expected_commit()
  assert results.get("git_commit") == run["starts"][0].get("git_commit") == commit


def test_the_commit_is_absent_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
  from libml import run_record  # pylint: disable=g-import-not-at-top
  assert run_record.git_commit(str(tmp_path)) is None
  monkeypatch.setenv("PATH", str(tmp_path))  # No git on the path.
  assert run_record.git_commit(run_util.ROOT) is None
  assert "git_commit" not in run_record.start_record(_config())
