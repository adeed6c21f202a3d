"""Ctrl-C and preemption: SIGINT / SIGTERM finish the step, checkpoint, say so in one line, exit 128 + n."""

import numpy as np
import pytest

import train_continual
from tests import e2e_util
from tests import run_util

_LINE = "stopped at task {}, step {}; checkpoint written; rerun the same command to resume"


def _command(workdir: str) -> list[str]:
  return run_util.command(workdir, run_util.tiny_flags())


def _signalled(workdir: str, spec: str):
  """Runs (or resumes) the tiny digits run, signalling itself after a global step; returns the process."""
  return run_util.run(_command(workdir), run_util.env(2, **{run_util.SIGNAL_ENV: spec}))


@pytest.mark.slow
def test_sigint_and_sigterm_checkpoint_the_step_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path):
  # Tasks of 4 steps, checkpoints every 2: global step 3 is task 0's step 3, not a checkpoint step.
  reference = run_util.train_in_process(e2e_util.tiny_digits_config(), str(tmp_path / "reference"))
  workdir = str(tmp_path / "run")
  stopped = _signalled(workdir, "INT:3")
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  assert stopped.stderr.strip().splitlines()[-1] == _LINE.format(0, 3)
  assert "Traceback" not in stopped.stderr
  assert run_util.latest_progress(workdir) == (0, 3)
  # Preempted in the resumed run: global step 5 is task 1's step 1.
  stopped = _signalled(workdir, "TERM:5")
  assert stopped.returncode == 143, stopped.stderr[-3000:]
  assert stopped.stderr.strip().splitlines()[-1] == _LINE.format(1, 1)
  assert run_util.latest_progress(workdir) == (1, 1)
  # Both stops were resumed through main.py; the last start finishes in this process.
  train_continual.train_and_evaluate(e2e_util.tiny_digits_config(), workdir)
  np.testing.assert_array_equal(run_util.results_matrix(workdir), reference["accuracy_matrix"])
  run_util.assert_same_last_checkpoint(workdir, str(tmp_path / "reference"))


@pytest.mark.slow
def test_a_second_sigint_stops_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  stopped = _signalled(workdir, "INT,INT:3")
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith("error: SIGINT again: stopped at once") and "Traceback" not in stopped.stderr
  assert run_util.latest_progress(workdir) == (0, 2)  # the checkpoint before; step 3 was not saved
