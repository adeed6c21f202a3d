"""Task-free Gaussian schedule: class frequencies rise and fall over a stream.

Each class owns a Gaussian bump over the stream of training batches. The peaks
are spaced evenly (in the class order given), so a class becomes frequent,
peaks, and fades while its neighbours in the order take over. Every example's
label is drawn from the normalised bumps at its batch's position. The stream is
cut into equal episodes of `batches_per_episode` batches; an episode's label set
is whatever its draws produced.

Everything here is a pure function of its arguments (NumPy only).
"""

import numpy as np

# Batches each episode holds when the config leaves the count open (-1).
DEFAULT_BATCHES_PER_EPISODE = 5
# Standard deviation of every class's bump, in batches.
DEFAULT_WIDTH = 50.0


def class_probabilities(num_classes: int,
                        num_batches: int,
                        width: float = DEFAULT_WIDTH,
                        class_order: np.ndarray | None = None) -> np.ndarray:
  """Per-batch label distribution of the schedule.

  Args:
    num_classes: number of classes C.
    num_batches: length T of the stream, in batches.
    width: standard deviation of each class's bump, in batches.
    class_order: [C] permutation of class ids; class_order[k] peaks k-th.
      None means label order.

  Returns:
    [T, C] float64, each row a probability vector over class ids.
  """
  if class_order is None:
    class_order = np.arange(num_classes)
  # Peak k sits at the middle of the k-th of C equal stretches of the stream.
  peaks = (np.arange(num_classes) + 0.5) * num_batches / num_classes
  times = np.arange(num_batches)[:, None] + 0.5
  # Log-space normalisation keeps rows far from every peak finite.
  logits = -0.5 * ((times - peaks[None, :]) / width)**2
  logits -= logits.max(axis=1, keepdims=True)
  probs_by_rank = np.exp(logits)
  probs_by_rank /= probs_by_rank.sum(axis=1, keepdims=True)
  probs = np.empty_like(probs_by_rank)
  probs[:, np.asarray(class_order)] = probs_by_rank
  return probs


def episode_labels(*,
                   num_classes: int,
                   num_episodes: int,
                   batches_per_episode: int,
                   batch_size: int,
                   seed: int,
                   width: float = DEFAULT_WIDTH,
                   class_order: np.ndarray | None = None) -> np.ndarray:
  """Draws the label of every example of the stream.

  Args:
    num_classes: number of classes C.
    num_episodes: number of episodes E.
    batches_per_episode: batches B in each episode.
    batch_size: examples per batch (the global batch, all hosts together).
    seed: seed of the draws; the same seed gives the same schedule.
    width: standard deviation of each class's bump, in batches.
    class_order: see `class_probabilities`.

  Returns:
    [E, B, batch_size] int32 class ids.
  """
  num_batches = num_episodes * batches_per_episode
  probs = class_probabilities(num_classes, num_batches, width, class_order)
  cdf = np.cumsum(probs, axis=1)
  cdf[:, -1] = 1.0  # Rounding must never let a draw fall past the last class.
  draws = np.random.default_rng(seed).random((num_batches, batch_size))
  labels = np.stack(
      [np.searchsorted(row, d, side='right') for row, d in zip(cdf, draws)])
  return labels.reshape(num_episodes, batches_per_episode,
                        batch_size).astype(np.int32)
