"""Stopping on SIGINT (Ctrl-C) and SIGTERM (how TPU VMs and SLURM preempt) without losing work.

The first signal asks the run to stop: the train loop finishes the step under way, writes a
checkpoint and raises `Stopped`; the command line then prints one line and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell's convention, so a retry
loop retries. A second signal stops at once (the last checkpoint stays; writes are atomic).
"""

import os
import signal
import sys

from absl import logging

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
  """Raised by the train loop once a requested stop has been checkpointed."""

  def __init__(self, signum: int, task: int, step: int):
    self.signum, self.task, self.step = signum, task, step
    super().__init__(f"stopped at task {task}, step {step}; checkpoint written; rerun the same "
                     "command to resume")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class StopRequest:
  """Records the first SIGINT/SIGTERM once `install`ed; `signum` is None until one arrives."""

  def __init__(self):
    self.signum = None

  def install(self) -> "StopRequest":
    """Handles SIGINT and SIGTERM in this (main) thread from now on."""
    for sig in SIGNALS:
      signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      print(f"error: {name} again: stopped at once; the last checkpoint stays, rerun the same "
            "command to resume", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum
    logging.warning("%s: finishing the current step and writing a checkpoint (send it again to "
                    "stop at once).", name)
