"""The task-free Gaussian schedule: coverage, rise and fall, determinism."""

import numpy as np

from libml import gaussian_schedule

_SETTINGS = dict(num_classes=100, num_episodes=200, batches_per_episode=5,
                 batch_size=16)


def _labels(seed=0, **overrides):
  return gaussian_schedule.episode_labels(**{**_SETTINGS, 'seed': seed,
                                             **overrides})


def test_shape_and_every_class_appears():
  labels = _labels()
  assert labels.shape == (200, 5, 16)
  assert labels.dtype == np.int32
  assert set(np.unique(labels)) == set(range(100))


def test_frequency_rises_and_falls_around_evenly_spaced_peaks():
  stream = _labels().reshape(-1, 16)  # [1000 batches, 16]
  for c in (30, 50, 70):
    counts = (stream == c).sum(axis=1)
    peak = int((c + 0.5) * 10)  # 1000 batches / 100 classes.
    rising = counts[peak - 150:peak - 100].sum()
    at_peak = counts[peak - 25:peak + 25].sum()
    falling = counts[peak + 100:peak + 150].sum()
    assert at_peak > 3 * rising and at_peak > 3 * falling
    times = np.repeat(np.arange(len(counts)), counts)
    # Centred on the peak, spread about one width (50 batches).
    assert abs(times.mean() - peak) < 15
    assert 30 < times.std() < 70


def test_probabilities_are_distributions_with_peaks_in_class_order():
  order = np.random.default_rng(3).permutation(20)
  probs = gaussian_schedule.class_probabilities(20, 400, width=10.0,
                                                class_order=order)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
  # The k-th class of the order peaks in the middle of the k-th stretch of 20.
  peaks = probs.argmax(axis=0)
  np.testing.assert_array_equal(peaks[order] // 20, np.arange(20))


def test_same_seed_same_schedule_other_seed_differs():
  np.testing.assert_array_equal(_labels(seed=4), _labels(seed=4))
  assert not np.array_equal(_labels(seed=4), _labels(seed=5))


def test_label_frequencies_match_probabilities():
  probs = gaussian_schedule.class_probabilities(10, 4, width=1.0)
  labels = gaussian_schedule.episode_labels(
      num_classes=10, num_episodes=2, batches_per_episode=2, batch_size=20000,
      seed=1, width=1.0).reshape(4, -1)
  for t in range(4):
    freq = np.bincount(labels[t], minlength=10) / labels.shape[1]
    np.testing.assert_allclose(freq, probs[t], atol=0.015)
