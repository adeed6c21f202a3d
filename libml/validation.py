"""Checks a run makes before it writes anything, and the claim it then stakes on its workdir.

`check_config` and `check_workdir` only read: a mistake on the command line ends the run
in seconds, with one line, and leaves the workdir as it was. `claim_workdir` is the run's
first write: it takes the workdir's lock (`<workdir>/run.lock`, see `run_lock`: one run at
a time) and records the config in `<workdir>/config.json` (or, with `restart`, first moves
an earlier run aside), so that a later start can tell a resume from a different run.
`record_run` then records the devices, library versions and commit in `<workdir>/run.json`.

A run resumes only on the topology it began with (`run_record.STRICT_KEYS`: process and
device counts, devices per process, images per device, global batch), since the batches and
the per-device prompt-vote groups depend on it; another kind of device with the same counts
continues, with a warning (same batches and votes; the arithmetic may round differently).

A stored config differs from the current one when any key differs except those in
`HARMLESS_KEYS` (where the data lives and how often the run logs and checkpoints; none of
them changes a result) and `init_checkpoint`, compared by file name only, so that a run
can resume on a machine that keeps the same file elsewhere.

On several hosts process 0 decides about the workdir and the other processes learn its
verdict, so that all of them stop, or none does.
"""

import json
import math
import os
import tempfile
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

from libml import augment
from libml import benchmarks
from libml import optim
from libml import run_lock
from libml import run_record
from libml import steps
from libml.errors import UserError
from models import factory
from models import resnet

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
HARMLESS_KEYS = ("data_dir", "log_loss_every_steps", "checkpoint_every_steps", "save_last_ckpt_only",
                 "prompt_histogram")
# Anything of these in a workdir means a run was started there.
_RUN_ENTRIES = (CONFIG_FILE, RUN_FILE, "checkpoints", "results.json")
_FIX = "pass --restart to move that run aside and start over, or choose another --workdir"
_MESSAGE_BYTES = 2048


# --- The config. ---------------------------------------------------------------------------
# One function per concern; the modules that read these fields assume they passed.

# Counts that must be at least 1.
_POSITIVE_INTS = ("per_device_batch_size", "input_size", "num_epochs", "log_loss_every_steps",
                  "checkpoint_every_steps")


def _check_positive_ints(config) -> None:
  """Batch, sizes, epochs and cadences: whole numbers of at least 1."""
  for key in _POSITIVE_INTS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{key}={value!r} must be a positive integer.")


def _check_optimization(config) -> None:
  """The optimizer, clipping mode, learning rate, its schedule and warm-up."""
  if config.optim not in optim.OPTIMIZERS:
    raise UserError(f"Unknown optim {config.optim!r}: use one of {', '.join(optim.OPTIMIZERS)}.")
  if config.grad_clip_mode not in steps.GRAD_CLIP_MODES:
    raise UserError(f"Unknown grad_clip_mode {config.grad_clip_mode!r}: use one of "
                    f"{', '.join(steps.GRAD_CLIP_MODES)}.")
  if config.learning_rate_schedule not in optim.SCHEDULES:
    raise UserError(f"Unknown learning_rate_schedule {config.learning_rate_schedule!r}; valid: "
                    f"{', '.join(optim.SCHEDULES)}.")
  if not (isinstance(config.learning_rate, (int, float)) and math.isfinite(config.learning_rate)
          and config.learning_rate > 0):
    raise UserError(f"learning_rate={config.learning_rate} must be a positive, finite number.")
  if not 0 <= config.warmup_epochs < config.num_epochs:
    raise UserError(f"warmup_epochs={config.warmup_epochs} must be in [0, num_epochs={config.num_epochs}).")


def check_data(config) -> benchmarks.Layout:
  """Raises UserError for data settings that cannot run; reads no data.

  Covers the benchmark name and task counts (`benchmarks.layout`), the crop sizes, the
  subsample rate and the decoded-image budgets. Assumes `_check_positive_ints` passed.

  Returns:
    The benchmark's layout.
  """
  layout = benchmarks.layout(config)
  if layout.augment and config.resize_size < config.input_size:
    raise UserError(f"resize_size={config.resize_size} is smaller than input_size={config.input_size}: "
                    "the crop needs room")
  if config.subsample_rate != -1 and not 0 < config.subsample_rate <= 1:
    raise UserError(f"subsample_rate={config.subsample_rate} must be -1 (all) or in (0, 1]")
  for key, images in (("decoded_cache_mb", "test images at every evaluation"),
                      ("decoded_train_mb", "training images at every use")):
    if config[key] < 0:
      raise UserError(f"{key}={config[key]} must be >= 0 (0 decodes the {images})")
  return layout


def _check_rehearsal(config) -> None:
  """The rehearsal buffer, its logit masks and the review session (continual.*)."""
  continual = config.continual
  per_class = continual.replay.num_samples_per_class
  if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
    raise UserError(f"continual.replay.num_samples_per_class={per_class!r} must be a whole number >= 0 "
                    "(0: no rehearsal buffer).")
  needs_buffer = [k for k in ("replay_no_mask", "replay_reverse_mask", "review_trick") if continual[k]]
  if per_class == 0 and needs_buffer:
    raise UserError(f"continual.{needs_buffer[0]} needs a rehearsal buffer: set "
                    "continual.replay.num_samples_per_class > 0, or turn it off.")
  if per_class == 0:
    return
  if config.gaussian_schedule:
    raise UserError("continual.replay does not apply to the Gaussian schedule's episodes: set "
                    "continual.replay.num_samples_per_class=0 or gaussian_schedule=False.")
  if continual.train_mask and not continual.replay_no_mask and not continual.review_trick:
    raise UserError("continual.train_mask would give the replayed examples of earlier tasks -inf logits at "
                    "their labels: set continual.replay_no_mask=True (or train_mask=False).")
  if continual.replay_reverse_mask and not continual.replay_no_mask:
    raise UserError("continual.replay_reverse_mask refines replay_no_mask: set continual.replay_no_mask=True.")
  if continual.replay_reverse_mask and continual.replay.include_new_task:
    raise UserError("continual.replay_reverse_mask would give replayed examples of the current task -inf "
                    "logits at their labels: set continual.replay.include_new_task=False.")
  if continual.review_trick:
    epochs, steps = continual.num_review_epochs, continual.num_review_steps
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
      raise UserError(f"continual.num_review_epochs={epochs!r} must be a positive integer.")
    if not isinstance(steps, int) or not (steps == -1 or steps >= 1):
      raise UserError(f"continual.num_review_steps={steps!r} must be -1 (from num_review_epochs) or >= 1.")


def _check_models(config, num_classes: int) -> None:
  """Builds the models, which run their own checks (model_name, top_k, prompt layers, ...).

  They raise ValueError (plain Python inside models/); here it becomes the one-line UserError.
  """
  try:
    factory.create_model(config, num_classes)
    factory.create_query_model(config, num_classes)
  except ValueError as e:
    raise UserError(" ".join(str(e).split())) from e
  if resnet.is_resnet(config.model_name) and config.init_checkpoint:
    raise UserError(f"{config.model_name} trains from scratch here: init_checkpoint "
                    f"{config.init_checkpoint!r} holds ViT weights; leave init_checkpoint unset.")


def check_config(config) -> None:
  """Raises UserError for a config that cannot run; reads no data and writes nothing.

  Covers the batch, size and cadence counts, the optimisation settings (optimizer, clipping
  mode, schedule, learning rate, warm-up), the rehearsal settings (buffer, logit masks,
  review session), the extra augmentations, the data settings (`check_data`), the prompt-vote groups and the model (model_name, top_k <= pool_size, prompt layers within the depth, ...).
  """
  _check_positive_ints(config)
  _check_optimization(config)
  _check_rehearsal(config)
  augment.check(config.augment)
  layout = check_data(config)
  _check_models(config, layout.num_classes)


# --- The workdir. ---------------------------------------------------------------------------

def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}."))
  return out


def config_json(config) -> dict:
  """The config as the JSON document `claim_workdir` stores."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_differences(stored: dict, current: dict) -> list[str]:
  """'key: old -> new' for every key that matters and differs (see the module docstring)."""
  old, new = _flat(stored), _flat(current)
  out = []
  for key in sorted(set(old) | set(new)):
    if key in HARMLESS_KEYS:
      continue
    a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
    if key == "init_checkpoint":
      a, b = (os.path.basename(v) if isinstance(v, str) else v for v in (a, b))
    if a != b:
      out.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
  return out


def _probe_writable(workdir: str) -> None:
  """Raises UserError unless a file can be created in `workdir` (or where it would be made)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is a file, not a directory; choose another --workdir.")
  target = os.path.abspath(workdir)
  while not os.path.isdir(target):
    parent = os.path.dirname(target)
    if os.path.exists(target) or parent == target:
      raise UserError(f"workdir {workdir!r} cannot be created ({target!r} is not a directory); "
                      "choose another --workdir.")
    target = parent
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=target)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir!r} is not writable ({e.strerror} in {target!r}); choose "
                    "another --workdir or fix its permissions.") from e


def _holds_run(workdir: str) -> bool:
  return os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, e)) for e in _RUN_ENTRIES)


def _check_topology(workdir: str, config) -> None:
  """Raises UserError if the run in `workdir` began on another topology (see the module docstring)."""
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path) as f:
      stored = json.load(f)["topology"]
    stored_keys = {k: stored[k] for k in run_record.STRICT_KEYS}
    old = run_record.describe(stored)
  except FileNotFoundError:
    return  # A run from before run.json: `record_run` warns.
  except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
    raise UserError(f"{path} is unreadable ({type(e).__name__}); {_FIX}.") from e
  current = run_record.topology(config)
  if any(stored_keys[k] != current[k] for k in run_record.STRICT_KEYS):
    raise UserError(f"workdir {workdir!r} holds a run made on {old}; this start has "
                    f"{run_record.describe(current)}: resuming would change its batches and prompt-vote "
                    f"groups, so its results; resume on the devices it began with, or {_FIX}.")


def _verdict(workdir: str, config, restart: bool, own: run_lock.RunLock | None = None) -> None:
  """Raises UserError unless the run may start or resume in `workdir` (locked by `own`, if given)."""
  _probe_writable(workdir)
  if not restart and _holds_run(workdir):
    _check_run(workdir, config)
  if os.path.isdir(workdir):
    run_lock.check_free(workdir, own=own)


def _check_run(workdir: str, config) -> None:
  """Raises UserError unless the run in `workdir` is this config's, on these devices."""
  path = os.path.join(workdir, CONFIG_FILE)
  fix = _FIX
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise UserError(f"workdir {workdir!r} holds a run without {CONFIG_FILE}, so it cannot be "
                    f"resumed safely; {fix}.") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({type(e).__name__}); {fix}.") from e
  diff = config_differences(stored, config_json(config))
  if diff:
    more = f"; {len(diff) - 3} more" if len(diff) > 3 else ""
    raise UserError(f"workdir {workdir!r} holds a run of a different config ({'; '.join(diff[:3])}{more}); "
                    f"{fix}.")
  _check_topology(workdir, config)


def _agreed(decide: Callable[[], Any]) -> Any:
  """Runs `decide` on process 0; every process raises the UserError it raised, if any.

  Returns what `decide` returned on process 0, None on the other processes.
  """
  message, result = "", None
  if jax.process_index() == 0:
    try:
      result = decide()
    except UserError as e:
      message = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    data = message.encode()[:_MESSAGE_BYTES]
    buffer = np.zeros([_MESSAGE_BYTES], np.uint8)
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    message = bytes(buffer[buffer > 0]).decode(errors="replace")
  if message:
    raise UserError(message)
  return result


def check_workdir(workdir: str, config, *, restart: bool) -> None:
  """Raises UserError if `workdir` is not writable, holds a run of another config or made on
  other devices, or is in use by a live run on this host (`run_lock.check_free`).

  Reads only. With `restart` an earlier run is no obstacle (`claim_workdir` moves it).
  """
  _agreed(lambda: _verdict(workdir, config, restart))


def _aside_name(workdir: str) -> str:
  base = os.path.abspath(workdir).rstrip(os.sep) + ".old"
  candidate, n = base, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{base}-{n}"
  return candidate


def _move_aside(workdir: str, lock: run_lock.RunLock) -> run_lock.RunLock:
  """--restart: renames the run in `workdir` (locked by `lock`) aside; returns the new workdir's lock."""
  aside = _aside_name(workdir)
  here, there = os.path.realpath(os.getcwd()), os.path.realpath(workdir)
  if os.path.commonpath([here, there]) == there:  # Renaming would move the process along.
    raise UserError(f"--restart cannot move {workdir!r} aside while it holds the current directory; "
                    "run from another directory.")
  lock.pause()
  try:
    os.rename(workdir, aside)
  except OSError as e:
    raise UserError(f"--restart cannot move the earlier run in {workdir!r} to {aside!r} "
                    f"({e.strerror}); move or delete it yourself and start again.") from e
  lock.release(moved_to=os.path.join(aside, run_lock.LOCK_FILE))  # The earlier run moves aside as it was.
  logging.warning("--restart: moved the earlier run in %s to %s.", workdir, aside)
  os.makedirs(workdir, exist_ok=True)
  return run_lock.acquire(workdir)


def _claim(workdir: str, config, restart: bool) -> run_lock.RunLock:
  _verdict(workdir, config, restart)
  os.makedirs(workdir, exist_ok=True)
  lock = run_lock.acquire(workdir)
  try:
    _verdict(workdir, config, restart, lock)  # Again, under the lock: another start may have ended meanwhile.
    if restart and _holds_run(workdir):
      lock = _move_aside(workdir, lock)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(config_json(config), f, indent=2, sort_keys=True)
      os.replace(tmp, path)
  except BaseException:
    lock.release()
    raise
  return lock


def claim_workdir(workdir: str, config, *, restart: bool) -> run_lock.RunLock | run_lock.NotHeld:
  """Makes `workdir` this run's: takes its lock, checks it again, moves an earlier run aside
  if `restart` (to `<workdir>.old`, `.old-2`, ...), and stores the config in
  `<workdir>/config.json`.

  Process 0 does the work and holds the lock; all processes return once it is done.

  Returns:
    The lock: `release()` it when the run ends, also after an error (a lock that is garbage
    collected is released too). A no-op on processes other than 0.

  Raises:
    UserError: as `check_workdir`, or another run took the workdir meanwhile.
  """
  return _agreed(lambda: _claim(workdir, config, restart)) or run_lock.NotHeld()


def _record(workdir: str, start: dict) -> int:
  """Adds `start` to `<workdir>/run.json` (process 0); returns the number of starts so far."""
  path = os.path.join(workdir, RUN_FILE)
  try:
    with open(path) as f:
      doc = json.load(f)
  except FileNotFoundError:
    doc = None
  current = start["topology"]
  if doc is None:
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
      logging.warning("workdir %s holds a run from before %s was recorded: the devices it began on cannot be "
                      "checked; recording this start's (%s).", workdir, RUN_FILE, run_record.describe(current))
    doc = {"topology": current, "starts": []}
  else:
    began = doc["topology"]
    if (began.get("platform"), began.get("device_kind")) != (current["platform"], current["device_kind"]):
      logging.warning("workdir %s began on %s devices and continues on %s devices (same counts and batches): "
                      "the same batches and prompt votes, but the arithmetic may round differently, so the "
                      "results may differ slightly from an uninterrupted run.", workdir,
                      began.get("device_kind"), current["device_kind"])
    last = doc["starts"][-1] if doc.get("starts") else {}
    changed = sorted(k for k in set(last.get("versions", {})) | set(start["versions"])
                     if last.get("versions", {}).get(k) != start["versions"].get(k))
    if last and last.get("git_commit") != start.get("git_commit"):
      changed.append("git_commit")
    if last and changed:
      logging.warning("workdir %s: this start differs from the previous one in %s (see %s); the results may "
                      "differ slightly from an uninterrupted run.", workdir, ", ".join(changed), path)
  doc.setdefault("starts", []).append(start)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)
  return len(doc["starts"])


def record_run(workdir: str, config) -> dict:
  """Records this start in `<workdir>/run.json` (process 0): on the first start the topology
  later starts must match, and for every start its time, host, pid, command line, topology,
  library versions and git commit. Warns when a resume runs on another kind of device or
  other library versions or commit.

  Returns:
    What `results.json` repeats: {'topology', 'versions', 'git_commit' (when known), 'starts'}
    ('starts': how many times the run was started, on process 0 only).
  """
  start = run_record.start_record(config)
  out = {k: start[k] for k in ("topology", "versions", "git_commit") if k in start}
  if jax.process_index() == 0:
    out["starts"] = _record(workdir, start)
  return out
