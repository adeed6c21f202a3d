"""Task-free Gaussian schedule: which classes each episode of the stream holds.

The schedule of L2P's Gaussian CIFAR-100 (after Shanahan et al., 2021,
arXiv:2105.13327). The stream is `num_tasks` episodes of `steps_per_task`
"batches" each: schedule_length = num_tasks * steps_per_task, and episode e sits
at position e * steps_per_task. Peaks are spread evenly over the stream:
peak_every = schedule_length // num_classes (floor division) and the peaks are
range(peak_every // 2, schedule_length, peak_every), Python's range exactly.
Peak j belongs to class_order[j]. An episode's label set holds each peak's class
independently with probability exp(-(position - peak)^2 / (2 * width^2)),
width = 50; an empty set is drawn again, every class anew, until it is not.

The rule holds for any nonzero steps_per_task, negative included, as the
original computes it. With L2P's 200 episodes, steps_per_task = s gives
peak_every = 2s, peaks s, 3s, ..., 199s and positions 0, s, ..., 199s: class j
peaks at episode 2j + 1 with a width of 50 / |s| episodes. The shipped s = -1
is thus s = 1 (label sets of about 49 classes), s = 5 narrows the bumps to 10
episodes (about 12 classes). Other lengths can give other peak counts: with
fewer peaks than classes the last classes of the order never appear, and peaks
beyond the last class belong to the last class (the original's label lookup
clamps its index), both as in the original. peak_every = 0 (a stream shorter
than num_classes batches) has no schedule: the original fails, so does this.

Everything here is a pure function of its arguments (NumPy only).
"""

import numpy as np

from libml.errors import UserError

# Standard deviation of every class's bump, in stream "batches".
WIDTH = 50.0
# Episodes whose label set would be empty with at least this probability
# after every redraw are refused instead of redrawn (practically) forever.
_MIN_NONEMPTY = 1e-3
# Second key of the draws' seed, so they never coincide with other seeded uses.
_DRAWS = 0x6761757373


def _length(num_tasks: int, steps_per_task: int) -> int:
  if steps_per_task == 0:
    raise UserError('continual.num_train_steps_per_task=0 gives the Gaussian '
                    'schedule no length: use -1 (as the original) or a '
                    'positive number of steps per episode')
  if num_tasks <= 0:
    raise UserError(f'continual.num_tasks={num_tasks} must be positive for '
                    'the Gaussian schedule')
  return num_tasks * steps_per_task


def peaks(num_tasks: int, steps_per_task: int,
          num_classes: int) -> np.ndarray:
  """int64 [P]: stream position of every peak; peak j belongs to class j."""
  length = _length(num_tasks, steps_per_task)
  every = length // num_classes
  if every == 0:
    raise UserError(
        f'the Gaussian schedule needs continual.num_tasks * '
        f'num_train_steps_per_task = {num_tasks} * {steps_per_task} = {length}'
        f' to be negative or at least the {num_classes} classes: it spaces '
        'the class peaks whole batches apart')
  return np.array(range(every // 2, length, every), np.int64)


def positions(num_tasks: int, steps_per_task: int) -> np.ndarray:
  """int64 [E]: stream position of every episode."""
  _length(num_tasks, steps_per_task)
  return np.arange(num_tasks, dtype=np.int64) * steps_per_task


def probabilities(num_tasks: int, steps_per_task: int, num_classes: int,
                  width: float = WIDTH) -> np.ndarray:
  """float64 [E, P]: probability that episode e holds the class of peak j."""
  distance = (positions(num_tasks, steps_per_task)[:, None] -
              peaks(num_tasks, steps_per_task, num_classes)[None, :])
  return np.exp(-distance.astype(np.float64)**2 / (2 * width**2))


def peak_classes(num_peaks: int, class_order: np.ndarray) -> np.ndarray:
  """int32 [P]: class of every peak (the last class takes any extra peaks)."""
  rank = np.minimum(np.arange(num_peaks), len(class_order) - 1)
  return np.asarray(class_order, np.int32)[rank]


def label_sets(*, num_classes: int, num_tasks: int, steps_per_task: int,
               seed: int, class_order: np.ndarray | None = None,
               width: float = WIDTH) -> list[np.ndarray]:
  """Draws the label set of every episode.

  Args:
    num_classes: number of classes C.
    num_tasks: number of episodes E.
    steps_per_task: the config's num_train_steps_per_task (nonzero).
    seed: seed of the draws; the same seed gives the same schedule.
    class_order: [C] permutation of class ids; class_order[j] owns peak j.
      None means label order.
    width: standard deviation of every bump, in stream batches.

  Returns:
    E sorted, non-empty int32 arrays of class ids.

  Raises:
    UserError: a setting that gives no schedule (see the module docstring).
  """
  if class_order is None:
    class_order = np.arange(num_classes)
  probs = probabilities(num_tasks, steps_per_task, num_classes, width)
  owners = peak_classes(probs.shape[1], class_order)
  rng = np.random.default_rng([seed % 2**32, _DRAWS])
  sets = []
  for episode, p in enumerate(probs):
    with np.errstate(divide='ignore'):  # p = 1 makes log1p(-p) = -inf: fine.
      nonempty = -np.expm1(np.log1p(-p).sum())
    if nonempty < _MIN_NONEMPTY:
      raise UserError(
          f'episode {episode} of the Gaussian schedule lies too far from '
          f'every class peak to draw any class (probability {nonempty:.1e}): '
          'use a smaller |continual.num_train_steps_per_task|')
    hit = np.zeros(len(p), bool)
    while not hit.any():  # Every class is drawn anew.
      hit = rng.random(len(p)) < p
    sets.append(np.unique(owners[hit]).astype(np.int32))
  return sets
