"""Runs main.py in subprocesses for the reliability and multi-host tests.

Run as a module (`python -m tests.run_util <main.py flags>`), it is main.py with one test
hook: `L2P_TEST_PAUSE=<moment>:<n>` makes the process write the file named by
`L2P_TEST_MARKER` and sleep at the n-th such moment of its life, so that a test can kill
it there. Moments:
  step:   right after global train step n (before its summaries and checkpoint);
  eval:   in the n-th evaluation of an eval set, after its first batch;
  commit: in the n-th checkpoint write, when all its files are in the temporary directory
          but it is not yet renamed into place.
`L2P_TEST_SIGNAL=<NAME>[,<NAME>...]:<n>` makes the process send itself those signals (e.g.
INT, TERM) right after global train step n, as Ctrl-C or a preemption would.
The hooks patch the libraries from outside; the production code has no test switches.
"""

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
import numpy as np

from tests import forked

# The libraries below are imported where used: run as a module, this file must reach main.py's
# flag parsing fast, as main.py does.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_ENV = "L2P_TEST_PAUSE"
MARKER_ENV = "L2P_TEST_MARKER"
SIGNAL_ENV = "L2P_TEST_SIGNAL"
# The tests' config: configs/digits_l2p.py shrunk to the tiny test ViT (its `get_config("tiny")`).
TINY_CONFIG = "configs/digits_l2p.py:tiny"


def tiny_flags(**overrides) -> dict:
  """main.py overrides of TINY_CONFIG that give tests.e2e_util.tiny_digits_config(**overrides)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from tests import e2e_util  # pylint: disable=g-import-not-at-top
  flat = lambda config: traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  base, tiny = flat(e2e_util.tiny_digits_config()), flat(e2e_util.tiny_digits_config(**overrides))
  assert base.keys() == tiny.keys()
  return {k: v for k, v in tiny.items() if v != base[k]}


# A directory every test process of the session sees (set by tests/conftest.py), where
# `train_in_process` keeps its runs; None: a fresh temporary directory of this process.
SHARED_RUNS_DIR = None


def train_in_process(config, workdir: str) -> dict:
  """`train_continual.train_and_evaluate(config, workdir)`, once per config in the session.

  Several tests compare against the same uninterrupted run: the first call trains it (in
  SHARED_RUNS_DIR, under a file lock, so that parallel test processes wait for it rather than
  train it again), and every call copies it to `workdir`.
  """
  global SHARED_RUNS_DIR
  import jax  # pylint: disable=g-import-not-at-top
  import train_continual  # pylint: disable=g-import-not-at-top
  if SHARED_RUNS_DIR is None:
    SHARED_RUNS_DIR = tempfile.mkdtemp(prefix="l2p_test_runs_")
  text = f"{jax.device_count()} {config.to_json_best_effort(sort_keys=True)}"
  run_dir = os.path.join(SHARED_RUNS_DIR, hashlib.sha256(text.encode()).hexdigest()[:16])
  os.makedirs(SHARED_RUNS_DIR, exist_ok=True)
  with open(run_dir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not os.path.exists(run_dir + ".pkl"):
      shutil.rmtree(run_dir, ignore_errors=True)  # What a failed attempt left.
      results = train_continual.train_and_evaluate(config, run_dir)
      with open(run_dir + ".pkl", "wb") as f:
        pickle.dump(results, f)
  shutil.copytree(run_dir, workdir)
  with open(run_dir + ".pkl", "rb") as f:
    return pickle.load(f)


def env(num_devices: int, **extra: str) -> dict:
  """The environment of a CPU subprocess with `num_devices` devices."""
  out = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  out.update(extra)
  return out


def command(workdir: str, overrides: dict, *flags: str, config: str = TINY_CONFIG) -> list[str]:
  """`python -m tests.run_util` with main.py's flags for `config` (a path, `:arg` allowed) plus `overrides`."""
  cmd = [sys.executable, "-m", "tests.run_util", "--my_config", os.path.join(ROOT, config),
         f"--workdir={workdir}"]
  cmd += [f"--my_config.{k}={v}" for k, v in overrides.items()]
  return cmd + list(flags)


def run(cmd: list[str], environment: dict, timeout: float = 300) -> subprocess.CompletedProcess:
  """subprocess.run of `cmd` in ROOT, output captured; main.py's libraries come imported (tests.forked)."""
  return forked.run(cmd, environment, ROOT, timeout)


def start(cmd: list[str], environment: dict, log: str) -> forked.Started:
  """Starts `cmd` in ROOT, stdout and stderr to `log`; main.py's libraries come imported (tests.forked)."""
  return forked.start(cmd, environment, ROOT, log=log)


def run_and_kill(cmd: list[str], environment: dict, moment: str, n: int, marker: str,
                 timeout: float = 300) -> None:
  """Starts `cmd`, waits until it pauses at the n-th `moment`, and SIGKILLs it."""
  environment = dict(environment, **{PAUSE_ENV: f"{moment}:{n}", MARKER_ENV: marker})
  proc = start(cmd, environment, marker + ".log")
  deadline = time.time() + timeout
  try:
    while not os.path.exists(marker):
      if proc.poll() is not None:
        raise AssertionError(f"exited with {proc.poll()} before pausing at {moment}:{n}:\n{proc.output()[1][-3000:]}")
      if time.time() > deadline:
        raise AssertionError(f"never paused at {moment}:{n}")
      time.sleep(0.1)
  finally:
    proc.kill()
    proc.wait()
  os.remove(marker)


def results_matrix(workdir: str):
  with open(os.path.join(workdir, "results.json")) as f:
    return np.array(json.load(f)["accuracy_matrix"], dtype=float)


def read_checkpoints(workdir: str, *, state: bool = True) -> dict[int, tuple[dict, dict | None]]:
  """Committed checkpoints of a run: index -> (progress, state as nested numpy dicts; None
  without `state`)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "progress"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  items = {"progress": ocp.args.JsonRestore(), **({"state": ocp.args.StandardRestore()} if state else {})}
  out = {}
  for step in manager.all_steps():
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    out[step] = (restored.progress, restored.state if state else None)
  manager.close()
  return out


def latest_progress(workdir: str) -> tuple[int, int]:
  """(task, task_step) of the run's newest checkpoint."""
  progress = read_checkpoints(workdir, state=False)
  progress = progress[max(progress)][0]
  return progress["task"], progress["task_step"]


def assert_same_last_checkpoint(workdir: str, reference_dir: str) -> None:
  """The newest checkpoint of `workdir` equals `reference_dir`'s: its progress and every state leaf."""
  import jax  # pylint: disable=g-import-not-at-top
  got, want = read_checkpoints(workdir), read_checkpoints(reference_dir)
  (got_progress, got_state), (want_progress, want_state) = got[max(got)], want[max(want)]
  assert got_progress == want_progress
  got_leaves, want_leaves = (dict(jax.tree_util.tree_leaves_with_path(s)) for s in (got_state, want_state))
  assert got_leaves.keys() == want_leaves.keys()
  for path, leaf in want_leaves.items():
    np.testing.assert_array_equal(got_leaves[path], leaf, err_msg=jax.tree_util.keystr(path))


def killed_copy(finished: str, workdir: str, task: int, task_step: int) -> str:
  """Copies the finished run `finished` to `workdir` as a run killed right after its checkpoint
  of (task, task_step) leaves it: the later checkpoints and results.json gone. Returns `workdir`."""
  shutil.copytree(finished, workdir)
  checkpoints = {index: (progress["task"], progress["task_step"])
                 for index, (progress, _) in read_checkpoints(workdir, state=False).items()}
  assert (task, task_step) in checkpoints.values(), checkpoints
  cut = min(index for index, at in checkpoints.items() if at == (task, task_step))
  for index in checkpoints:
    if index > cut:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(index)))
  os.remove(os.path.join(workdir, "results.json"))
  assert max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == cut
  return workdir


def _install_pause(spec: str, marker: str) -> None:
  """Patches the library call of `spec` ('<moment>:<n>') to pause at the n-th occurrence."""
  moment, n = spec.split(":")
  n, seen = int(n), [0]

  def maybe_pause():
    seen[0] += 1
    if seen[0] == n:
      with open(marker + ".tmp", "w") as f:
        f.write(spec)
      os.replace(marker + ".tmp", marker)
      time.sleep(3600)

  if moment == "step":
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    original_call = periodic_actions.ReportProgress.__call__

    def call(self, step, *args, **kwargs):
      if step == n:
        seen[0] = n - 1
        maybe_pause()
      return original_call(self, step, *args, **kwargs)
    periodic_actions.ReportProgress.__call__ = call
  elif moment == "eval":
    from libml import evaluation  # pylint: disable=g-import-not-at-top
    original_batches = evaluation.Evaluator._batches

    def batches(self, eval_set):
      for i, batch in enumerate(original_batches(self, eval_set)):
        if i == 1:
          maybe_pause()
        yield batch
    evaluation.Evaluator._batches = batches
  elif moment == "commit":
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
    original_finalize = atomic.finalize

    async def finalize(self, *args, **kwargs):
      if self.get_final().name.isdigit():  # A whole checkpoint, not one of its items.
        maybe_pause()
      return await original_finalize(self, *args, **kwargs)
    atomic.finalize = finalize
  else:
    raise ValueError(f"unknown moment {moment!r}")


def _install_signals(spec: str) -> None:
  """Patches the progress report of step n ('<NAME>[,<NAME>...]:<n>') to signal this process."""
  names, n = spec.split(":")
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  original_call = periodic_actions.ReportProgress.__call__

  def call(self, step, *args, **kwargs):
    if step == int(n):
      for name in names.split(","):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return original_call(self, step, *args, **kwargs)
  periodic_actions.ReportProgress.__call__ = call


if __name__ == "__main__":
  if os.environ.get(PAUSE_ENV):
    _install_pause(os.environ[PAUSE_ENV], os.environ[MARKER_ENV])
  if os.environ.get(SIGNAL_ENV):
    _install_signals(os.environ[SIGNAL_ENV])
  import main  # pylint: disable=g-import-not-at-top
  app.run(main.main, flags_parser=main._parse_flags)  # pylint: disable=protected-access
