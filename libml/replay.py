"""The rehearsal buffer: which training examples each task keeps, and which each step replays.

As the original's experience replay (`config.continual.replay`): task t keeps
`num_samples_per_class` x (its classes) examples drawn at random from the positions of its
first pass over the data (the stream of global batches the run trains on), each as the
augmented view the stream showed. An example joins the buffer once the step that saw it has
run. From task 1 on, every step draws one replay batch from the buffer, uniformly, without
replacement while the buffer holds a batch's worth (`include_new_task`: the current task's
kept examples may be drawn too; the review session always draws from the whole buffer).

The buffer is plain data: per kept example its task, record id, augmentation key and stream
position. The record id and key regenerate the view exactly (the augmentation is a pure
function of them), so the buffer is tiny and lives in the checkpoint's progress; the
pixels are re-read from the data when a run resumes. On several hosts each host keeps the
examples its own slice of the stream held and draws its block of every replay batch from
them, as the original's per-host buffers do; with one host that is the whole buffer.

Everything random is a pure function of (seed, task, step, host): a resumed run replays the
same examples as an uninterrupted one.
"""

import dataclasses

import numpy as np

# Seed streams, apart from the input pipeline's (shuffle, subsample, augment).
_SELECT, _DRAW = 10, 11
_FIELDS = ("task", "ids", "keys", "positions")


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed % 2**32, *keys])


@dataclasses.dataclass(frozen=True)
class Buffer:
  """The examples kept so far, ordered by task, then stream position.

  Attributes:
    task: int64 [n] the task whose stream held the example.
    ids: int64 [n] its record id in that task's data.
    keys: int64 [n] its augmentation key (the view the stream showed).
    positions: int64 [n] its index in the task's stream of global batches (step x global
      batch + slot): the step that adds it, and the host that keeps it.
  """
  task: np.ndarray
  ids: np.ndarray
  keys: np.ndarray
  positions: np.ndarray

  @classmethod
  def empty(cls) -> "Buffer":
    return cls(*(np.zeros([0], np.int64) for _ in _FIELDS))

  def __len__(self) -> int:
    return len(self.task)

  def has_task(self, task: int) -> bool:
    return bool(np.any(self.task == task))

  def add_task(self, task: int, ids: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> "Buffer":
    """The buffer with `task`'s kept examples appended (sorted by position)."""
    order = np.argsort(positions, kind="stable")
    new = (np.full(len(ids), task), ids[order], keys[order], positions[order])
    return Buffer(*(np.concatenate([old, np.asarray(n, np.int64)]) for old, n in zip(self.fields(), new)))

  def fields(self) -> tuple[np.ndarray, ...]:
    return tuple(getattr(self, f) for f in _FIELDS)

  def select(self, keep: np.ndarray) -> "Buffer":
    return Buffer(*(f[keep] for f in self.fields()))

  def to_json(self) -> dict:
    return {f: getattr(self, f).tolist() for f in _FIELDS}

  @classmethod
  def from_json(cls, doc: dict) -> "Buffer":
    return cls(*(np.asarray(doc[f], np.int64) for f in _FIELDS))


def kept_positions(seed: int, task: int, *, stream_size: int, count: int) -> np.ndarray:
  """Sorted positions of the examples task `task` keeps.

  Args:
    seed: the run's data seed.
    task: the task.
    stream_size: positions of the task's first pass that training reaches (whole global
      batches).
    count: examples to keep; fewer when the first pass holds fewer.

  Returns:
    int64 [min(count, stream_size)] distinct positions in [0, stream_size).
  """
  count = min(count, stream_size)
  return np.sort(_rng(seed, _SELECT, task).choice(stream_size, size=count, replace=False)).astype(np.int64)


def host_shard(buffer: Buffer, *, host: int, global_batch: int, local_batch: int) -> Buffer:
  """The examples host `host` keeps: those its block of each global batch held."""
  return buffer.select((buffer.positions % global_batch) // local_batch == host)


def available(shard: Buffer, task: int, step: int, *, include_new_task: bool, global_batch: int) -> int:
  """How many of `shard`'s first examples step `step` of task `task` may draw.

  Earlier tasks' examples, and with `include_new_task` the current task's already seen (by
  steps <= `step`, so the step's own batch counts). The shard is ordered by task, then
  position, so these are a prefix of it.
  """
  count = int(np.sum(shard.task < task))
  if include_new_task:
    count += int(np.sum((shard.task == task) & (shard.positions < (step + 1) * global_batch)))
  return count


def draw(seed: int, task: int, step: int, host: int, *, available_count: int, size: int) -> np.ndarray:
  """Indices into the shard's first `available_count` examples for one step's replay block.

  Uniform; without replacement when the buffer holds `size` examples, else with it.

  Returns:
    int64 [size].
  """
  if available_count <= 0:
    raise ValueError(f"step {step} of task {task} has no example to replay")
  rng = _rng(seed, _DRAW, task, step, host)
  return rng.choice(available_count, size=size, replace=available_count < size).astype(np.int64)
