"""The continual train/eval loop: tasks in order, evaluation after each, resumable.

Everything else (data, model, steps, metrics, checkpoints, summaries) lives in `libml/`
and `models/`; this module only sequences it. Every check that can fail on bad input
(config, workdir, data, pretrained weights) runs before the first write to the workdir.
A non-finite loss or parameter stops the run before it reaches a checkpoint.
"""

import functools
import time

from absl import logging
from clu import periodic_actions
import flax.jax_utils
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from libml import checkpointing
from libml import continual_metrics
from libml import evaluation
from libml import input_pipeline
from libml import interrupts
from libml import optim
from libml import pretrained
from libml import replay
from libml import reporting
from libml import steps
from libml import train_state
from libml import validation
from libml.errors import UserError
from models import factory


def _initial_variables(config, model, query_model, rng):
  """(params, batch_stats, query_params): pretrained or random backbone, a ResNet's BatchNorm
  statistics ({} for a ViT) and the query ViT's parameters, a copy of the backbone's ({}
  without a query ViT)."""
  variables = factory.init_variables(model, rng, config.input_size)
  params = variables["params"]
  if config.init_checkpoint:
    params = pretrained.load_pretrained(config.init_checkpoint, params, config.model_name)
  else:
    logging.warning("No init_checkpoint given: the %s backbone is RANDOMLY initialised, not pretrained.",
                    config.model_name)
  if query_model is None:
    return params, variables.get("batch_stats", {}), {}
  query_keys = factory.param_shapes(query_model, config.input_size).keys()
  return params, variables.get("batch_stats", {}), {k: params[k] for k in query_keys}


def _method_arrays(benchmark, task: int, model) -> dict:
  """The prompt method's arrays for `task` (`PromptMethod.task_arrays`; {} without a method)."""
  if model.method is None:
    return {}
  return model.method.task_arrays(task, steps_per_epoch=benchmark.steps_per_epoch(task),
                                  num_steps=benchmark.num_train_steps(task))


def _task_arrays(benchmark, task: int, method_arrays: dict, *, reverse_mask: bool = False,
                 review: bool = False) -> dict:
  """Per-task arrays of the train step (replicated once per task and phase): the class mask,
  the schedule's lengths and the prompt method's arrays.

  With replay, also the mask of the replayed examples' logits: every class, or with
  `reverse_mask` every class but the task's. The review session (`review`) masks nothing.
  """
  class_mask = np.zeros([benchmark.num_classes], bool)
  class_mask[benchmark.class_masks[task]] = True
  per_epoch, total = benchmark.steps_per_epoch(task), benchmark.num_train_steps(task)
  arrays = {
      "class_mask": class_mask,
      "steps_per_epoch": np.float32(per_epoch),
      "num_epochs": np.float32(total / per_epoch),
      "method": method_arrays,
  }
  if benchmark.rehearsal:
    everything = np.ones_like(class_mask)
    arrays["replay_mask"] = ~class_mask if reverse_mask and not review else everything
    if review:
      arrays["class_mask"] = everything
  return arrays


def _first_non_finite(tree) -> str | None:
  """Path of the first leaf of a host pytree holding NaN or inf, or None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.all(np.isfinite(leaf)):
      return jax.tree_util.keystr(path)
  return None


def _diverged(what: str, task: int, step: int, last_saved: tuple[int, int] | None) -> UserError:
  kept = ("no checkpoint had been written" if last_saved is None
          else f"the last checkpoint (task {last_saved[0]}, step {last_saved[1]}) is kept")
  return UserError(f"Training diverged: {what} in task {task} at step {step}; stopped before "
                   f"checkpointing it, {kept}; lower learning_rate and start again with --restart "
                   "or another --workdir.")


class _Runner:
  """Holds what the loop over tasks shares: compiled steps, writer, checkpointer.

  Construction reads data and weights but writes nothing; `open` starts writing.
  """

  def __init__(self, config, benchmark, stop: interrupts.StopRequest | None = None):
    self.config, self.benchmark, self.stop = config, benchmark, stop
    global_batch = config.per_device_batch_size * jax.device_count()
    self.model = model = factory.create_model(config, benchmark.num_classes)
    self._method_arrays = {}
    query_model = factory.create_query_model(config, benchmark.num_classes)
    rng = jax.random.PRNGKey(config.seed + config.trial)
    init_rng, self.dropout_rng = jax.random.split(rng)
    params, batch_stats, query_params = _initial_variables(config, model, query_model, init_rng)
    self.tx = optim.create_optimizer(config, params)
    self.state = train_state.create(params, self.tx, batch_stats)
    self.buffer = replay.Buffer.empty() if benchmark.rehearsal else None
    self.query_params = steps.replicate(query_params)
    options = steps.StepOptions.from_config(config, global_batch)
    self.train_step = jax.pmap(
        functools.partial(steps.train_step, model=model, query_model=query_model, tx=self.tx, options=options,
                          preprocess=benchmark.device_preprocess),
        axis_name=steps.AXIS, donate_argnums=(0,))
    self.evaluator = evaluation.Evaluator(
        benchmark, model, query_model, cache_query_features=config.cache_eval_query_features, num_eval_steps=config.num_eval_steps,
        task_incremental=config.continual.eval_task_inc)

  def open(self, workdir: str) -> dict | None:
    """Starts writing to `workdir`; returns the progress of its latest checkpoint, or None."""
    self.writer = reporting.create_writer(workdir)
    self.checkpointer = checkpointing.RunCheckpointer(workdir, keep_last_only=self.config.save_last_ckpt_only)
    self.last_saved = None
    restored = self.checkpointer.latest(self.state)
    if restored is None:
      return None
    self.state, progress = restored
    task, step = progress["task"], progress["task_step"]
    if task < self.benchmark.num_tasks and step > self.benchmark.num_steps(task):
      # A run from before run.json, resumed with another global batch (see validation.record_run).
      raise UserError(f"The latest checkpoint in {workdir!r} is at step {step} of task {task}, past its "
                      f"{self.benchmark.num_steps(task)} steps with this global batch: it was made on "
                      "other devices or batch; resume on those, or pass --restart to start over.")
    if self.buffer is not None:
      self.buffer = replay.Buffer.from_json(progress["replay"])
    self.last_saved = self._task_and_step(progress)
    return progress

  def close(self) -> None:
    """Flushes the summaries and ends checkpointing (also after an error)."""
    self.writer.close()
    self.checkpointer.close()

  def _task_and_step(self, progress) -> tuple[int, int]:
    """(task, steps taken in it) of a checkpoint's progress."""
    task, step = progress["task"], progress["task_step"]
    if step == 0 and task > 0:  # Saved after the previous task ended.
      task, step = task - 1, self.benchmark.num_steps(task - 1)
    return task, step

  def method_arrays(self, task: int) -> dict:
    """The prompt method's arrays for `task`, made once (train steps and evaluations share them)."""
    if task not in self._method_arrays:
      self._method_arrays[task] = _method_arrays(self.benchmark, task, self.model)
    return self._method_arrays[task]

  def evaluate(self, rstate, eval_sets, task: int) -> dict[int, dict]:
    """Evaluates the replicated state during or after `task` on `eval_sets`."""
    method_arrays = self.method_arrays(task)
    return {i: self.evaluator.evaluate(rstate.params, self.query_params, i, method_arrays, rstate.batch_stats)
            for i in eval_sets}

  @property
  def histograms(self) -> bool:
    """Whether evaluations write prompt-id histograms."""
    return self.config.prompt_histogram and self.model.method is not None and self.model.method.histogram_size > 0

  def save(self, rstate, progress) -> None:
    """Checkpoints `rstate` unless it holds a non-finite value (then raises UserError)."""
    state = train_state.host_copy(flax.jax_utils.unreplicate(rstate))
    bad = _first_non_finite(state)
    if bad is not None:
      raise _diverged(f"state{bad} is not finite", *self._task_and_step(progress), self.last_saved)
    if self.buffer is not None:
      progress = {**progress, "replay": self.buffer.to_json()}
    # Summaries up to this step reach the disk before the checkpoint that skips them on resume.
    self.writer.flush()
    self.checkpointer.save(state, progress)
    self.last_saved = self._task_and_step(progress)

  def train_task(self, task: int, progress: dict, report) -> tuple[int, float, list[tuple[float, int]]]:
    """Trains `task` from `progress['task_step']` to its end, with periodic evals and checkpoints.

    The task's steps are its training, then its review session if it has one (replay
    batches alone, without the task's logit mask).

    Returns:
      (steps trained, seconds taken, [(time.perf_counter(), steps done) at each fetch of the
      metrics]): what `_Progress.task_trained` reports.
    """
    began = time.perf_counter()
    config, benchmark = self.config, self.benchmark
    start, total = progress["task_step"], benchmark.num_steps(task)
    trained = benchmark.num_train_steps(task)  # Then the review session's steps.
    if start == 0:
      self.state = train_state.start_task(self.state, self.tx, reinit_optimizer=config.reinit_optimizer)
      if self.model.method is not None:
        self.state = self.state.replace(params=self.model.method.start_task(
            self.state.params, task, seed=config.seed + config.trial))
    if self.buffer is not None and not self.buffer.has_task(task):
      self.buffer = self.buffer.add_task(task, *benchmark.kept_examples(task))
    logging.info("Task %d: steps %d..%d of %d (classes %s).", task, start, total, total,
                 benchmark.class_masks[task].tolist())
    per_epoch = benchmark.steps_per_epoch(task)
    task_arrays = self._replicated_arrays(task, review=start >= trained)
    dropout_rng = steps.replicate(self.dropout_rng)
    rstate = steps.replicate(self.state)
    batches = steps.device_batches(self._host_batches(task, start))
    pending = []  # Metrics of the steps since the last log, still on the devices.
    self.synced = []  # Appended by `_log_train`: when the loop waited for the steps anyway.
    first_global_step = int(self.state.step)
    for task_step in range(start, total):
      if task_step == trained and start < trained:
        task_arrays = self._replicated_arrays(task, review=True)
      rstate, metrics = self.train_step(rstate, next(batches), self.query_params, task_arrays, dropout_rng)
      pending.append(metrics)
      global_step = first_global_step + (task_step - start) + 1
      report(global_step)
      done = task_step + 1
      checkpoint = global_step % config.checkpoint_every_steps == 0
      # A checkpoint also ends a logging window, so that a run resumed from it logs the same
      # means; logging raises on a non-finite loss before the diverged state is saved.
      if checkpoint or done % config.log_loss_every_steps == 0 or done == total:
        self._log_train(global_step, task, done, pending)
        pending = []
      if done <= trained:
        periodic_eval = ((config.eval_every_steps > 0 and done % config.eval_every_steps == 0) or
                         (config.eval_per_epochs > 0 and done % (per_epoch * config.eval_per_epochs) == 0))
      else:  # The review session's own cadence.
        periodic_eval = (done - trained) % benchmark.review_eval_every(task) == 0
      if periodic_eval and done < total and not config.eval_last_only:
        results = self.evaluate(rstate, benchmark.eval_sets_after(task) or [0], task)
        for i, r in results.items():
          logging.info("task %d: eval set %d accuracy %.2f%% (%d images)", task, i, r["accuracy"], r["count"])
        self.writer.write_scalars(global_step, reporting.eval_scalars(results))
        if self.histograms:
          reporting.write_histograms(self.writer, global_step, results)
      stopping = self.stop_signal() is not None
      if stopping and not checkpoint and pending:
        self._log_train(global_step, task, done, pending)
        pending = []
      if checkpoint or stopping:
        self.save(rstate, {**progress, "task_step": done})
      if stopping:
        raise interrupts.Stopped(self.stop_signal(), task, done)
    progress["task_step"] = total
    self.state = flax.jax_utils.unreplicate(rstate)
    return total - start, time.perf_counter() - began, self.synced

  def _replicated_arrays(self, task: int, *, review: bool):
    """The train step's per-task arrays of `task`'s training or review session, on the devices."""
    return steps.replicate(_task_arrays(self.benchmark, task, self.method_arrays(task), review=review,
                                        reverse_mask=self.config.continual.replay_reverse_mask))

  def _host_batches(self, task: int, start: int):
    """Numpy batches of the task's steps from `start` on: training, then the review session."""
    benchmark = self.benchmark
    trained = benchmark.num_train_steps(task)
    if start < trained:
      yield from tfds.as_numpy(benchmark.train_dataset(task, start, self.buffer))
    if benchmark.num_review_steps(task):
      yield from tfds.as_numpy(benchmark.review_dataset(task, self.buffer, max(0, start - trained)))

  def stop_signal(self) -> int | None:
    """The signal that asked the run to stop, or None."""
    return None if self.stop is None else self.stop.signum

  def _log_train(self, global_step, task, done, pending) -> None:
    """Writes the means of `pending` (the steps up to `done`); raises on a non-finite loss."""
    values = [{k: float(np.asarray(v)[0]) for k, v in m.items()} for m in jax.device_get(pending)]
    self.synced.append((time.perf_counter(), done))
    for i, v in enumerate(values):
      if not np.isfinite(v["loss"]):
        raise _diverged(f"the loss is {v['loss']}", task, done - len(values) + 1 + i, self.last_saved)
    scalars = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    # As the original's train metrics: the spread of the window's losses and the task.
    scalars.update(loss_std=float(np.std([v["loss"] for v in values])), task_id=task)
    self.writer.write_scalars(global_step, scalars)


def _duration(seconds: float) -> str:
  """'37.2 s', '12.5 min' or '3.1 h'."""
  if seconds < 100:
    return f"{seconds:.1f} s"
  return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


class _Progress:
  """Logs one line per trained task: its steps, time and speed, and the ETA of the steps left.

  The first task a start trains compiles the steps: its speed is measured from its first fetch
  of metrics to its last (host syncs the loop makes anyway), if it has two. Later tasks count
  whole, the input pipeline's start-up included, as the tasks left will. The ETA takes the
  speed over the tasks trained so far and leaves the evaluations out.
  """

  def __init__(self, benchmark):
    self.benchmark = benchmark
    self.steps, self.seconds = 0, 0.0  # Measured, over the tasks trained so far.

  def task_trained(self, task: int, steps: int, seconds: float, synced: list[tuple[float, int]]) -> None:
    measured, since = (steps, seconds), ""
    (t0, first), (t1, last) = synced[0], synced[-1]
    if self.steps == 0 and last > first:  # The first task: compilation before the first fetch.
      measured, since = (last - first, t1 - t0), f" from step {first} on"
    self.steps += measured[0]
    self.seconds += measured[1]
    speed = f"{measured[0] / max(measured[1], 1e-9):.1f} steps/s{since}"
    line = f"Task {task} trained: {steps} steps in {_duration(seconds)} ({speed})"
    left = range(task + 1, self.benchmark.num_tasks)
    if left:
      steps_left = sum(self.benchmark.num_steps(t) for t in left)
      eta = steps_left * self.seconds / max(self.steps, 1)
      line += (f"; {len(left)} of {self.benchmark.num_tasks} tasks left, {steps_left} steps, "
               f"training ETA {_duration(eta)}")
    logging.info("%s.", line)


def _train_tasks(config, benchmark, runner: _Runner, progress: dict) -> np.ndarray:
  """Trains and evaluates the tasks from `progress` on; returns the [E, T] accuracy matrix."""
  matrix = continual_metrics.matrix_from_json(progress["accuracy_matrix"])
  total_steps = sum(benchmark.num_steps(t) for t in range(benchmark.num_tasks))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=runner.writer, every_secs=30)
  progress_line = _Progress(benchmark)
  for task in range(progress["task"], benchmark.num_tasks):
    if progress["task_step"] < benchmark.num_steps(task):
      progress_line.task_trained(task, *runner.train_task(task, progress, report))
    eval_sets = [] if (config.eval_last_only and task < benchmark.num_tasks - 1) else benchmark.eval_sets_after(task)
    if eval_sets:
      rstate = steps.replicate(runner.state)
      results = runner.evaluate(rstate, eval_sets, task)
      for i, r in results.items():
        matrix[i, task] = r["accuracy"]
      final = reporting.write_evaluation(runner.writer, int(runner.state.step), task, matrix, results,
                                         histogram=runner.histograms)
      logging.info("After task %d (accuracy, %%; test images per eval set: %s):\n%s\n%s", task,
                   {i: r["count"] for i, r in results.items()}, reporting.format_matrix(matrix),
                   {k: round(v, 2) for k, v in final.items()})
    progress = {**progress, "task": task + 1, "task_step": 0,
                "accuracy_matrix": continual_metrics.matrix_to_json(matrix)}
    stopping = runner.stop_signal() is not None and task < benchmark.num_tasks - 1
    if eval_sets or task == benchmark.num_tasks - 1 or stopping:
      runner.save(steps.replicate(runner.state), progress)
    if stopping:
      raise interrupts.Stopped(runner.stop_signal(), task + 1, 0)
  return matrix


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, restart: bool = False,
                       stop: interrupts.StopRequest | None = None) -> dict:
  """Trains the tasks of `config.dataset` in order, evaluating after each; resumes from `workdir`.

  Args:
    config: the run's config.
    workdir: where checkpoints, summaries, config.json, run.json and results.json go. A run
      of the same config on the same devices found there is resumed; one of another config
      or made on other devices is refused, and so is a workdir another run is using.
    restart: move an earlier run in `workdir` aside (to `<workdir>.old`) and start over.
    stop: set by a signal handler to stop at the next step, checkpointed (see interrupts).

  Returns:
    The final continual metrics ({'avg_acc', 'forgetting', ...}) and 'accuracy_matrix'.

  Raises:
    UserError: bad input (found before anything is written) or a diverged run.
    interrupts.Stopped: `stop` was set; the state is checkpointed.
  """
  validation.check_config(config)
  validation.check_workdir(workdir, config, restart=restart)
  benchmark = input_pipeline.create_benchmark(config)
  runner = _Runner(config, benchmark, stop)
  lock = validation.claim_workdir(workdir, config, restart=restart)
  try:  # Whatever happens, the lock goes when the run ends.
    progress = runner.open(workdir)
    try:
      run = validation.record_run(workdir, config)  # After `open` has checked the checkpoint.
      if progress is None:
        progress = {"task": 0, "task_step": 0,
                    "accuracy_matrix": continual_metrics.matrix_to_json(
                        np.full([benchmark.num_eval_sets, benchmark.num_tasks], np.nan))}
        reporting.write_hparams(runner.writer, config)
      matrix = _train_tasks(config, benchmark, runner, progress)
    finally:
      runner.close()
    last = max((t for t in range(benchmark.num_tasks) if not np.all(np.isnan(matrix[:, t]))), default=None)
    summary = dict(continual_metrics.summarize(matrix, last)) if last is not None else {}
    path = reporting.write_results(workdir, matrix, config, summary, run=run)
  finally:
    lock.release()
  logging.info("Results: %s", path)  # The matrix is in the log of the last evaluation.
  return {**summary, "accuracy_matrix": matrix}
