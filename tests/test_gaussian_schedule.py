"""The task-free Gaussian schedule: the original's peaks, label-set statistics, determinism.

Expectations are derived independently of the module: with 200 episodes and
num_train_steps_per_task = s, the original's rule puts class j's peak at
episode 2j + 1 with a width of 50 / |s| episodes (s = -1 and s = 1 coincide).
"""

import math

import numpy as np
import pytest

from libml import gaussian_schedule
from libml.errors import UserError

_EPISODES = np.arange(200)


def _sets(steps, seed=0, **kwargs):
  return gaussian_schedule.label_sets(num_classes=100, num_tasks=200,
                                      steps_per_task=steps, seed=seed, **kwargs)


def _expected_probs(steps) -> np.ndarray:
  """[200, 100]: class j peaks at episode 2j + 1, width 50 / |steps| episodes."""
  width = 50 / abs(steps)
  peak = 2 * np.arange(100) + 1
  return np.exp(-(_EPISODES[:, None] - peak[None, :])**2 / (2 * width**2))


def _membership(sets) -> np.ndarray:
  """bool [episodes, 100]: whether each class is in each episode's set."""
  out = np.zeros((len(sets), 100), bool)
  for e, s in enumerate(sets):
    out[e, s] = True
  return out


def test_peaks_and_positions_follow_the_original_rule():
  # Shipped -1: length -200, peak_every -2, peaks -1, -3, ..., -199.
  np.testing.assert_array_equal(gaussian_schedule.peaks(200, -1, 100),
                                -(2 * np.arange(100) + 1))
  np.testing.assert_array_equal(gaussian_schedule.positions(200, -1), -_EPISODES)
  # 5: length 1000, peak_every 10, peaks 5, 15, ..., 995; episodes 0, 5, ..., 995.
  np.testing.assert_array_equal(gaussian_schedule.peaks(200, 5, 100),
                                10 * np.arange(100) + 5)
  np.testing.assert_array_equal(gaussian_schedule.positions(200, 5), 5 * _EPISODES)
  # Other lengths: -150 // 100 = -2 gives 75 peaks; 250 // 100 = 2 gives 125.
  np.testing.assert_array_equal(gaussian_schedule.peaks(150, -1, 100),
                                -(2 * np.arange(75) + 1))
  np.testing.assert_array_equal(gaussian_schedule.peaks(250, 1, 100),
                                2 * np.arange(125) + 1)
  # Extra peaks go to the last class of the order (the original's lookup clamps).
  order = np.random.default_rng(0).permutation(100)
  owners = gaussian_schedule.peak_classes(125, order)
  np.testing.assert_array_equal(owners[:100], order)
  assert (owners[100:] == order[-1]).all()


@pytest.mark.parametrize('steps', [-1, 1, 5, -3])
def test_probabilities_match_the_closed_form(steps):
  np.testing.assert_allclose(gaussian_schedule.probabilities(200, steps, 100),
                             _expected_probs(steps), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize('tasks, steps, match', [
    (200, 0, 'num_train_steps_per_task=0'),
    (2, 2, r'2 \* 2 = 4 to be negative or at least the 100 classes'),
    (0, -1, 'num_tasks=0 must be positive'),
])
def test_settings_without_a_schedule_are_one_line_user_errors(tasks, steps, match):
  with pytest.raises(UserError, match=match) as error:
    gaussian_schedule.label_sets(num_classes=100, num_tasks=tasks,
                                 steps_per_task=steps, seed=0)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('steps, mean_size', [(-1, 50.17), (5, 12.03)])
def test_label_set_sizes_follow_the_gaussian_sums(steps, mean_size):
  probs = _expected_probs(steps)
  expected = probs.sum(axis=1)  # Mean size of each episode's set.
  spread = np.sqrt((probs * (1 - probs)).sum(axis=1))
  assert expected.mean() == pytest.approx(mean_size, abs=0.01)
  # Mid-stream, the sum of bumps 2 episodes apart ~ the integral of one bump / 2,
  # over the 100 episodes on either side that hold peaks.
  width = 50 / abs(steps)
  assert expected[100] == pytest.approx(
      np.sqrt(2 * np.pi) * width / 2 * math.erf(100 / (width * np.sqrt(2))), rel=1e-3)
  sets = _sets(steps)
  sizes = np.array([len(s) for s in sets])
  assert len(sets) == 200 and sizes.min() >= 1
  for s in sets:
    assert s.dtype == np.int32 and (np.diff(s) > 0).all()
    assert 0 <= s.min() and s.max() < 100
  assert (np.abs(sizes - expected) <= 6 * spread).all()
  assert abs(sizes.mean() - expected.mean()) <= 5 * np.sqrt((spread**2).sum()) / 200
  assert set(np.concatenate(sets)) == set(range(100))


@pytest.mark.parametrize('steps', [-1, 5])
def test_each_class_rises_and_falls_around_its_peak(steps):
  seeds = 40
  freq = np.mean([_membership(_sets(steps, seed)) for seed in range(seeds)], axis=0)
  probs = _expected_probs(steps)  # Sets are non-empty anyway: p(empty) < 1e-10.
  # Every class is drawn with its own probability, independently of the seed.
  assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / seeds) + 3 / seeds).all()
  width = 50 / abs(steps)
  for c in range(100):
    peak = 2 * c + 1
    near = freq[max(0, round(peak - width / 4)):round(peak + width / 4) + 1, c].mean()
    assert near > 0.8
    for lo, hi in ((peak - 2 * width, peak - 1.5 * width), (peak + 1.5 * width, peak + 2 * width)):
      window = freq[max(0, round(lo)):max(0, round(hi) + 1), c]
      if len(window):  # Rising before the peak, falling after it.
        assert window.mean() < near / 2
    # Its set membership centres on the peak as far as the stream allows.
    centre = (freq[:, c] * _EPISODES).sum() / freq[:, c].sum()
    expected = (probs[:, c] * _EPISODES).sum() / probs[:, c].sum()
    assert abs(centre - expected) < width / 10 + 1


def test_empty_sets_are_drawn_again():
  # Width 3 batches, episodes 5 batches apart: an even episode sits 5 from both
  # neighbouring peaks, p = exp(-25 / 18) each, and is empty with p(0) = (1 - p)^2.
  p = np.exp(-25 / 18)
  sets = [s for seed in range(10) for s in _sets(5, seed, width=3.0)]
  sizes = np.array([len(s) for s in sets])
  assert sizes.min() >= 1
  even = np.array([len(s) for seed in range(10) for e, s in enumerate(_sets(5, seed, width=3.0))
                   if e % 2 == 0 and 0 < e < 198])
  # Given non-empty: both neighbours with p^2 / (1 - (1 - p)^2) = 0.142.
  both = p**2 / (1 - (1 - p)**2)
  assert abs((even == 2).mean() - both) < 5 * np.sqrt(both * (1 - both) / len(even))
  with pytest.raises(UserError, match='too far from every class peak'):
    _sets(5, width=1.0)  # p = 4e-6 at every even episode.


def test_same_seed_same_schedule_other_seed_differs_class_order_renames():
  a, b, c = _sets(5, seed=4), _sets(5, seed=4), _sets(5, seed=5)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  # class_order[j] owns peak j: the same draws, classes renamed.
  order = np.random.default_rng(7).permutation(100)
  renamed = _sets(5, seed=4, class_order=order)
  for x, y in zip(a, renamed):
    np.testing.assert_array_equal(np.sort(order[x]), y)
