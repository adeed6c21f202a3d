"""The benchmarks: which records each task trains on and each eval set tests.

`TABLE` maps every `config.dataset` name to a spec; `layout(config)`
resolves a spec against the config (task count, class order, task order,
Gaussian schedule) into a `Layout`, plain data the input pipeline reads.
Head class ids are global: one shared head covers every task.
"""

import dataclasses

import numpy as np

from libml import gaussian_schedule
from libml.errors import UserError


@dataclasses.dataclass(frozen=True)
class Part:
  """Records of one split of one dataset, kept in the split's record order.

  Attributes:
    dataset: TFDS name, or 'digits' for the embedded scikit-learn set.
    split: split name; TFDS split sums such as 's3+s7+s10' are allowed.
    percent: [start, end) slice of the split's records in percent, rounded as
      TFDS rounds 'split[start%:end%]'.
    classes: head class ids kept (other records are dropped); None keeps all.
    label_offset: added to the (ranked) dataset label to give the head id.
    rank_labels: replace each dataset label by its rank among the distinct
      labels of the whole split (ImageNet-R holds 200 of ImageNet's 1000 ids).
  """
  dataset: str
  split: str
  percent: tuple[int, int] = (0, 100)
  classes: tuple[int, ...] | None = None
  label_offset: int = 0
  rank_labels: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
  """A benchmark resolved against one config.

  Attributes:
    name: benchmark name.
    num_classes: size of the shared head.
    train: per task, the records it trains on.
    class_masks: per task, sorted int32 head ids it trains on.
    eval_sets: per eval set, the records it tests on.
    eval_classes: per eval set, sorted int32 head ids it covers.
    eval_after: per task, the eval sets to evaluate after training it.
    augment: random resized crop and flip in training (else resize only).
    eval_augment: the test images get the training augmentation instead of
      the central crop, as the original evaluates CORe50 (the config's
      `eval_with_train_augment` overrides it).
    episodes: the tasks are episodes of the Gaussian schedule: their train
      Parts are one Part restricted to overlapping label sets (the input
      pipeline loads the records of all of them once), and each trains whole
      epochs (num_train_steps_per_task > 0: epochs of that many steps).
  """
  name: str
  num_classes: int
  train: list[Part]
  class_masks: list[np.ndarray]
  eval_sets: list[Part]
  eval_classes: list[np.ndarray]
  eval_after: list[list[int]]
  augment: bool = True
  eval_augment: bool = False
  episodes: bool = False


def _ids(classes) -> np.ndarray:
  return np.sort(np.asarray(classes, np.int32))


def class_order(num_classes: int, rand_seed: int) -> np.ndarray:
  """Label order when rand_seed < 0, else a permutation seeded by rand_seed."""
  if rand_seed < 0:
    return np.arange(num_classes)
  return np.random.default_rng(rand_seed).permutation(num_classes)


def _num_tasks(config, available: int, name: str) -> int:
  num_tasks = config.continual.num_tasks
  if not 0 < num_tasks <= available:
    raise UserError(f'continual.num_tasks={num_tasks} does not fit {name}: '
                    f'choose 1..{available}')
  return num_tasks


@dataclasses.dataclass(frozen=True)
class ClassSplit:
  """Classes of one dataset dealt out to tasks in (optionally seeded) order.

  Attributes:
    train: records to train on (classes are filled in per task).
    test: records to test on.
    num_classes: classes of the dataset, all in the shared head.
    augment: see `Layout.augment`.
  """
  train: Part
  test: Part
  num_classes: int
  augment: bool = True

  def layout(self, name: str, config) -> Layout:
    per_task = config.continual.num_classes_per_task
    num_tasks = config.continual.num_tasks
    if min(per_task, num_tasks) <= 0 or num_tasks * per_task > self.num_classes:
      raise UserError(
          f'continual.num_tasks={num_tasks} x num_classes_per_task={per_task} '
          f'does not fit the {self.num_classes} classes of {name}')
    order = class_order(self.num_classes, config.continual.rand_seed)
    masks = [_ids(order[t * per_task:(t + 1) * per_task])
             for t in range(num_tasks)]
    keep = lambda part, m: dataclasses.replace(part, classes=tuple(m.tolist()))
    return Layout(
        name=name, num_classes=self.num_classes,
        train=[keep(self.train, m) for m in masks], class_masks=masks,
        eval_sets=[keep(self.test, m) for m in masks], eval_classes=masks,
        eval_after=[list(range(t + 1)) for t in range(num_tasks)],
        augment=self.augment)


@dataclasses.dataclass(frozen=True)
class DatasetSequence:
  """One whole dataset per task; labels offset so tasks never share an id.

  Attributes:
    tasks: per task, (train, test) records with offset 0 (set here).
    classes_per_task: classes of every dataset in the sequence.
  """
  tasks: tuple[tuple[Part, Part], ...]
  classes_per_task: int

  def layout(self, name: str, config) -> Layout:
    num_tasks = _num_tasks(config, len(self.tasks), name)
    width = self.classes_per_task
    offset = lambda part, t: dataclasses.replace(part, label_offset=t * width)
    masks = [np.arange(t * width, (t + 1) * width, dtype=np.int32)
             for t in range(num_tasks)]
    return Layout(
        name=name, num_classes=width * len(self.tasks),
        train=[offset(self.tasks[t][0], t) for t in range(num_tasks)],
        class_masks=masks,
        eval_sets=[offset(self.tasks[t][1], t) for t in range(num_tasks)],
        eval_classes=masks,
        eval_after=[list(range(t + 1)) for t in range(num_tasks)])


@dataclasses.dataclass(frozen=True)
class DomainSequence:
  """Every task holds every class (new conditions); one shared test set.

  Attributes:
    train: per task, the records it trains on.
    test: the one test set, evaluated after every task.
    num_classes: classes shared by every task.
    eval_augment: see `Layout.eval_augment`.
  """
  train: tuple[Part, ...]
  test: Part
  num_classes: int
  eval_augment: bool = False

  def layout(self, name: str, config) -> Layout:
    num_tasks = _num_tasks(config, len(self.train), name)
    every = np.arange(self.num_classes, dtype=np.int32)
    return Layout(
        name=name, num_classes=self.num_classes,
        train=list(self.train[:num_tasks]), class_masks=[every] * num_tasks,
        eval_sets=[self.test], eval_classes=[every],
        eval_after=[[0]] * num_tasks, eval_augment=self.eval_augment)


_CORE50_TRAIN_SESSIONS = (1, 2, 4, 5, 6, 8, 9, 11)

TABLE = {
    'cifar100': ClassSplit(
        train=Part('cifar100', 'train'), test=Part('cifar100', 'test'),
        num_classes=100),
    '5datasets': DatasetSequence(
        tasks=(
            (Part('cifar10', 'train'), Part('cifar10', 'test')),
            (Part('mnist', 'train'), Part('mnist', 'test')),
            (Part('svhn_cropped', 'train'), Part('svhn_cropped', 'test')),
            # notMNIST ships one split; 80/20 in record order, as the original.
            (Part('not_mnist', 'train', (0, 80)),
             Part('not_mnist', 'train', (80, 100))),
            (Part('fashion_mnist', 'train'), Part('fashion_mnist', 'test')),
        ),
        classes_per_task=10),
    # The original reads the test sessions through its training pipeline:
    # random resized crop and flip (its 78.33 comes from that).
    'core50': DomainSequence(
        train=tuple(Part('core50', f's{s}') for s in _CORE50_TRAIN_SESSIONS),
        test=Part('core50', 's3+s7+s10'), num_classes=50, eval_augment=True),
    # ImageNet-R ships one split 'test'; 80/20 in record order, as the original.
    'imagenet_r': ClassSplit(
        train=Part('imagenet_r', 'test', (0, 80), rank_labels=True),
        test=Part('imagenet_r', 'test', (80, 100), rank_labels=True),
        num_classes=200),
    # Tiny 8x8 digits: cropping would cut strokes away, so resize only.
    'digits': ClassSplit(
        train=Part('digits', 'train'), test=Part('digits', 'test'),
        num_classes=10, augment=False),
}


def _reverse(layout: Layout) -> Layout:
  """Same benchmark with the task order reversed (eval sets follow tasks)."""
  per_task_eval = len(layout.eval_sets) == len(layout.train) > 1
  return dataclasses.replace(
      layout, train=layout.train[::-1], class_masks=layout.class_masks[::-1],
      eval_sets=layout.eval_sets[::-1] if per_task_eval else layout.eval_sets,
      eval_classes=(layout.eval_classes[::-1] if per_task_eval
                    else layout.eval_classes))


def _gaussian(name: str, spec: ClassSplit, config) -> Layout:
  """Episodes of the Gaussian schedule, each a class split of the train split.

  Episode e trains on every train record of its label set (see
  `gaussian_schedule`); the whole test set is evaluated after every 10th
  episode and after the last.
  """
  num_episodes = config.continual.num_tasks
  order = class_order(spec.num_classes, config.continual.rand_seed)
  sets = gaussian_schedule.label_sets(
      num_classes=spec.num_classes, num_tasks=num_episodes,
      steps_per_task=config.continual.num_train_steps_per_task,
      seed=config.seed, class_order=order)
  keep = lambda s: dataclasses.replace(spec.train, classes=tuple(s.tolist()))
  every = np.arange(spec.num_classes, dtype=np.int32)
  last = num_episodes - 1
  return Layout(
      name=name, num_classes=spec.num_classes,
      train=[keep(s) for s in sets], class_masks=sets,
      eval_sets=[spec.test], eval_classes=[every],
      eval_after=[[0] if (e + 1) % 10 == 0 or e == last else []
                  for e in range(num_episodes)],
      augment=spec.augment, episodes=True)


def layout(config) -> Layout:
  """Resolves `config.dataset` (and the continual settings) into a Layout."""
  name = config.dataset
  if name not in TABLE:
    raise UserError(f'unknown dataset {name!r}: choose one of '
                    f'{", ".join(sorted(TABLE))}')
  spec = TABLE[name]
  if config.gaussian_schedule:
    if not isinstance(spec, ClassSplit):
      raise UserError(f'gaussian_schedule needs a class-split dataset, not '
                      f'{name!r}: use cifar100')
    result = _gaussian(name, spec, config)
  else:
    result = spec.layout(name, config)
    if config.reverse_task:
      result = _reverse(result)
  return result
