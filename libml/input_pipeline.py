"""Continual-learning input pipeline: per-task train streams and eval sets.

`create_benchmark(config)` returns a `Benchmark`. Everything random is a pure
function of `config.seed` and (task, epoch, record), so `train_dataset(task,
start_step)` yields exactly the batches an uninterrupted run yields from
`start_step` on: a resumed run sees the same data. A task's training records
are read once into host memory and replayed in seeded orders; skipping steps
costs nothing (the Gaussian schedule's episodes, overlapping class subsets of
one split, share a single read of all their records). They are kept decoded where every image has one stored shape
and they fit in `decoded_train_mb`, else encoded and decoded at every use.
Eval sets are read in record order, every example once, padded to whole
batches with `mask` False; decoded test images are kept between evaluations
up to `decoded_cache_mb`.

On several hosts, every host plans the global batches (all hosts' devices)
and prepares only its own slice of each: host h's batch i is the h-th block
of `num_local_devices * per_device_batch_size` examples of global batch i, so
a run's batches do not depend on how its devices are spread over hosts.
"""

import dataclasses
import math

import jax
import numpy as np
import tensorflow as tf

from libml import augment
from libml import benchmarks
from libml import device_preprocess
from libml import preprocess
from libml import record_sources
from libml import replay
from libml.errors import UserError

# The tf.data functions here have no Python control flow on tensors; tracing
# them directly skips autograph's source rewriting (seconds per pipeline).
_no_autograph = tf.autograph.experimental.do_not_convert

# Seeds of the different random choices, so that they never coincide.
_SHUFFLE, _SUBSAMPLE, _AUGMENT, _MIX = range(4)
_EVAL_AUGMENT = 100  # Test images' augmentation; apart from those above.


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([seed % 2**32, *keys])


def _shuffle_order(n: int, buffer_size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Order of n records after a shuffle with a sliding buffer of buffer_size.

  A buffer of at least n (or <= 0) gives a uniform permutation. A smaller one
  mixes only nearby records, as tf.data's shuffle does.
  """
  if buffer_size <= 0 or buffer_size >= n:
    return rng.permutation(n)
  order = np.empty(n, np.int64)
  buffer, upcoming = list(range(buffer_size)), buffer_size
  for i, draw in enumerate(rng.random(n)):
    j = int(draw * len(buffer))
    order[i] = buffer[j]
    if upcoming < n:
      buffer[j], upcoming = upcoming, upcoming + 1
    else:
      buffer[j] = buffer[-1]
      buffer.pop()
  return order


class Benchmark:
  """Data of one continual-learning run, as seen by this host.

  Attributes:
    name: benchmark name (config.dataset).
    num_classes: size of the shared head.
    num_tasks: number of tasks (episodes for the Gaussian schedule).
    class_masks: per task, sorted int32 head ids trained in that task.
    num_train_examples: per task, this host's share of the training examples
      (the task's examples divided by the number of hosts, rounded down).
    num_eval_sets: number of eval sets.
    device_preprocess: how the steps build the network input from the stored
      images the batches hold, or None when the batches hold network inputs.
  """

  def __init__(self, layout: benchmarks.Layout,
               source: record_sources.RecordSources, config, *,
               num_local_devices: int, process_index: int,
               process_count: int):
    self.name = layout.name
    self.num_classes = layout.num_classes
    self.num_tasks = len(layout.train)
    self.class_masks = layout.class_masks
    self.num_eval_sets = len(layout.eval_sets)
    self._layout, self._source = layout, source
    self._host, self._hosts = process_index, process_count
    self._num_devices = num_local_devices
    self._batch = config.per_device_batch_size
    self._local_batch = num_local_devices * config.per_device_batch_size
    self._global_batch = self._local_batch * process_count
    self._seed = config.seed
    self._num_epochs = config.num_epochs
    self._shuffle_buffer = config.shuffle_buffer_size
    self._subsample_rate = config.subsample_rate
    self._steps_per_task = config.continual.num_train_steps_per_task
    self._input_size = config.input_size
    self._resize_size = config.resize_size
    self._norm_01 = config.norm_01
    # Test images through the training augmentation: None takes the
    # benchmark's choice (the original's: CORe50 only).
    eval_augment = config.eval_with_train_augment
    self._eval_augment = (layout.eval_augment if eval_augment is None
                          else bool(eval_augment))
    continual = config.continual
    self._replay_per_class = continual.replay.num_samples_per_class
    self._include_new_task = continual.replay.include_new_task
    self._review = continual.review_trick
    self._review_last_only = continual.review_last_only
    self._review_steps = continual.num_review_steps
    self._review_epochs = continual.num_review_epochs
    # The extra augmentations (config.augment): per image after the crop and
    # flip, and mixup / cutmix per device batch, on the host.
    self._extra = augment.image_fn(config.augment)
    self._normalize_extra = (augment.normalize_fn(config.augment)
                             if augment.enabled(config.augment) else None)
    self._mix = augment.mix_fn(config.augment)
    custom = augment.enabled(config.augment) or self._mix is not None
    self._cache = None
    self._kept_cache = {}  # task -> (ids, records, decoded) of this host's kept examples.
    self._eval_cache, self._eval_cache_bytes = {}, 0
    self._eval_cache_budget = config.decoded_cache_mb * 2**20
    self._train_budget = config.decoded_train_mb * 2**20
    parts = list(layout.train) + list(layout.eval_sets)
    # Images of one stored shape are decoded once; others at every use.
    self._one_shape = {part: source.image_shape(part) is not None
                       for part in parts}
    self.device_preprocess = None
    # Replay batches join examples of every task: their stored shapes must agree.
    one_train_shape = len({source.image_shape(p) for p in layout.train}) == 1
    if (config.preprocess_on_device and all(self._one_shape.values()) and
        (one_train_shape or not self.rehearsal) and not custom):
      max_values = {source.max_value(part) for part in parts}
      if len(max_values) != 1:
        raise ValueError(f'{self.name} stores pixels on several scales: '
                         f'{sorted(max_values)}')
      self.device_preprocess = device_preprocess.DevicePreprocess(
          input_size=self._input_size, resize_size=self._resize_size,
          augment=layout.augment, max_value=max_values.pop(),
          norm_01=self._norm_01)
    # Every host keeps the record ids of all hosts: it plans the global batches.
    self._train_ids = [self._task_train_ids(t) for t in range(self.num_tasks)]
    self.num_train_examples = [len(ids) // self._hosts
                               for ids in self._train_ids]
    # Gaussian episodes share their records: loaded once for all of them.
    self._shared_ids = (np.unique(np.concatenate(self._train_ids))
                        if layout.episodes else None)
    for task, count in enumerate(self.num_train_examples):
      if count == 0:
        raise UserError(f'task {task} of {self.name} has no training examples '
                        'on this host: raise subsample_rate or check the data')
      if self._review and self.num_review_steps(task) == 0 and not (
          self._review_last_only and task < self.num_tasks - 1):
        raise UserError(f'the review session of task {task} has no step at '
                        f'the global batch of {self._global_batch}: raise '
                        'continual.num_review_epochs or set '
                        'continual.num_review_steps')

  @property
  def rehearsal(self) -> bool:
    """Whether the run keeps a rehearsal buffer (see `libml.replay`)."""
    return self._replay_per_class > 0

  # --- Which records. -------------------------------------------------------

  def _task_train_ids(self, task: int) -> np.ndarray:
    ids = self._source.select(self._layout.train[task])
    if self._subsample_rate != -1:  # In (0, 1]: validation.check_data.
      keep = round(self._subsample_rate * len(ids))
      rng = _rng(self._seed, _SUBSAMPLE, task)
      ids = np.sort(rng.choice(ids, size=keep, replace=False))
    return ids

  # --- Steps. ---------------------------------------------------------------

  def steps_per_epoch(self, task: int) -> int:
    """Global batches of the task's examples (all hosts'), at least 1.

    Gaussian schedule with num_train_steps_per_task > 0: that many, as the
    original, which then counts an episode as steps * global batch examples.
    """
    if self._layout.episodes and self._steps_per_task > 0:
      return self._steps_per_task
    return max(1, len(self._train_ids[task]) // self._global_batch)

  def num_train_steps(self, task: int) -> int:
    """num_epochs epochs; split benchmarks: num_train_steps_per_task if > 0."""
    if self._layout.episodes:  # Gaussian: always whole epochs.
      return self.steps_per_epoch(task) * self._num_epochs
    if self._steps_per_task > 0:
      return self._steps_per_task
    return self.steps_per_epoch(task) * self._num_epochs

  def _review_epoch_steps(self, task: int) -> int:
    """Steps per epoch of the task's review session (0 without one)."""
    if not self._review or (self._review_last_only and
                            task < self.num_tasks - 1):
      return 0
    steps = self._review_steps
    if steps <= 0:  # Epochs over one task's worth of kept examples.
      kept = self._replay_per_class * len(self.class_masks[task])
      steps = kept * self._review_epochs // self._global_batch
    return steps // self._review_epochs

  def num_review_steps(self, task: int) -> int:
    """Steps of the review session after the task's training (0: none).

    `num_review_steps` (or, when -1, `num_review_epochs` passes over one
    task's worth of kept examples) rounded down to whole review epochs, as
    the original; with `review_last_only`, the last task's only.
    """
    return self._review_epoch_steps(task) * self._review_epochs

  def review_eval_every(self, task: int) -> int:
    """Review steps between evaluations: about five per session, as the
    original (every num_review_epochs // 5 review epochs, at least one)."""
    return self._review_epoch_steps(task) * max(1, self._review_epochs // 5)

  def num_steps(self, task: int) -> int:
    """Steps of the whole task: training, then the review session."""
    return self.num_train_steps(task) + self.num_review_steps(task)

  # --- Training. ------------------------------------------------------------

  def _train_part(self, task: int) -> tuple[benchmarks.Part, np.ndarray]:
    """The task's Part and its record ids (all hosts')."""
    return self._layout.train[task], self._train_ids[task]

  def _loaded_part(self, task: int) -> tuple[benchmarks.Part, np.ndarray]:
    """The Part and record ids `_train_records` loads for the task.

    The task's own, or for Gaussian episodes the records of every episode.
    """
    part, ids = self._train_part(task)
    if self._shared_ids is None:
      return part, ids
    return dataclasses.replace(part, classes=None), self._shared_ids

  def _train_decoded(self, task: int) -> bool:
    """Whether the task's training images are kept decoded.

    They are when they all have one stored shape and their pixels fit in
    `decoded_train_mb`; otherwise they stay encoded and are decoded at every use.
    """
    part = self._train_part(task)[0]
    loaded = len(self._loaded_part(task)[1])
    return (self._one_shape[part] and
            loaded * self._source.pixel_bytes(part) <= self._train_budget)

  def _train_records(self, task: int) -> dict:
    """The records `_loaded_part` names, decoded where they can be.

    They are kept until a task needs other records.
    """
    part, ids = self._loaded_part(task)
    key = (part, ids.tobytes())
    if self._cache is None or self._cache[0] != key:
      self._cache = None  # Frees the previous task's records first.
      self._cache = (key, self._source.load(
          part, ids, decoded=self._train_decoded(task)))
    return self._cache[1]

  def _own_slices(self, stream: np.ndarray) -> np.ndarray:
    """This host's block of each global batch of `stream` [steps * global]."""
    lo = self._host * self._local_batch
    batches = stream.reshape(-1, self._global_batch)
    return batches[:, lo:lo + self._local_batch].reshape(-1)

  def _stream(self, task: int, first_step: int, num_steps: int):
    """Rows (into the task's records) and augmentation keys of the global
    batches of steps [first_step, num_steps), all hosts' (int64 [n] each)."""
    if first_step == num_steps:
      return np.zeros([0], np.int64), np.zeros([0], np.int64)
    part, ids = self._train_part(task)
    split_size = self._source.split_size(part)
    steps_per_epoch = self.steps_per_epoch(task)
    need = steps_per_epoch * self._global_batch
    rows, keys = [], []
    for epoch in range(first_step // steps_per_epoch,
                       math.ceil(num_steps / steps_per_epoch)):
      rng = _rng(self._seed, _SHUFFLE, task, epoch)
      # Drops the remainder; cycles when the task is smaller than one step.
      order = np.concatenate([
          _shuffle_order(len(ids), self._shuffle_buffer, rng)
          for _ in range(math.ceil(need / len(ids)))])[:need]
      rows.append(order)
      # Key = (epoch, record): the same on every run and after a resume.
      keys.append(epoch * split_size + ids[order])
    skip = (first_step % steps_per_epoch) * self._global_batch
    end = (num_steps - first_step) * self._global_batch + skip
    return np.concatenate(rows)[skip:end], np.concatenate(keys)[skip:end]

  def _prepare_fn(self, task: int, decoded: bool, with_key: bool = False):
    """Function: (image as held, label, key) -> the batch entries of one
    training example of `task` (its augmentation seeded by (task, key));
    `with_key` keeps the key too, as 'key'."""
    task_seed = int(_rng(self._seed, _AUGMENT, task).integers(2**62))
    part = self._train_part(task)[0]
    to_pixels = self._pixels(part, decoded)
    transform = self._augment_fn(part, train=True)

    @_no_autograph
    def prepare(image, label, key):
      seed = tf.stack([tf.constant(task_seed, tf.int64), key])
      out = {**transform(to_pixels(image), seed), 'label': label}
      return {**out, 'key': key} if with_key else out

    return prepare

  def _mixed(self, ds: tf.data.Dataset, task: int) -> tf.data.Dataset:
    """Mixup / cutmix within each device's batch of `ds` (examples with
    'key'), seeded by (task, the key of the batch's first example); drops
    'key'."""
    mix_seed = int(_rng(self._seed, _MIX, task).integers(2**62))

    @_no_autograph
    def mix(batch):
      seed = tf.stack([tf.constant(mix_seed, tf.int64), batch['key'][0]])
      return self._mix({k: v for k, v in batch.items() if k != 'key'}, seed)

    ds = ds.batch(self._batch, drop_remainder=True)
    return ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

  def train_dataset(self, task: int, start_step: int = 0,
                    buffer: replay.Buffer | None = None) -> tf.data.Dataset:
    """Batches of `task` from `start_step` on, identical to an unbroken run.

    Args:
      task: the task.
      start_step: the first training step to yield the batch of.
      buffer: the rehearsal buffer (with the task's kept examples), or None.
        From task 1 on, each batch is then joined by a replay batch drawn
        from it (unless the run keeps replay for its review sessions).

    Yields:
      {'image': float32 [devices, per_device_batch, H, W, 3],
       'label': int32 [devices, per_device_batch]}; with `device_preprocess`,
      'image' holds the stored pixels [devices, per_device_batch, h, w, c]
      and, when augmenting, 'crop' int32 [devices, per_device_batch, 4] and
      'flip' bool [devices, per_device_batch] (see `preprocess.random_window`).
      With mixup or cutmix, 'mix_label' int32 and 'mix_weight' float32 (see
      `augment.mix_fn`). With replay, every entry holds 2 x per_device_batch
      examples per device, the replayed ones last (never mixed: weight 1),
      and 'replayed' bool marks them.
    """
    num_steps = self.num_train_steps(task)
    if not 0 <= start_step <= num_steps:
      raise ValueError(f'start_step {start_step} outside [0, {num_steps}]')
    rows, keys = (self._own_slices(x)
                  for x in self._stream(task, start_step, num_steps))
    if self._shared_ids is not None:  # Rows of the task's ids -> loaded rows.
      rows = np.searchsorted(self._shared_ids, self._train_ids[task][rows])
    records = self._train_records(task)
    ds = record_sources.replay(records, rows, keys)
    mixing = self._mix is not None
    ds = ds.map(self._prepare_fn(task, self._train_decoded(task), mixing),
                num_parallel_calls=tf.data.AUTOTUNE)
    if mixing:
      ds = self._mixed(ds, task)
    ds = self._per_device(ds)
    if buffer is not None and task > 0 and not self._review:
      replayed = self._replay_batches(task, buffer, range(start_step, num_steps),
                                      include_new_task=self._include_new_task)
      ds = tf.data.Dataset.zip(ds, replayed).map(_no_autograph(_join))
    return ds.prefetch(tf.data.AUTOTUNE)

  def review_dataset(self, task: int, buffer: replay.Buffer,
                     start_step: int = 0) -> tf.data.Dataset:
    """Batches of the task's review session from its step `start_step` on:
    replay batches alone, drawn from the whole buffer.

    Yields:
      As `train_dataset` without replay, plus 'replayed' (all True).
    """
    first = self.num_train_steps(task)
    steps = range(first + start_step, first + self.num_review_steps(task))
    ds = self._replay_batches(task, buffer, steps, include_new_task=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  # --- Replay. --------------------------------------------------------------

  def kept_examples(self, task: int):
    """The examples `task` keeps for replay (all hosts'): random positions of
    its first pass that training reaches (see `libml.replay`).

    Returns:
      (ids, keys, positions), int64 [n] each: record ids, augmentation keys
      and stream positions.
    """
    reached = min(self.num_train_steps(task), self.steps_per_epoch(task))
    size = reached * self._global_batch
    positions = replay.kept_positions(
        self._seed, task, stream_size=size,
        count=self._replay_per_class * len(self.class_masks[task]))
    rows, keys = self._stream(task, 0, reached)
    return self._train_ids[task][rows[positions]], keys[positions], positions

  def _kept_records(self, task: int, ids: np.ndarray):
    """(records, decoded): the images and labels of records `ids` of `task`,
    taken from the task's loaded records, or read when a run resumes."""
    cached = self._kept_cache.get(task)
    if cached is not None and np.array_equal(cached[0], ids):
      return cached[1:]
    part, loaded_ids = self._loaded_part(task)
    if self._cache is not None and self._cache[0] == (part, loaded_ids.tobytes()):
      loaded, decoded = self._cache[1], self._train_decoded(task)
      rows = np.searchsorted(loaded_ids, ids)
    else:
      unique = np.unique(ids)
      decoded = self._one_shape[part]
      loaded = self._source.load(part, unique, decoded=decoded)
      rows = np.searchsorted(unique, ids)
    records = {'image': tf.gather(loaded['image'], rows),
               'label': np.asarray(loaded['label'])[rows]}
    self._kept_cache[task] = (ids, records, decoded)
    return records, decoded

  def _replay_batches(self, task: int, buffer: replay.Buffer, steps,
                      *, include_new_task: bool) -> tf.data.Dataset:
    """This host's replay batches of task steps `steps`, from its shard.

    Yields:
      As `train_dataset` without replay, plus 'replayed' (all True).
    """
    shard = replay.host_shard(buffer, host=self._host,
                              global_batch=self._global_batch,
                              local_batch=self._local_batch)
    picks = np.concatenate([np.zeros([0], np.int64)] + [
        replay.draw(self._seed, task, step, self._host,
                    available_count=replay.available(
                        shard, task, step, include_new_task=include_new_task,
                        global_batch=self._global_batch),
                    size=self._local_batch) for step in steps])
    source_task = shard.task[picks]
    datasets, choice = [], np.zeros(len(picks), np.int64)
    for i, t in enumerate(np.unique(source_task)):
      first = int(np.argmax(shard.task == t))  # The task's block in the shard.
      block = shard.ids[shard.task == t]
      records, decoded = self._kept_records(int(t), block)
      mine = source_task == t
      choice[mine] = i
      ds = record_sources.replay(records, picks[mine] - first,
                                 shard.keys[picks[mine]])
      datasets.append(ds.map(self._prepare_fn(int(t), decoded),
                             num_parallel_calls=tf.data.AUTOTUNE))
    if not datasets:
      raise ValueError(f'task {task} replays no step')
    ds = tf.data.Dataset.choose_from_datasets(
        datasets, tf.data.Dataset.from_tensor_slices(choice))
    return self._per_device(ds).map(_no_autograph(
        lambda b: {**b, 'replayed': tf.ones_like(b['label'], tf.bool)}))

  # --- Evaluation. ----------------------------------------------------------

  def eval_dataset(self, eval_set: int) -> tf.data.Dataset:
    """This host's share of eval set `eval_set`, every example once.

    Yields:
      {'image': float32 [devices, per_device_batch, H, W, 3],
       'label': int32 [devices, per_device_batch],
       'mask': bool [devices, per_device_batch] (False on padding)}; with
      `device_preprocess`, 'image' holds the stored pixels.
    All hosts yield the same number of batches: this host's blocks of the
    global batches of the eval set in record order, padded at the end.
    Test images get the central crop, or with `eval_with_train_augment` the
    training augmentation (then 'crop' and 'flip' too, as `train_dataset`),
    keyed by (seed, record): the same augmented images at every evaluation,
    on every run and host layout.
    """
    part = self._layout.eval_sets[eval_set]
    ids = self._source.select(part)
    if not len(ids):
      raise UserError(f'eval set {eval_set} of {self.name} is empty: check the '
                      'prepared data')
    num_batches = math.ceil(len(ids) / self._global_batch)
    total = num_batches * self._local_batch
    # Padding comes last globally, so this host's real examples come first.
    owner = np.arange(len(ids)) // self._local_batch % self._hosts
    local_ids = ids[owner == self._host]
    records = self._eval_records(eval_set, local_ids)
    to_pixels = self._pixels(part, records is not None)
    if self._eval_augment:
      transform = self._augment_fn(part, train=False)
    else:
      transform = self._central_fn(part)
    eval_seed = int(_rng(self._seed, _EVAL_AUGMENT).integers(2**62))

    @_no_autograph
    def prepare(example, key):
      seed = tf.stack([tf.constant(eval_seed, tf.int64), key])
      return {**transform(to_pixels(example['image']), seed),
              'label': example['label'], 'mask': tf.constant(True)}

    if records is None:
      ds = self._source.stream(part, local_ids)
    else:
      ds = tf.data.Dataset.from_tensor_slices(
          {'image': records['image'], 'label': records['label']})
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(local_ids))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    padding = {k: tf.zeros(v.shape, v.dtype)
               for k, v in ds.element_spec.items()}
    if 'crop' in padding:  # The whole image: a valid window.
      padding['crop'] = tf.constant([0, 0, self._resize_size,
                                     self._resize_size], tf.int32)
    ds = ds.concatenate(
        tf.data.Dataset.from_tensors(padding).repeat(total - len(local_ids)))
    return self._per_device(ds).prefetch(tf.data.AUTOTUNE)

  def _pixels(self, part: benchmarks.Part, decoded: bool):
    """Function: image as held (decoded or not) -> its pixels as stored."""
    if decoded:
      return tf.identity
    pixels, shape = (self._source.pixel_decoder(part),
                     self._source.image_shape(part))
    if shape is None:  # Sizes vary (ImageNet-R).
      return pixels
    return lambda image: tf.ensure_shape(pixels(image), shape)

  def _augment_fn(self, part: benchmarks.Part, train: bool):
    """Function: (stored pixels, seed) -> batch entries of the training input.

    On the host, {'image': the network input}: resize, truncate, random
    resized crop, flip (`preprocess.train_image`), then in training the extra
    augmentations of `config.augment` (test images through the training crop
    get their normalisation only). With `device_preprocess`, {'image': the
    stored pixels, 'crop': window, 'flip': flip} for the steps to finish
    ('image' only where the benchmark does not augment).
    """
    max_value = self._source.max_value(part)
    resize_only = not self._layout.augment

    def transform(pixels, seed):
      if self.device_preprocess is not None:
        if resize_only:
          return {'image': pixels}
        window, flip = preprocess.random_window(seed, self._resize_size)
        return {'image': pixels, 'crop': window, 'flip': flip}
      image = preprocess.train_image(
          pixels, seed, resize_size=self._resize_size,
          input_size=self._input_size, max_value=max_value,
          resize_only=resize_only)
      if train and self._normalize_extra is not None:
        extra_seed = tf.random.experimental.stateless_fold_in(seed, _AUGMENT)
        return {'image': self._extra(image, extra_seed)}
      return {'image': self._normalized(image)}

    return transform

  def _normalized(self, image: tf.Tensor) -> tf.Tensor:
    """[0, 1] pixels -> the network input's scale: `norm_01`'s, or the
    mean / std of `config.augment` when its per-image augmentation is on."""
    if self._normalize_extra is not None:
      return self._normalize_extra(image)
    return preprocess.normalize(image, self._norm_01)

  def _central_fn(self, part: benchmarks.Part):
    """Function: (stored pixels, seed) -> batch entries of the eval input.

    Resize, truncate, central crop (`preprocess.eval_image`), on the host or,
    with `device_preprocess`, in the steps; the seed is unused.
    """
    max_value = self._source.max_value(part)
    resize_only = not self._layout.augment

    def central(pixels, seed):
      del seed
      if self.device_preprocess is not None:
        return {'image': pixels}
      image = preprocess.eval_image(
          pixels, resize_size=self._resize_size, input_size=self._input_size,
          max_value=max_value, resize_only=resize_only)
      return {'image': self._normalized(image)}

    return central

  def _eval_records(self, eval_set: int, ids: np.ndarray) -> dict | None:
    """Decoded records `ids` of an eval set, kept for later evaluations.

    None when its images vary in size or `decoded_cache_mb` is used up; they
    are then read and decoded at every evaluation.
    """
    if eval_set in self._eval_cache:
      return self._eval_cache[eval_set]
    part = self._layout.eval_sets[eval_set]
    if not self._one_shape[part]:
      return None
    size = len(ids) * self._source.pixel_bytes(part)
    if self._eval_cache_bytes + size > self._eval_cache_budget:
      return None
    records = self._source.load(part, ids, decoded=True)
    self._eval_cache[eval_set] = records
    self._eval_cache_bytes += size
    return records

  def eval_sets_after(self, task: int) -> list[int]:
    return list(self._layout.eval_after[task])

  def eval_set_classes(self, eval_set: int) -> np.ndarray:
    return self._layout.eval_classes[eval_set]

  def _per_device(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """[devices, per_device_batch, ...] batches (one copy, then a reshape)."""
    shape = [self._num_devices, self._batch]
    ds = ds.batch(self._local_batch, drop_remainder=True)
    return ds.map(_no_autograph(lambda batch: {
        k: tf.reshape(v, shape + v.shape[1:]) for k, v in batch.items()}))


def _join(new: dict, replayed: dict) -> dict:
  """A training batch and its replay batch, per device: [devices, 2 x B, ...],
  the replayed examples last ('replayed' marks them)."""
  if 'mix_weight' in new:  # Replayed examples are not mixed.
    replayed = {**replayed, 'mix_label': replayed['label'],
                'mix_weight': tf.ones_like(replayed['label'], tf.float32)}
  joined = {k: tf.concat([new[k], replayed[k]], axis=1) for k in new}
  joined['replayed'] = tf.concat(
      [tf.zeros_like(new['label'], tf.bool), replayed['replayed']], axis=1)
  return joined


def _keep_tensorflow_off_accelerators():
  """tf.data runs on the host; the accelerators belong to JAX."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Already initialised: nothing was placed there yet.
    pass


def create_benchmark(config, *, num_local_devices: int | None = None,
                     process_index: int | None = None,
                     process_count: int | None = None) -> Benchmark:
  """Builds the benchmark that `config.dataset` names (see benchmarks.TABLE).

  Args:
    config: the run's ConfigDict; its settings are assumed to have passed
      `validation.check_data` (sizes, subsample rate, memory budgets).
    num_local_devices: devices fed by this host (default: jax's count).
    process_index: this host's index (default: jax.process_index()).
    process_count: number of hosts (default: jax.process_count()).

  Raises:
    UserError: unknown dataset or task count (`benchmarks.layout`), data not
      prepared, or a task without training examples.
  """
  _keep_tensorflow_off_accelerators()
  num_local_devices = num_local_devices or jax.local_device_count()
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = process_count or jax.process_count()
  layout = benchmarks.layout(config)
  source = record_sources.RecordSources(config.data_dir,
                                        num_classes=layout.num_classes)
  return Benchmark(layout, source, config, num_local_devices=num_local_devices,
                   process_index=process_index, process_count=process_count)
