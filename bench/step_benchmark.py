"""Times the real train and eval steps on generated data; prints a table and writes JSON.

  python bench/step_benchmark.py --config cifar100_l2p --global_batch 128 \
      --dtype bfloat16 --attention_impl fused --peak_tflops 989 --json_out l2p.json

Needs jax, flax, optax and ml_collections only (no TensorFlow): the model, query model,
optimizer and train state are built here with random parameters, and the steps of
`libml.steps` run under `jax.pmap` with a donated state, as in training. Batches are
[devices, global_batch / devices, H, W, 3] and live on the devices; the prompt vote still
groups `per_device_batch_size` images of the config. FLOPs per image come from the
analytic count of `bench/flops.py`; MFU = FLOPs per image x images/s / (peak x devices).
With --source_size S the batches hold what the input pipeline sends when
`preprocess_on_device` applies (uint8 S x S images, crop windows and flips) and the timed
steps include building the network input from them on the devices.
Peak memory is the device's highest use so far in the process; the measurements run in the
order train 'trainable', train 'full', eval, so each figure bounds its own step's.
"""

import functools
import importlib
import json
import os
import shlex
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax
import jax
import jax.numpy as jnp
import numpy as np

from bench import flops
from libml import device_preprocess
from libml import optim
from libml import steps
from libml import train_state
from libml.errors import UserError
from models import factory

_CONFIG = flags.DEFINE_string("config", "cifar100_l2p", "Config name in configs/ (e.g. cifar100_l2p, imr_dualprompt).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "ViT variant; default: the config's.")
_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Image side in pixels.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", None, "Images per step over all devices; "
                                     "default: per_device_batch_size x devices.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype; default: the config's.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, ["xla", "fused", "cudnn"], "Attention kernel; default: the config's.")
_CLIP_MODE = flags.DEFINE_enum("clip_mode", "both", ["full", "trainable", "both"], "Gradient clipping mode(s).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before timing (the first compiles).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device in --dtype, for MFU.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 100, "Outputs of the classifier head.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 0, "0: batches hold network inputs; S > 0: they hold stored "
                                    "uint8 S x S images and crop windows, resized on the devices.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON to this path.")


def load_config(name: str):
  """The config `configs/<name>.py` (a path or a bare name) with the flag overrides."""
  name = os.path.splitext(os.path.basename(name))[0]
  try:
    config = importlib.import_module(f"configs.{name}").get_config()
  except ModuleNotFoundError as e:
    if e.name != f"configs.{name}":
      raise
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
    raise UserError(f"Unknown --config {name!r}; valid: {', '.join(names)}.") from None
  config.model_name = _MODEL_NAME.value or config.model_name
  config.input_size = _INPUT_SIZE.value
  config.dtype = _DTYPE.value or config.dtype
  config.attention_impl = _ATTENTION.value or config.attention_impl
  return config


def generated_batch(rng, per_device: int, input_size: int, num_labels: int) -> dict:
  """Device-resident {'image': [n, b, s, s, 3] in [0, 1), 'label': [n, b] int32, 'mask': all True}."""
  def make(key):
    image_key, label_key = jax.random.split(key)
    return {"image": jax.random.uniform(image_key, (per_device, input_size, input_size, 3)),
            "label": jax.random.randint(label_key, (per_device,), 0, num_labels),
            "mask": jnp.ones((per_device,), bool)}
  return jax.pmap(make)(jax.random.split(rng, jax.local_device_count()))


def generated_source_batch(rng: np.random.Generator, per_device: int, source_size: int, resize_size: int,
                           num_labels: int) -> dict:
  """Device-resident stored images and crops, as the pipeline sends them for on-device preprocessing.

  Returns:
    {'image': uint8 [n, b, s, s, 3], 'crop': int32 [n, b, 4] windows of the resize_size square,
     'flip': bool [n, b], 'label': [n, b] int32, 'mask': all True}.
  """
  shape = (jax.local_device_count(), per_device)
  height = rng.integers(resize_size // 4, resize_size + 1, shape)
  width = rng.integers(resize_size // 4, resize_size + 1, shape)
  top, left = (rng.integers(0, resize_size - n + 1) for n in (height, width))
  batch = {"image": rng.integers(0, 256, shape + (source_size, source_size, 3), np.uint8),
           "crop": np.stack([top, left, height, width], -1).astype(np.int32),
           "flip": rng.random(shape) < 0.5,
           "label": rng.integers(0, num_labels, shape).astype(np.int32),
           "mask": np.ones(shape, bool)}
  return next(steps.device_batches(iter([batch])))


def time_steps(step, carry, warmup: int, num_steps: int):
  """Runs `carry = step(carry)` warmup + num_steps times, blocking after each.

  Returns:
    (seconds of each timed step, final carry).
  """
  seconds = []
  for i in range(warmup + num_steps):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    if i >= warmup:
      seconds.append(time.perf_counter() - start)
  return seconds, carry


def peak_memory_bytes():
  """Highest device memory in use so far in this process, or None where not reported."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def summarize(seconds, global_batch: int, flops_per_image: int, peak_tflops) -> dict:
  """Throughput figures of one timed step."""
  median = statistics.median(seconds)
  images_per_s = global_batch / median
  achieved = flops_per_image * images_per_s / 1e12
  peak = peak_tflops * jax.device_count() if peak_tflops else None
  return {"ms_per_step_median": 1e3 * median, "ms_per_step_mean": 1e3 * statistics.mean(seconds),
          "images_per_s": images_per_s, "achieved_tflops_per_s": achieved,
          "mfu": achieved / peak if peak else None, "peak_memory_bytes": peak_memory_bytes()}


def random_params(model, input_size: int, seed: int):
  """Parameters of `model` drawn from N(0, 0.02^2), as host numpy arrays.

  The step's speed does not depend on the values, and this skips compiling the
  initializers (which takes longer than compiling the train step on CPU).
  """
  shapes = factory.param_shapes(model, input_size)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype), shapes)


class Bench:
  """The models, parameters, data and per-task arrays shared by every measurement."""

  def __init__(self, config, global_batch: int, num_classes: int, *, warmup: int, num_steps: int,
               source_size: int = 0):
    self.config, self.global_batch = config, global_batch
    self.warmup, self.num_steps = warmup, num_steps
    self.model = factory.create_model(config, num_classes)
    self.query_model = factory.create_query_model(config, num_classes)
    init_rng, data_rng, self.dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    self.params = random_params(self.model, config.input_size, config.seed)
    query_keys = factory.param_shapes(self.query_model, config.input_size).keys()
    self.query_params = steps.replicate({k: self.params[k] for k in query_keys})
    task_classes = min(config.continual.num_classes_per_task, num_classes)
    per_device = global_batch // jax.device_count()
    self.preprocess = None
    if source_size:
      resize_size = max(config.resize_size, config.input_size)
      self.preprocess = device_preprocess.DevicePreprocess(
          input_size=config.input_size, resize_size=resize_size, augment=True, max_value=255.0,
          norm_01=config.norm_01)
      self.batch = generated_source_batch(np.random.default_rng(config.seed), per_device, source_size,
                                          resize_size, task_classes)
    else:
      self.batch = generated_batch(data_rng, per_device, config.input_size, task_classes)
    # Test batches carry no crop window or flip: the central crop, as the configs evaluate.
    self.eval_batch = {k: v for k, v in self.batch.items() if k not in ("crop", "flip")}
    method = self.model.method
    self.method_task = {} if method is None else method.task_arrays(
        0, steps_per_epoch=warmup + num_steps, num_steps=warmup + num_steps)
    self.task = steps.replicate({
        "class_mask": np.arange(num_classes) < task_classes, "method": self.method_task,
        "steps_per_epoch": np.float32(warmup + num_steps), "num_epochs": np.float32(1)})

  def options(self, clip_mode: str) -> steps.StepOptions:
    return steps.StepOptions.from_config(self.config, self.global_batch, clip_mode)

  def time_train(self, clip_mode: str, timer=None):
    """(seconds of each timed train step, final replicated state, last loss).

    `timer` runs the steps in place of `time_steps` (same arguments and result), e.g. to
    profile more steps after the timed ones.
    """
    tx = optim.create_optimizer(self.config, self.params)
    train = jax.pmap(functools.partial(steps.train_step, model=self.model, query_model=self.query_model,
                                       tx=tx, options=self.options(clip_mode), preprocess=self.preprocess),
                     axis_name=steps.AXIS, donate_argnums=(0,))
    state = steps.replicate(train_state.host_copy(train_state.create(self.params, tx)))
    rng = steps.replicate(self.dropout_rng)
    step = lambda carry: train(carry[0], self.batch, self.query_params, self.task, rng)
    seconds, (state, metrics) = (timer or time_steps)(step, (state, None), self.warmup, self.num_steps)
    return seconds, state, float(np.asarray(metrics["loss"])[0])

  def time_preprocess(self):
    """{'train': [seconds], 'eval': [seconds]} of building the network inputs alone on the devices."""
    out = {}
    for name, fn, batch in (("train", self.preprocess.train_images, self.batch),
                            ("eval", self.preprocess.eval_images, self.eval_batch)):
      build = jax.pmap(fn, axis_name=steps.AXIS)
      out[name], _ = time_steps(lambda _, f=build, b=batch: f(b), None, self.warmup, self.num_steps)
    return out

  def time_eval(self, params):
    """{'cached_query': [seconds], 'with_query': [seconds]} of the timed eval steps.

    'cached_query' batches carry the query features (computed once here), so the step
    runs the prompted pass only; 'with_query' batches do not, so it runs both passes.
    """
    evaluate = jax.pmap(functools.partial(steps.eval_step, model=self.model, query_model=self.query_model,
                                          preprocess=self.preprocess), axis_name=steps.AXIS,
                        in_axes=(0, 0, 0, 0, None))
    query = jax.pmap(functools.partial(steps.query_step, query_model=self.query_model, preprocess=self.preprocess),
                     axis_name=steps.AXIS)
    class_mask = steps.replicate(np.ones([self.model.num_classes], bool))
    cached = {**self.eval_batch, "cls_features": query(self.query_params, self.eval_batch)}
    out = {}
    for name, batch in (("cached_query", cached), ("with_query", self.eval_batch)):
      step = lambda _, b=batch: evaluate(params, self.query_params, b, class_mask, self.method_task)
      out[name], _ = time_steps(step, None, self.warmup, self.num_steps)
    return out


def run(config_name: str) -> dict:
  """Measures every requested clip mode and both eval steps; returns the JSON record."""
  if _WARMUP.value < 1 or _STEPS.value < 1:
    raise UserError("--warmup and --steps must be >= 1 (the first step compiles).")
  config = load_config(config_name)
  devices = jax.device_count()
  global_batch = _GLOBAL_BATCH.value or config.per_device_batch_size * devices
  if global_batch <= 0 or global_batch % devices:
    raise UserError(f"--global_batch {global_batch} must be a positive multiple of the {devices} devices.")
  if _SOURCE_SIZE.value < 0:
    raise UserError(f"--source_size {_SOURCE_SIZE.value} must be 0 (no on-device preprocessing) or positive.")
  bench = Bench(config, global_batch, _NUM_CLASSES.value, warmup=_WARMUP.value, num_steps=_STEPS.value,
                source_size=_SOURCE_SIZE.value)
  query_model = bench.query_model if bench.model.needs_query else None
  count = lambda mode: flops.step_flops(bench.model, config.input_size, query_model=query_model,
                                        clip_mode=mode, freeze_part=config.freeze_part)
  modes = ["trainable", "full"] if _CLIP_MODE.value == "both" else [_CLIP_MODE.value]
  record = {
      "command": shlex.join(["python"] + sys.argv), "config": config_name, "model_name": config.model_name,
      "input_size": config.input_size, "num_classes": _NUM_CLASSES.value, "global_batch": global_batch,
      "per_device_batch": global_batch // devices, "vote_group_size": config.per_device_batch_size,
      "device_kind": jax.devices()[0].device_kind, "device_count": devices, "platform": jax.default_backend(),
      "dtype": config.dtype, "attention_impl": config.attention_impl,
      "source_size": _SOURCE_SIZE.value or None, "jax_version": jax.__version__,
      "flax_version": flax.__version__, "warmup_steps": _WARMUP.value, "timed_steps": _STEPS.value,
      "peak_tflops_per_device": _PEAK_TFLOPS.value,
      "flops_convention": "matmul FLOPs per image (2*m*n*k), analytic; see bench/flops.py",
      "train": {}, "eval": {}, "eval_vs_train": {},
  }
  for mode in modes:
    state = None  # Frees the previous mode's state before the next one is built.
    seconds, state, loss = bench.time_train(mode)
    f = count(mode)
    record["train"][mode] = {"clip_mode": mode, "last_loss": loss, "flops_per_image": f.as_dict(),
                             **summarize(seconds, global_batch, f.train, _PEAK_TFLOPS.value)}
  f = count(modes[0])
  for name, seconds in bench.time_eval(state.params).items():
    per_image = f.eval_cached_query if name == "cached_query" else f.eval_with_query
    record["eval"][name] = {"flops_per_image": per_image,
                            **summarize(seconds, global_batch, per_image, _PEAK_TFLOPS.value)}
  if bench.preprocess is not None:  # Model FLOPs: none are counted for the input.
    record["preprocess_on_device"] = {name: summarize(seconds, global_batch, 0, None)
                                      for name, seconds in bench.time_preprocess().items()}
  for mode, train in record["train"].items():
    record["eval_vs_train"][mode] = {name: e["images_per_s"] / train["images_per_s"]
                                     for name, e in record["eval"].items()}
  return record


def _row(name: str, r: dict, per_image: int) -> str:
  mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
  mem = f"{r['peak_memory_bytes'] / 2**30:8.2f}" if r["peak_memory_bytes"] is not None else "       -"
  return (f"{name:<22} {r['ms_per_step_median']:9.2f} {r['ms_per_step_mean']:9.2f} {r['images_per_s']:10.1f} "
          f"{per_image / 1e9:8.4g} {r['achieved_tflops_per_s']:8.4g} {mfu:>6} {mem}")


def format_table(record: dict) -> str:
  """The record as a human-readable table."""
  lines = [
      f"{record['model_name']} {record['config']}, {record['input_size']}px, global batch {record['global_batch']} "
      f"({record['per_device_batch']}/device, vote groups of {record['vote_group_size']}), "
      f"{record['device_count']} x {record['device_kind']}, {record['dtype']}, {record['attention_impl']} attention, "
      f"jax {record['jax_version']}" + (f", inputs built on the devices from {s}x{s} uint8 images"
                                        if (s := record.get("source_size")) else ""),
  ]
  for mode, r in record["train"].items():
    f = r["flops_per_image"]
    g = {k: f"{v / 1e9:.4g}" for k, v in f.items()}
    lines.append(f"GFLOP/image, clip {mode}: query fwd {g['query_forward']} + prompted fwd {g['prompted_forward']} + "
                 f"bwd activations {g['backward_activations']} + bwd trainable weights "
                 f"{g['backward_trainable_weights']} + bwd frozen weights {g['backward_frozen_weights']} = "
                 f"{g['train_total']}")
  lines.append(f"{'step':<22} {'ms(med)':>9} {'ms(mean)':>9} {'images/s':>10} {'GFLOP/im':>8} {'TFLOP/s':>8} "
               f"{'MFU':>6} {'peak GiB':>8}")
  for mode, r in record["train"].items():
    lines.append(_row(f"train clip={mode}", r, r["flops_per_image"]["train_total"]))
  for name, r in record["eval"].items():
    lines.append(_row(f"eval {name}", r, r["flops_per_image"]))
  for name, r in record.get("preprocess_on_device", {}).items():
    lines.append(_row(f"{name} inputs alone", r, 0))
  for mode, ratios in record["eval_vs_train"].items():
    lines.append(f"eval/train images/s (clip {mode}): " +
                 ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  try:
    record = run(_CONFIG.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(record))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(record, f, indent=2)
    print(f"JSON: {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
