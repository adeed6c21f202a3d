"""What the continual loop does between and within tasks, on two tiny 2-task digits runs.

Run A (DualPrompt, shared prompt pool, optimizer kept, evaluations every 2 steps and every
epoch) and run B (L2P, optimizer reset, eval_last_only, task-incremental evaluation) record
the train state going into and coming out of every train step, so that the state at the start
of task 1 can be compared with the state at the end of task 0.
"""

import json
import os

import flax.jax_utils
import jax
import numpy as np
import pytest

from configs import digits_dualprompt
from libml import record_sources
from libml import train_state
import train_continual
from tests import e2e_util

pytestmark = pytest.mark.slow  # two end-to-end runs

STEPS = 6  # per task in run A; run B trains 4


def _train_recording_steps(config, workdir: str) -> list[tuple[train_state.TrainState, train_state.TrainState]]:
  """Runs `config`; returns (state before, state after) of every train step, as host numpy."""
  records = []
  original_init = train_continual._Runner.__init__  # pylint: disable=protected-access

  def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    step_fn = self.train_step

    def recorded(rstate, *rest):
      before = train_state.host_copy(flax.jax_utils.unreplicate(rstate))  # before it is donated
      new_rstate, metrics = step_fn(rstate, *rest)
      records.append((before, train_state.host_copy(flax.jax_utils.unreplicate(new_rstate))))
      return new_rstate, metrics
    self.train_step = recorded

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_continual._Runner, "__init__", init)  # pylint: disable=protected-access
    train_continual.train_and_evaluate(config, workdir)
  return records


def _task_boundary(records, steps_per_task: int):
  """(state after the last step of task 0, state going into the first step of task 1)."""
  end0 = [after for _, after in records if int(after.step) == steps_per_task]
  start1 = [before for before, _ in records if int(before.step) == steps_per_task]
  assert len(end0) == 1 and len(start1) == 1
  assert int(start1[0].task_step) == 0
  return end0[0], start1[0]


def _accuracy_steps(workdir: str, tag: str) -> list[int]:
  return sorted(step for step, _ in e2e_util.scalar_tags(workdir).get(tag, []))


def _matrix(workdir: str) -> np.ndarray:
  with open(os.path.join(workdir, "results.json")) as f:
    return np.array(json.load(f)["accuracy_matrix"], dtype=float)  # null -> nan


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- Run A: DualPrompt, shared prompt pool, reinit_optimizer=False, periodic evaluations. -------
# One test per run: under pytest-xdist a module fixture would train again in every worker.


def _check_shared_prompt_pool(records):
  """Task 1's prompt slot starts as task 0's trained slot."""
  first = records[0][0]
  end0, start1 = _task_boundary(records, STEPS)
  prompt0, prompt1 = end0.params["e_prompt"]["prompt"], start1.params["e_prompt"]["prompt"]
  # Task 0 trained slot 0 only; slot 1 is still its initial value, another one.
  assert not np.allclose(prompt0[0], first.params["e_prompt"]["prompt"][0])
  np.testing.assert_array_equal(prompt0[1], first.params["e_prompt"]["prompt"][1])
  assert not np.allclose(prompt0[0], prompt0[1])
  # Task 1's slot starts as task 0's trained slot; the rest of the pool is untouched.
  np.testing.assert_array_equal(prompt1[1], prompt0[0], err_msg="slot 1 does not start as task 0's slot 0")
  np.testing.assert_array_equal(prompt1[0], prompt0[0])
  np.testing.assert_array_equal(prompt1[2:], prompt0[2:])
  # shared_prompt_key is off: the keys are not copied.
  np.testing.assert_array_equal(start1.params["e_prompt"]["key"], end0.params["e_prompt"]["key"])


def _check_optimizer_carried_over(records):
  end0, start1 = _task_boundary(records, STEPS)
  assert any(np.any(x != 0) for x in _leaves(end0.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg="optimizer state not carried over"),
               start1.opt_state, end0.opt_state)


def _check_periodic_evaluations(workdir):
  # Within each task of 6 steps (3 an epoch): after steps 2 and 4 (eval_every_steps=2) and 3
  # (eval_per_epochs=1), plus once at the task's end; global steps of task 1 are 7..12.
  assert _accuracy_steps(workdir, "accuracy_0") == [2, 3, 4, 6, 8, 9, 10, 12]
  assert _accuracy_steps(workdir, "accuracy_1") == [8, 9, 10, 12]
  matrix = _matrix(workdir)
  assert np.isnan(matrix[1, 0]) and not np.isnan(matrix[0, 0]) and not np.isnan(matrix[:, 1]).any()


def test_dualprompt_run_shares_prompt_slots_keeps_optimizer_and_evaluates_periodically(tmp_path):
  config = digits_dualprompt.get_config()
  assert config.prompt_pool_param.shared_prompt_pool and not config.prompt_pool_param.shared_prompt_key
  assert config.prompt_pool_param.use_prompt_mask and config.prompt_pool_param.top_k == 1
  config.continual.num_tasks = 2
  config.continual.num_train_steps_per_task = STEPS
  # 2 devices x 48 = 96 images a step: the 288 training images of digits 0-1 (and of 2-3) make
  # 3 steps an epoch.
  counts = np.bincount(record_sources.digits_splits()["train"][2])
  assert (counts[0] + counts[1]) // 96 == (counts[2] + counts[3]) // 96 == 3
  config.per_device_batch_size = 48
  config.reinit_optimizer = False
  config.eval_every_steps = 2
  config.eval_per_epochs = 1
  config.log_loss_every_steps = 3
  config.checkpoint_every_steps = 1000
  config.shuffle_buffer_size = 64
  workdir = str(tmp_path / "run")
  records = _train_recording_steps(config, workdir)
  _check_shared_prompt_pool(records)
  _check_optimizer_carried_over(records)
  _check_periodic_evaluations(workdir)


# --- Run B: L2P, reinit_optimizer=True, eval_last_only, task-incremental evaluation. ----------


def _check_optimizer_reset(records):
  end0, start1 = _task_boundary(records, 4)
  assert any(np.any(x != 0) for x in _leaves(end0.opt_state))
  # Adam's count, mu and nu all start again from zero.
  assert all(np.all(x == 0) for x in _leaves(start1.opt_state)), "optimizer state not reset"
  assert len(_leaves(start1.opt_state)) == len(_leaves(end0.opt_state))


def _check_eval_last_only(workdir):
  assert _accuracy_steps(workdir, "accuracy_0") == [8]  # no periodic, no task-0 evaluation
  assert _accuracy_steps(workdir, "accuracy_1") == [8]
  matrix = _matrix(workdir)
  assert np.isnan(matrix[:, 0]).all() and not np.isnan(matrix[:, 1]).any()


def _check_task_incremental_accuracy(workdir, records):
  head = records[-1][1].params["head"]
  assert not np.any(head["kernel"]) and not np.any(head["bias"])
  # All logits are 0, so the prediction is the first class allowed (argmax takes the first
  # maximum): class 0 for eval set 0 (classes 0, 1) either way; for eval set 1 (classes 2, 3)
  # class 2 when evaluating task-incrementally, class 0 (always wrong) otherwise.
  counts = np.bincount(record_sources.digits_splits()["test"][2])
  expected = [100.0 * counts[0] / (counts[0] + counts[1]), 100.0 * counts[2] / (counts[2] + counts[3])]
  np.testing.assert_allclose(_matrix(workdir)[:, 1], expected, rtol=1e-6)


def test_l2p_run_resets_optimizer_evaluates_last_task_only_and_task_incrementally(tmp_path):
  config = e2e_util.tiny_digits_config(**{
      "reinit_optimizer": True, "eval_last_only": True, "eval_every_steps": 2,
      "continual.eval_task_inc": True, "checkpoint_every_steps": 1000,
      # A frozen head keeps its initial zeros: every logit is 0 (see the accuracy check).
      "freeze_part": ("encoder", "embedding", "cls", "head")})
  assert config.continual.num_train_steps_per_task == 4
  workdir = str(tmp_path / "run")
  records = _train_recording_steps(config, workdir)
  _check_optimizer_reset(records)
  _check_eval_last_only(workdir)
  _check_task_incremental_accuracy(workdir, records)
