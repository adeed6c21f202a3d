"""Run checkpoints with orbax: the train state plus the run's progress.

Progress is a small JSON document: {'task': t, 'task_step': s, 'accuracy_matrix': [[...]]}
meaning "task t has taken s steps; columns < t of the matrix are final". A checkpoint
taken when s equals the task's length means training of task t finished but its
evaluation did not.

Writes are atomic: orbax writes each checkpoint to `<n>.orbax-checkpoint-tmp-*` and renames
it to `<n>` once complete, and only renamed checkpoints are ever restored, so a run killed
mid-write resumes from the previous checkpoint. Temporary directories left by such a run
are deleted when the next run opens the directory, before it restores anything.

A committed checkpoint can still be unreadable (a truncated array file, a missing `_METADATA`,
a truncated progress JSON). `latest` then falls back to the newest older checkpoint that
restores, logs one warning, and moves each newer unreadable one aside to `<n>.corrupt`
(`<n>.corrupt-2`, ...), never deleting it, so that the next save can take index n again.
When no checkpoint restores it raises UserError naming the newest, and changes nothing.
With `keep_last_only` a save deletes older checkpoints only after reading the new one back,
and keeps the one before it: the directory holds the newest verified checkpoint and its
predecessor, plus the one being written.

On several hosts every process calls `save` and `latest`; orbax synchronises them, process 0
writes the (replicated, host-side) state, commits and moves or deletes directories, so the
workdir must be on a filesystem all hosts share.
"""

import itertools
import logging as py_logging
import os
import shutil
import sys
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from libml.errors import UserError

# Orbax writes checkpoint <n> to `<n>.orbax-checkpoint-tmp-<time>` and renames it when complete.
_TEMPORARY_MARK = ".orbax-checkpoint-tmp"
# Orbax ignores these names: they are neither step numbers nor temporary directories.
CORRUPT_SUFFIX = ".corrupt"
_PROGRESS_KEYS = ("task", "task_step")
_barrier_ids = itertools.count()


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _sync(name: str) -> None:
  """Waits for every process (returns at once with one)."""
  ocp.multihost.sync_global_processes(f"l2p_checkpointing_{name}_{next(_barrier_ids)}")


def _closed_loop(error) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _is_leftover_of_failed_restore(unraisable) -> bool:
  """Whether an unraisable exception is debris of orbax giving up on a damaged checkpoint."""
  if _closed_loop(unraisable.exc_value):
    return True  # A TensorStore read finishing after orbax closed its event loop.
  code = getattr(unraisable.object, "cr_code", None)  # A read coroutine of orbax's collected unawaited.
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _DropUnretrievedReads(py_logging.Filter):
  """Drops asyncio's "... exception was never retrieved" reports of orbax's abandoned reads."""

  def filter(self, record) -> bool:
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and any(mark in message for mark in ("orbax", "TensorStore", "OCDBT")))


def _ignore_leftovers_of_failed_restores() -> None:
  """Keeps stderr free of the noise a failed restore leaves behind.

  When orbax gives up on a damaged checkpoint, the reads of its other arrays are abandoned:
  they finish later and call back into the event loop orbax has closed, or are collected
  with their exceptions unretrieved, and Python and asyncio print a trace for each, at any
  moment, even while the restore is still failing or after the run's one `error:` line. A
  failed restore is handled (skipped, or one `error:` line), so exactly these reports are
  dropped, from the first restore on; every other one still gets through.
  """
  if getattr(sys.unraisablehook, "drops_failed_restores", False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    if not _is_leftover_of_failed_restore(unraisable):
      previous_unraisable(unraisable)

  def except_hook(kind, error, trace):
    if not _closed_loop(error):
      previous_except(kind, error, trace)

  unraisable_hook.drops_failed_restores = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  py_logging.getLogger("asyncio").addFilter(_DropUnretrievedReads())


class RunCheckpointer:
  """Saves and restores (TrainState, progress) pairs under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, *, keep_last_only: bool):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._keep_last_only = keep_last_only
    # Orbax's own clean-up (cleanup_tmp_directories) runs in the background and is awaited only by
    # the next save; this one is finished before anything is listed or restored.
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in sorted(os.listdir(self.directory)):
        if _TEMPORARY_MARK in name:
          logging.info("Deleting %s, a checkpoint write that never finished.", name)
          shutil.rmtree(os.path.join(self.directory, name))
    _sync("cleanup")
    # Old checkpoints are deleted by `save`, after the new one has been read back.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "progress"))

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
    # Before the attempt: the abandoned reads of a failing restore may report while it fails.
    _ignore_leftovers_of_failed_restores()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), progress=ocp.args.JsonRestore()))
    progress = restored.progress
    if not isinstance(progress, dict) or any(k not in progress for k in _PROGRESS_KEYS):
      raise ValueError(f"progress {progress!r} lacks one of {_PROGRESS_KEYS}")
    return restored.state, progress

  def latest(self, target_state: Any) -> tuple[Any, dict] | None:
    """The newest restorable (state, progress), with `target_state` giving structure, or None.

    Newer checkpoints that cannot be restored are moved aside (one warning); if none can be
    restored, raises UserError and leaves every file where it is.
    """
    skipped = []  # (step, reason), newest first.
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, progress = self._restore(step, target_state)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _one_line(e)))
        continue
      if skipped:
        moved = self._set_aside([s for s, _ in skipped])
        logging.warning("Skipped unreadable checkpoint%s %s (%s); resumed from checkpoint %d (task %d, step %d).",
                        "s" if len(skipped) > 1 else "",
                        ", ".join(f"{self.path(s)}, moved to {moved[s]}" for s, _ in skipped),
                        "; ".join(reason for _, reason in skipped), step, progress["task"], progress["task_step"])
      logging.info("Restored checkpoint %d: %s", step, {k: progress[k] for k in ("task", "task_step")})
      return state, progress
    if not skipped:
      return None
    newest, reason = skipped[0]
    others = f", nor can the {len(skipped) - 1} older one(s)" if len(skipped) > 1 else ""
    what = self.path(newest) if len(skipped) == 1 else self.directory
    raise UserError(f"Cannot restore checkpoint {self.path(newest)} ({reason}){others}; no checkpoint was "
                    f"moved or deleted. If it is damaged, move it aside (mv {what} {what}{CORRUPT_SUFFIX}) "
                    "and run again to train this run from its start, or start afresh with --restart.")

  def _set_aside(self, steps: list[int]) -> dict[int, str]:
    """Renames checkpoints `steps` to `<n>.corrupt` (or `.corrupt-2`, ...); returns where each went."""
    moved = {}
    for step in steps:
      target, k = self.path(step) + CORRUPT_SUFFIX, 1
      while os.path.exists(target):
        k += 1
        target = f"{self.path(step)}{CORRUPT_SUFFIX}-{k}"
      moved[step] = target
    _sync("names_chosen")  # Every process names the same targets.
    if jax.process_index() == 0:
      for step, target in moved.items():
        os.rename(self.path(step), target)
    _sync("set_aside")
    self._manager.reload()
    return moved

  def save(self, state: Any, progress: dict) -> None:
    """Saves host-side `state` and `progress` as the next checkpoint (all processes call this).

    With `keep_last_only`, then reads it back and, if that works, deletes the checkpoints before
    its predecessor; if not, moves it aside (one warning) and keeps the older ones.
    """
    latest = self._manager.latest_step()
    index = 0 if latest is None else latest + 1
    self._manager.save(index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
    self._manager.wait_until_finished()
    if not self._keep_last_only:
      return
    older = sorted(s for s in self._manager.all_steps() if s < index)
    if not older:
      return
    try:
      self._restore(index, state)
    except Exception as e:  # pylint: disable=broad-except
      moved = self._set_aside([index])
      logging.warning("Checkpoint %d cannot be read back (%s); moved it to %s and kept checkpoint %d.",
                      index, _one_line(e), moved[index], max(older))
      return
    for step in older[:-1]:
      self._manager.delete(step)

  def close(self) -> None:
    self._manager.close()
