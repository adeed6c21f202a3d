"""RunCheckpointer on damaged checkpoints: fall back, move aside, never delete the last good one."""

import glob
import logging
import os

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from libml import checkpointing
from libml import train_state
from libml.errors import UserError
from tests import e2e_util

CORRUPTIONS = ("truncated_array_file", "deleted_metadata", "truncated_progress")


def corrupt(checkpoint_dir: str, how: str) -> None:
  """Damages one committed checkpoint directory `how` (one of CORRUPTIONS)."""
  if how == "truncated_array_file":  # The largest array data file of the state's OCDBT store.
    path = max(glob.glob(os.path.join(checkpoint_dir, "state", "ocdbt.process_*", "d", "*")), key=os.path.getsize)
  elif how == "deleted_metadata":
    os.remove(os.path.join(checkpoint_dir, "state", "_METADATA"))
    return
  elif how == "truncated_progress":
    path = os.path.join(checkpoint_dir, "progress", "metadata")
  else:
    raise ValueError(how)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _state(offset: float) -> train_state.TrainState:
  """A small host-side TrainState (dataclass, optimizer state), as the runner checkpoints."""
  # Random values: arrays stored in files of their own, larger than the OCDBT tree's nodes.
  w = np.random.default_rng(0).normal(size=4096).astype(np.float32)
  params = {"w": jnp.asarray(w) + offset, "b": {"c": jnp.ones((3, 5)) * offset}}
  return train_state.host_copy(train_state.create(params, optax.adam(1e-3)))


def _progress(step: int) -> dict:
  return {"task": 0, "task_step": step, "accuracy_matrix": [[None]]}


def _entries(tmp_path) -> list[str]:
  return sorted(os.listdir(tmp_path / "checkpoints"))


def _skip_warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checkpoint" in r.getMessage()]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("keep_last_only", [False, True])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_and_is_moved_aside(
    tmp_path, caplog, how, keep_last_only):
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=keep_last_only)
  for step in range(3):
    checkpointer.save(_state(step), _progress(step))
  checkpointer.close()
  corrupt(str(tmp_path / "checkpoints" / "2"), how)

  caplog.set_level(logging.INFO)
  reopened = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=keep_last_only)
  state, progress = reopened.latest(_state(0))
  assert progress == _progress(1)
  np.testing.assert_array_equal(state.params["w"], _state(1).params["w"])
  warnings = _skip_warnings(caplog)
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert str(tmp_path / "checkpoints" / "2") in warnings[0] and "checkpoint 1 " in warnings[0]
  assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()  # Kept, not deleted.
  # The next save takes index 2 again and is what the next start restores.
  reopened.save(_state(7), _progress(7))
  reopened.close()
  assert _entries(tmp_path) == ["1", "2", "2.corrupt"] if keep_last_only else ["0", "1", "2", "2.corrupt"]
  again = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=keep_last_only)
  assert again.latest(_state(0))[1] == _progress(7)
  again.close()


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_when_no_checkpoint_restores_a_user_error_names_it_and_nothing_changes(tmp_path, how):
  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=True)
  checkpointer.save(_state(0), _progress(0))
  checkpointer.close()
  corrupt(str(tmp_path / "checkpoints" / "0"), how)
  before = e2e_util.snapshot(str(tmp_path))
  reopened = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=True)
  with pytest.raises(UserError) as error:
    reopened.latest(_state(0))
  reopened.close()
  message = str(error.value)
  assert "\n" not in message
  assert f"checkpoint {tmp_path / 'checkpoints' / '0'} " in message and "--restart" in message
  assert e2e_util.snapshot(str(tmp_path)) == before


def test_keep_last_only_deletes_old_checkpoints_only_after_reading_the_new_one_back(tmp_path, monkeypatch):
  at_commit = []  # Committed checkpoints when each new one is renamed into place.
  atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
  original_finalize = atomic.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name.isdigit():
      at_commit.append((int(self.get_final().name), _entries(tmp_path)))
    return await original_finalize(self, *args, **kwargs)
  monkeypatch.setattr(atomic, "finalize", finalize)

  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=True)
  for step in range(5):
    checkpointer.save(_state(step), _progress(step))
    # The newest, read back, and the one before it.
    assert _entries(tmp_path) == [str(s) for s in range(max(0, step - 1), step + 1)]
  checkpointer.close()
  for step, entries in at_commit:
    assert [e for e in entries if e.isdigit()] == [str(s) for s in range(max(0, step - 2), step)]


def test_keep_last_only_keeps_the_older_checkpoints_when_the_new_one_cannot_be_read_back(tmp_path, monkeypatch,
                                                                                          caplog):
  atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
  original_finalize = atomic.finalize

  damaged = []

  async def finalize(self, *args, **kwargs):  # The first checkpoint 2 lands on disk damaged.
    result = await original_finalize(self, *args, **kwargs)
    if self.get_final().name == "2" and not damaged:
      damaged.append(True)
      corrupt(str(self.get_final()), "truncated_array_file")
    return result
  monkeypatch.setattr(atomic, "finalize", finalize)

  checkpointer = checkpointing.RunCheckpointer(str(tmp_path), keep_last_only=True)
  for step in range(3):
    checkpointer.save(_state(step), _progress(step))
  assert _entries(tmp_path) == ["0", "1", "2.corrupt"]
  assert len(_skip_warnings(caplog)) == 1
  checkpointer.save(_state(3), _progress(3))
  assert _entries(tmp_path) == ["1", "2", "2.corrupt"]
  assert checkpointer.latest(_state(0))[1] == _progress(3)
  checkpointer.close()
