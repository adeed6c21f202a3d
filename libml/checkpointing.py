"""Run checkpoints with orbax: the train state plus the run's progress.

Progress is a small JSON document: {'task': t, 'task_step': s, 'accuracy_matrix': [[...]]}
meaning "task t has taken s steps; columns < t of the matrix are final". A checkpoint
taken when s equals the task's length means training of task t finished but its
evaluation did not.

Writes are atomic: orbax writes each checkpoint to `<n>.orbax-checkpoint-tmp-*` and renames
it to `<n>` once complete, and only renamed checkpoints are ever restored, so a run killed
mid-write resumes from the previous checkpoint. Temporary directories left by such a run
are deleted when the next run opens the directory. On several hosts every process calls
`save` and `latest`; orbax synchronises them, process 0 writes the (replicated, host-side)
state and commits, so the workdir must be on a filesystem all hosts share.
"""

import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Saves and restores (TrainState, progress) pairs under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep_last_only: bool):
    options = ocp.CheckpointManagerOptions(max_to_keep=1 if keep_last_only else None, create=True,
                                           enable_async_checkpointing=False, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                          options=options, item_names=("state", "progress"))

  def latest(self, target_state: Any) -> tuple[Any, dict] | None:
    """The newest (state, progress), with `target_state` giving structure, or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore()))
    logging.info("Restored checkpoint %d: %s", step, {k: restored.progress[k] for k in ("task", "task_step")})
    return restored.state, restored.progress

  def save(self, state: Any, progress: dict) -> None:
    """Saves host-side `state` and `progress` as the next checkpoint (all processes call this)."""
    latest = self._manager.latest_step()
    index = 0 if latest is None else latest + 1
    self._manager.save(index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
