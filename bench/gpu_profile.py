"""Profiles the ViT train steps on one GPU and measures candidate speed-ups, in one call.

  python bench/gpu_profile.py --mode suite --out OUT_DIR --peak_tflops 989 [--budget_s 480]

`bench/gpu_profile.sh OUT_DIR` wraps this for the device machine. Three modes:

- `suite` (the entry point): runs the variants of `VARIANTS` in order, each in its own
  process (XLA_FLAGS are read once per process, and an unknown flag aborts it), stopping
  when --budget_s is spent. Every process times its train steps with `bench/step_benchmark.py`'s
  `Bench.time_train` (same models, generated data, donated state and analytic FLOPs), so the
  baseline is re-measured in the same run. The first processes also trace a few steps with
  `jax.profiler` and dump the optimized HLO, and break the GPU time down (`profile_breakdown.breakdown`).
  Writes into --out: summary.txt (table and breakdowns), summary.json (every record),
  log.txt (all processes' output) and up to five gzipped artifacts (HLO text, raw xplane).
- `run`: one such process; measures each --jobs entry (config:global_batch[:profile]) and
  appends one JSON record per job to --results.
- `parse`: breaks down an existing trace directory (--trace_dir, optionally --hlo_text, --num_steps,
  and the step times and FLOPs from --summary_json or --untraced_step_ms), e.g. an artifact brought
  back from the device; --out gets breakdown.txt and breakdown.json.

The breakdown is `bench/profile_breakdown.py`'s (no TensorFlow, TensorBoard plugin or protobuf
module needed): every GPU kernel matched to its HLO instruction, time by kernel kind, by part of
the step (frozen query pass, prompted forward, backward, optimizer) and by what the non-matrix
kernels fuse.

With GPU_PROFILE_FORBID="tensorflow,..." in the environment (gpu_profile.sh sets it),
importing those modules fails, which proves the measurements do not need them.
"""

import dataclasses
import gc
import glob
import gzip
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

# Before anything imports them: make the forbidden modules unimportable.
for _name in filter(None, os.environ.get("GPU_PROFILE_FORBID", "").split(",")):
  sys.modules[_name.strip()] = None

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from bench import flops
from bench import profile_breakdown
from bench import step_benchmark
from models import attention

# Besides the flags below, step_benchmark's: model_name, input_size, dtype, attention_impl, clip_mode, warmup,
# steps, peak_tflops and num_classes.
FLAGS = flags.FLAGS

_MODE = flags.DEFINE_enum("mode", "suite", ["suite", "run", "parse"], "What to do (see the module docstring).")
_OUT = flags.DEFINE_string("out", None, "suite: output folder (at most 8 files are written into it).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Scratch folder for traces, HLO dumps and results; "
                                "default: a fresh folder in /tmp.")
_BUDGET_S = flags.DEFINE_float("budget_s", 480.0, "suite: wall-clock seconds for all variants; later variants are "
                               "skipped and a running one is stopped when they are spent.")
_TINY = flags.DEFINE_bool("tiny", False, "suite: dry run (ViT-test at 32 px, small batches, XLA attention, "
                          "2 timed steps), e.g. on CPU.")
_ONLY = flags.DEFINE_list("only", None, "suite: run only these variants (names of VARIANTS).")
_JOBS = flags.DEFINE_list("jobs", None, "run: config:global_batch[:profile] entries, e.g. cifar100_l2p:128:profile.")
_VARIANT = flags.DEFINE_string("variant", "base", "run: name of the variant, recorded with each result.")
_RESULTS = flags.DEFINE_string("results", None, "run: JSON-lines file that each job's record is appended to.")
_HLO_DUMP_DIR = flags.DEFINE_string("hlo_dump_dir", None, "run: the --xla_dump_to folder of this process, read "
                                    "for the optimized HLO of each profiled job.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 3, "Steps traced by the profiler after the timed ones.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None,
                                 "parse: the folder jax.profiler.trace wrote (searched recursively).")
_HLO_TEXT = flags.DEFINE_string("hlo_text", None, "parse: optimized HLO text (optionally .gz) of the traced module.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "parse: steps in the trace; default: --trace_steps.")
_UNTRACED_MS = flags.DEFINE_float("untraced_step_ms", None, "parse: the step's untraced time, to compare with busy "
                                  "time; default: from --summary_json.")
_TRACED_MS = flags.DEFINE_float("traced_step_ms", None, "parse: the traced steps' median time; default: from "
                                "--summary_json.")
_SUMMARY_JSON = flags.DEFINE_string("summary_json", None, "parse: the suite's summary.json: step times and analytic "
                                    "FLOPs of the traced job (--record).")
_RECORD = flags.DEFINE_string("record", None, "parse: the job in --summary_json, as VARIANT_CONFIG_bBATCH (e.g. "
                              "base_cifar100_l2p_b128); default: the one the trace file's name starts with.")
_TOP = flags.DEFINE_integer("top", 25, "Kernels listed in the breakdown.")
_PAD_MULTIPLE = flags.DEFINE_integer("cudnn_pad_multiple", None, "run: models.attention.CUDNN_PAD_MULTIPLE "
                                     "for this process; default: the library's.")
_PATCH = flags.DEFINE_enum("patch", "none", ["none", "fused_qkv"], "run: candidate model change patched in for "
                           "this process only (see `fused_qkv_attention_class`).")

# Configs by short name, and the batches the tiny dry run uses instead of the real ones (multiples
# of each config's vote group, per_device_batch_size: 16 for L2P, 24 for DualPrompt).
CONFIGS = {"l2p": "cifar100_l2p", "dual": "imr_dualprompt"}
TINY_BATCH = {128: 32, 256: 64, 192: 48, 384: 96}
MAX_OUT_FILES = 8
MAX_FILE_BYTES = 15 * 2**20


@dataclasses.dataclass(frozen=True)
class Variant:
  """One process of the suite.

  Attributes:
    name: label of its records.
    xla_flags: added to XLA_FLAGS for the process.
    jobs: (config short name, global batch, profile) measured in order.
    note: what it tests.
    dump_hlo: dump the optimized HLO (for the breakdown of its profiled jobs).
    estimate_s: expected seconds on an H200 (start, compiles, steps, trace); a variant starts only
      while at least 75% of this is left of the budget.
    patch: --patch of the process: a candidate model change, patched in without editing the library.
    flags: more flags of the process, e.g. --cudnn_pad_multiple=16 or step_benchmark's --clip_mode=full.
  """
  name: str
  xla_flags: str
  jobs: tuple[tuple[str, int, bool], ...]
  note: str
  dump_hlo: bool = False
  estimate_s: float = 70.0
  patch: str = "none"
  flags: tuple[str, ...] = ()


# Most informative first: the profiles, the known Triton-GEMM effect (profiled too, to see which
# kernels replace Triton's), a candidate model change, larger batches, the run-to-run spread (the
# persistent compilation cache makes it cheap), then XLA options that might fuse or schedule better.
VARIANTS = (
    Variant("base", "", (("l2p", 128, True), ("dual", 192, True)),
            "baseline: L2P b128 and DualPrompt b192, profiled", dump_hlo=True, estimate_s=150),
    Variant("no_triton_gemm", "--xla_gpu_enable_triton_gemm=false", (("l2p", 128, True), ("dual", 192, False)),
            "GEMMs through cuBLAS instead of Triton", dump_hlo=True, estimate_s=110),
    Variant("fused_qkv", "", (("l2p", 128, False),),
            "q/k/v projections as one product (in-process patch, same parameters)", estimate_s=60,
            patch="fused_qkv"),
    Variant("base_big_batch", "", (("l2p", 256, False), ("dual", 384, False)),
            "2x the global batch, vote groups kept", estimate_s=110),
    Variant("base_repeat", "", (("l2p", 128, False),),
            "baseline again (compilation cache): run-to-run spread", estimate_s=30),
    Variant("cublaslt", "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true", (("l2p", 128, False),),
            "cuBLASLt GEMMs (bias/GELU epilogues), no Triton GEMM", estimate_s=60),
    Variant("no_triton_gemm_big_batch", "--xla_gpu_enable_triton_gemm=false", (("l2p", 256, False),),
            "cuBLAS GEMMs at 2x the batch", estimate_s=60),
    Variant("cudnn_gemm_fusion", "--xla_gpu_cudnn_gemm_fusion_level=2", (("l2p", 128, False),),
            "cuDNN GEMM fusions offered to the autotuner", estimate_s=70),
    Variant("no_command_buffer", "--xla_gpu_enable_command_buffer=", (("l2p", 128, False),),
            "no CUDA graphs: what XLA's command buffers save", estimate_s=60),
    Variant("cudnn_layer_norm", "--xla_gpu_enable_cudnn_layer_norm=true", (("l2p", 128, False),),
            "layer norms through cuDNN", estimate_s=60),
    Variant("latency_hiding", "--xla_gpu_enable_latency_hiding_scheduler=true", (("l2p", 128, False),),
            "latency-hiding scheduler", estimate_s=60),
    # cuDNN attention's token padding (CUDNN_PAD_MULTIPLE, 8 by default; 64 before): the first
    # profile put the pads and slices at 10% of the kernel time.
    Variant("pad64", "", (("l2p", 128, False), ("dual", 192, False)),
            "attention padded to a multiple of 64", estimate_s=60, flags=("--cudnn_pad_multiple=64",)),
    Variant("pad16", "", (("l2p", 128, False), ("dual", 192, False)),
            "attention padded to a multiple of 16", estimate_s=60, flags=("--cudnn_pad_multiple=16",)),
    Variant("pad2", "", (("l2p", 128, False), ("dual", 192, False)),
            "attention padded to an even length", estimate_s=60, flags=("--cudnn_pad_multiple=2",)),
    Variant("full_clipping", "", (("l2p", 128, False), ("dual", 192, False)),
            "the original's clipping of the full gradient", estimate_s=60, flags=("--clip_mode=full",)),
)


# --------------------------------------------------------------------------------------------
# run: one process, its jobs.
# --------------------------------------------------------------------------------------------

def fused_qkv_attention_class():
  """`models.attention.PrefixAttention` with its q/k/v projections computed as one product.

  Same parameters (names, shapes and initialisation of nn.DenseGeneral's) and the same function:
  the three [D, H, hd] kernels are stacked into one [D, 3, H, hd] kernel at each call, so the
  forward pass runs one product of width 3D, and the backward pass one input-gradient product
  of depth 3D instead of three products and two additions. The 'fused_qkv' variant patches it
  in to measure the change before it is made in the library.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from models import attention  # pylint: disable=import-outside-toplevel

  class Projection(nn.Module):
    """Declares one projection's kernel [D, H, hd] and bias [H, hd] as nn.DenseGeneral does."""
    features: tuple
    kernel_init: object

    @nn.compact
    def __call__(self, width: int):
      flat = (width, math.prod(self.features))
      init = lambda rng, shape, dtype=jnp.float32: jnp.reshape(self.kernel_init(rng, flat, dtype), shape)
      kernel = self.param("kernel", init, (width,) + tuple(self.features), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros_init(), tuple(self.features), jnp.float32)
      return kernel, bias

  class FusedQKVAttention(attention.PrefixAttention):
    """PrefixAttention with one q/k/v product (see `fused_qkv_attention_class`)."""

    @nn.compact
    def __call__(self, x, prefix_k=None, prefix_v=None):
      if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
      width = x.shape[-1]
      features = (self.num_heads, width // self.num_heads)
      params = [Projection(features, self.kernel_init, name=n)(width) for n in ("query", "key", "value")]
      kernel = jnp.stack([k for k, _ in params], axis=1).astype(self.dtype)  # [D, 3, H, hd]
      bias = jnp.stack([b for _, b in params], axis=0).astype(self.dtype)  # [3, H, hd]
      qkv = jnp.einsum("btd,dkhe->btkhe", x.astype(self.dtype), kernel) + bias
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if prefix_k is not None:
        key = jnp.concatenate([prefix_k.astype(key.dtype), key], axis=1)
        value = jnp.concatenate([prefix_v.astype(value.dtype), value], axis=1)
      if self.attention_impl in ("fused", "cudnn"):
        out = attention._fused_attention(query, key, value,  # pylint: disable=protected-access
                                         "cudnn" if self.attention_impl == "cudnn" else None)
      else:
        out = attention._xla_attention(query, key, value)  # pylint: disable=protected-access
      return nn.DenseGeneral(features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=self.kernel_init, name="out")(out)

  return FusedQKVAttention


def _profile_options():
  """Profiler options without the Python tracer (it would dominate the trace)."""
  options = jax.profiler.ProfileOptions()
  for name, value in (("python_tracer_level", 0), ("host_tracer_level", 2)):
    try:
      setattr(options, name, value)
    except Exception:  # pylint: disable=broad-except
      pass
  return options


def _trace_after_timing(trace_dir: str, trace_steps: int, info: dict):
  """A timer for `Bench.time_train`: `step_benchmark.time_steps`, then `trace_steps` more steps traced.

  The profile runs on the same compiled step and state as the timing. Any profiler error is
  recorded in `info` and leaves the timing intact.
  """
  original = step_benchmark.time_steps

  def time_and_trace(step, carry, warmup, num_steps):
    seconds, carry = original(step, carry, warmup, num_steps)
    try:
      try:
        jax.profiler.start_trace(trace_dir, profiler_options=_profile_options())
      except TypeError:  # An older signature.
        jax.profiler.start_trace(trace_dir)
    except Exception as e:  # pylint: disable=broad-except
      info["trace_error"] = f"start_trace: {type(e).__name__}: {e}"[:500]
      return seconds, carry
    try:
      info["traced_seconds"], carry = original(step, carry, 0, trace_steps)
    finally:
      try:
        jax.profiler.stop_trace()
      except Exception as e:  # pylint: disable=broad-except
        info["trace_error"] = f"stop_trace: {type(e).__name__}: {e}"[:500]
    return seconds, carry

  return time_and_trace


def _new_hlo_dump(dump_dir: str, before: set):
  """The largest optimized-HLO text XLA dumped since `before` (the train step's module)."""
  if not dump_dir or not os.path.isdir(dump_dir):
    return None
  new = [p for p in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")) if p not in before]
  return max(new, key=os.path.getsize) if new else None


def _gzip_copy(src: str, dst: str) -> str:
  with open(src, "rb") as f_in, gzip.open(dst, "wb", compresslevel=6) as f_out:
    shutil.copyfileobj(f_in, f_out)
  return dst


def run_job(config_name: str, global_batch: int, profile: bool, work_dir: str) -> dict:
  """Times (and optionally profiles) one train step; returns its JSON record."""
  start = time.perf_counter()
  config = step_benchmark.load_config(config_name)
  clip_mode = "trainable" if FLAGS.clip_mode == "both" else FLAGS.clip_mode
  bench = step_benchmark.Bench(config, global_batch, FLAGS.num_classes, warmup=FLAGS.warmup, num_steps=FLAGS.steps)
  query_model = bench.query_model if bench.model.needs_query else None
  f = flops.step_flops(bench.model, config.input_size, query_model=query_model, clip_mode=clip_mode,
                       freeze_part=config.freeze_part)
  tag = f"{_VARIANT.value}_{config_name}_b{global_batch}"
  record = {"variant": _VARIANT.value, "config": config_name, "global_batch": global_batch,
            "vote_group_size": config.per_device_batch_size, "model_name": config.model_name,
            "input_size": config.input_size, "dtype": config.dtype, "attention_impl": config.attention_impl,
            "clip_mode": clip_mode, "xla_flags": os.environ.get("XLA_FLAGS", ""), "patch": _PATCH.value,
            "cudnn_pad_multiple": attention.CUDNN_PAD_MULTIPLE,
            "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "jax_version": jax.__version__, "flops_per_image": f.as_dict(), "artifacts": []}
  info, dump_before = {}, set()
  timer = None
  if profile:
    trace_dir = os.path.join(work_dir, f"trace_{tag}")
    dump_before = set(glob.glob(os.path.join(_HLO_DUMP_DIR.value or "", "*after_optimizations.txt")))
    timer = _trace_after_timing(trace_dir, _TRACE_STEPS.value, info)
  seconds, state, loss = bench.time_train(clip_mode, timer=timer)
  del state
  record.update(step_benchmark.summarize(seconds, global_batch, f.train, FLAGS.peak_tflops))
  record["last_loss"] = loss
  record["step_seconds"] = seconds
  if profile:
    record.update({k: v for k, v in info.items() if k == "trace_error"})
    traced = info.get("traced_seconds")
    record["traced_ms_median"] = 1e3 * statistics.median(traced) if traced else None
    per_step = {"query_forward": f.query_forward * global_batch, "prompted_forward": f.prompted_forward * global_batch,
                "backward": (f.backward_activations + f.backward_trainable_weights + f.backward_frozen_weights)
                            * global_batch, "train_total": f.train * global_batch}
    hlo_path = _new_hlo_dump(_HLO_DUMP_DIR.value, dump_before)
    hlo, notes = None, []
    if hlo_path:
      try:
        hlo = profile_breakdown.parse_hlo(profile_breakdown.read_text(hlo_path))
        record["artifacts"].append(_gzip_copy(hlo_path, os.path.join(work_dir, f"{tag}_hlo.txt.gz")))
      except Exception as e:  # pylint: disable=broad-except
        notes.append(f"HLO parse failed: {type(e).__name__}: {e}"[:300])
    elif _HLO_DUMP_DIR.value:
      notes.append("no new optimized HLO in the dump folder (executable from the compilation cache?)")
    events, source, load_notes = profile_breakdown.load_events(trace_dir) if traced else ([], None, ["no traced steps"])
    b = profile_breakdown.breakdown(
        events, num_steps=len(traced or []) or 1, hlo=hlo, untraced_step_ms=record["ms_per_step_median"],
        traced_step_ms=record["traced_ms_median"], step_flops=per_step, top=_TOP.value)
    b["source"] = source
    b["notes"] = notes + load_notes + b["notes"]
    record["profile"] = b
    record["profile_text"] = profile_breakdown.format_breakdown(b, f"{_VARIANT.value} {config_name} b{global_batch}")
    xplanes = [p for p in profile_breakdown.find_trace_files(trace_dir)["xplane"] if p.endswith(".pb")]
    if xplanes:
      record["artifacts"].append(_gzip_copy(xplanes[0], os.path.join(work_dir, f"{tag}.xplane.pb.gz")))
    print(record["profile_text"], flush=True)
  record["job_seconds"] = time.perf_counter() - start
  forbidden = [m for m in os.environ.get("GPU_PROFILE_FORBID", "").split(",") if m]
  record["forbidden_modules_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in forbidden
                                              and sys.modules[m] is not None)
  return record


def run_jobs():
  """The `run` mode: every --jobs entry in this process, one record each into --results."""
  work_dir = _WORK_DIR.value or "/tmp/gpu_profile_work"
  os.makedirs(work_dir, exist_ok=True)
  if _PATCH.value == "fused_qkv":
    attention.PrefixAttention = fused_qkv_attention_class()  # models.vit looks it up at call time.
  if _PAD_MULTIPLE.value:
    attention.CUDNN_PAD_MULTIPLE = _PAD_MULTIPLE.value
  for spec in _JOBS.value or []:
    parts = spec.split(":")
    config_name, batch, profile = parts[0], int(parts[1]), len(parts) > 2 and parts[2] == "profile"
    print(f"== job {_VARIANT.value} {config_name} batch {batch}{' (profile)' if profile else ''}", flush=True)
    try:
      record = run_job(config_name, batch, profile, work_dir)
    except Exception as e:  # pylint: disable=broad-except  # One failed job must not stop the others.
      record = {"variant": _VARIANT.value, "config": config_name, "global_batch": batch,
                "xla_flags": os.environ.get("XLA_FLAGS", ""), "error": f"{type(e).__name__}: {e}"[:2000]}
      print(f"job failed: {record['error']}", flush=True)
    if _RESULTS.value:
      with open(_RESULTS.value, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if "error" not in record:
      mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "-"
      print(f"RESULT {_VARIANT.value} {config_name} b{batch}: {record['ms_per_step_median']:.2f} ms/step, "
            f"{record['images_per_s']:.1f} images/s, MFU {mfu}, job {record['job_seconds']:.0f} s", flush=True)
    gc.collect()


# --------------------------------------------------------------------------------------------
# suite: all variants, one process each, within the budget.
# --------------------------------------------------------------------------------------------

def _read_records(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _gib(v):
  return f"{v / 2**30:.1f}" if isinstance(v, (int, float)) else "-"


def summary_table(records: list, variants: list) -> str:
  """Variants x jobs: ms/step, images/s, MFU and images/s relative to the baseline."""
  base = {}
  for r in records:
    if r.get("variant") == "base" and "error" not in r:
      base.setdefault(r["config"], r)
  lines = [f"{'variant':<26} {'config':<15} {'batch':>5} {'ms/step':>8} {'images/s':>9} {'MFU':>6} "
           f"{'vs base':>7} {'peakGiB':>7} {'job s':>6}  status"]
  for r in records:
    if "error" in r:
      lines.append(f"{r['variant']:<26} {r['config']:<15} {r['global_batch']:>5} {'':>8} {'':>9} {'':>6} {'':>7} "
                   f"{'':>7} {'':>6}  error: {r['error'][:80]}")
      continue
    b = base.get(r["config"])
    ratio = f"{r['images_per_s'] / b['images_per_s']:.3f}" if b else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    lines.append(f"{r['variant']:<26} {r['config']:<15} {r['global_batch']:>5} {r['ms_per_step_median']:8.2f} "
                 f"{r['images_per_s']:9.1f} {mfu:>6} {ratio:>7} {_gib(r.get('peak_memory_bytes')):>7} "
                 f"{r.get('job_seconds', 0):6.0f}  ok"
                 + (f" (trace: {r['trace_error'][:60]})" if r.get("trace_error") else ""))
  for v in variants:
    if v["status"] != "ok":
      lines.append(f"{v['name']:<26} {v['status']}" + (f" ({v['seconds']:.0f} s)" if v.get("seconds") else ""))
      lines += [f"{'':<28}{line[:150]}" for line in v.get("log_tail", [])]
  return "\n".join(lines)


def _write_outputs(out: str, meta: dict, records: list, variants: list, final: bool):
  """summary.json, summary.txt and, when final, the artifacts (at most MAX_OUT_FILES files in all)."""
  text = [f"gpu_profile: {meta['device_kind']} ({meta['platform']}), jax {meta['jax_version']}, "
          f"{meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget; "
          f"{meta['steps']} timed steps after {meta['warmup']} warm-up (median), MFU against "
          f"{meta['peak_tflops']} TFLOP/s; clip trainable, {meta['dtype']}, {meta['attention_impl']} attention",
          "", summary_table(records, variants), ""]
  text += [v["name"] + ": " + v["note"] + (f"  [XLA_FLAGS {v['xla_flags']}]" if v["xla_flags"] else "")
           for v in variants]
  for r in records:
    if r.get("profile_text"):
      text += ["", r["profile_text"]]
  copied = []
  if final:
    slots = MAX_OUT_FILES - 3  # summary.txt, summary.json, log.txt
    artifacts = [p for r in records for p in r.get("artifacts", [])]
    for path in sorted(artifacts, key=lambda p: not p.endswith("_hlo.txt.gz")):  # Stable: HLO first.
      if len(copied) < slots and os.path.exists(path):
        if os.path.getsize(path) > MAX_FILE_BYTES:
          meta.setdefault("artifacts_skipped", []).append(f"{os.path.basename(path)} (too large)")
          continue
        shutil.copy(path, os.path.join(out, os.path.basename(path)))
        copied.append(os.path.basename(path))
      elif os.path.exists(path):
        meta.setdefault("artifacts_skipped", []).append(f"{os.path.basename(path)} (no slot; in the work dir)")
    meta["artifacts"] = copied
  compact = [{k: v for k, v in r.items() if k not in ("profile_text", "artifacts")} for r in records]
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"meta": meta, "variants": variants, "records": compact}, f, indent=1)
  with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write("\n".join(text) + "\n")
  return "\n".join(text)


def run_suite():
  """The `suite` mode: VARIANTS in order, each in a child process, within --budget_s."""
  start = time.monotonic()
  child_env = dict(os.environ)
  os.environ["JAX_PLATFORMS"] = "cpu"  # This process never takes the GPU from its children.
  out = _OUT.value
  if not out:
    raise app.UsageError("--out is required in suite mode")
  os.makedirs(out, exist_ok=True)
  work_dir = _WORK_DIR.value or f"/tmp/gpu_profile_{os.getpid()}"
  os.makedirs(work_dir, exist_ok=True)
  results = os.path.join(work_dir, "results.jsonl")
  log_path = os.path.join(out, "log.txt")
  tiny = _TINY.value
  peak = FLAGS.peak_tflops or 989.0
  common = [f"--peak_tflops={peak}", f"--trace_steps={_TRACE_STEPS.value}", f"--num_classes={FLAGS.num_classes}",
            "--clip_mode=trainable", f"--top={_TOP.value}"]
  dtype = FLAGS.dtype or "bfloat16"
  attention = FLAGS.attention_impl or ("xla" if tiny else "cudnn")
  if tiny:
    warmup, steps = 1, 2
    common += ["--model_name=ViT-test", "--input_size=32"]
  else:
    warmup, steps = FLAGS.warmup, FLAGS.steps
    common += [f"--input_size={FLAGS.input_size}"] + ([f"--model_name={FLAGS.model_name}"] if FLAGS.model_name else [])
  common += [f"--warmup={warmup}", f"--steps={steps}", f"--dtype={dtype}", f"--attention_impl={attention}"]
  chosen = [v for v in VARIANTS if not _ONLY.value or v.name in _ONLY.value]
  meta = {"budget_s": _BUDGET_S.value, "tiny": tiny, "warmup": warmup, "steps": steps, "dtype": dtype,
          "attention_impl": attention, "peak_tflops": peak,
          "device_kind": "?", "platform": "?", "jax_version": "?", "work_dir": work_dir, "elapsed_s": 0.0,
          "command": shlex.join([sys.executable] + sys.argv)}
  done = []
  for v in chosen:
    elapsed = time.monotonic() - start
    left = _BUDGET_S.value - elapsed
    entry = {"name": v.name, "xla_flags": v.xla_flags, "note": v.note, "status": "skipped (budget)", "seconds": 0.0}
    done.append(entry)
    if left < 0.75 * v.estimate_s * (0.3 if tiny else 1.0) or left < 20:
      print(f"-- skip {v.name}: {left:.0f} s left", flush=True)
      continue
    scale = (lambda b: TINY_BATCH.get(b, b)) if tiny else (lambda b: b)
    jobs = ",".join(f"{CONFIGS[c]}:{scale(b)}" + (":profile" if p else "") for c, b, p in v.jobs)
    env = dict(child_env)
    dump_dir = os.path.join(work_dir, f"dump_{v.name}")
    xla_flags = " ".join(filter(None, [child_env.get("XLA_FLAGS", ""), v.xla_flags]))
    if v.dump_hlo:
      xla_flags += f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
    env.update({"XLA_FLAGS": xla_flags.strip(), "PYTHONUNBUFFERED": "1",
                "JAX_COMPILATION_CACHE_DIR": os.path.join(work_dir, "jax_cache"),
                "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES": "none"})
    cmd = [sys.executable, os.path.abspath(__file__), "--mode=run", f"--variant={v.name}", f"--jobs={jobs}",
           f"--results={results}", f"--work_dir={work_dir}", f"--patch={v.patch}"] + common + list(v.flags) + (
               [f"--hlo_dump_dir={dump_dir}"] if v.dump_hlo else [])
    timeout = left - 10
    print(f"-- {v.name} ({v.note}); {left:.0f} s left; XLA_FLAGS={v.xla_flags or '(none)'}", flush=True)
    t0 = time.monotonic()
    with open(log_path, "a") as log:
      log.write(f"\n===== {v.name}: XLA_FLAGS={env['XLA_FLAGS']!r}\n$ {shlex.join(cmd)}\n")
      log.flush()
      offset = log.tell()
      proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      try:
        rc = proc.wait(timeout=max(timeout, 1))
        entry["status"] = "ok" if rc == 0 else f"failed (rc {rc})"
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        entry["status"] = "stopped at the budget"
      log.write(f"===== {v.name}: {entry['status']} after {time.monotonic() - t0:.0f} s\n")
    entry["seconds"] = time.monotonic() - t0
    if entry["status"] != "ok":
      with open(log_path, errors="replace") as log:
        log.seek(offset)
        tail = [line.strip() for line in log.read().splitlines() if line.strip() and not line.startswith("=====")]
      entry["log_tail"] = tail[-3:]
    records = _read_records(results)
    for r in records:
      if "device_kind" in r:
        meta.update({k: r[k] for k in ("device_kind", "platform", "jax_version")})
    meta["elapsed_s"] = time.monotonic() - start
    _write_outputs(out, meta, records, done, final=False)
    for r in records:
      if r.get("variant") == v.name:
        status = r.get("error", "")[:100] or (f"{r['ms_per_step_median']:.2f} ms/step, {r['images_per_s']:.1f} img/s, "
                                              f"MFU " + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"))
        print(f"   {r['config']} b{r['global_batch']}: {status}", flush=True)
    print(f"   {entry['status']} in {entry['seconds']:.0f} s", flush=True)
  meta["elapsed_s"] = time.monotonic() - start
  text = _write_outputs(out, meta, _read_records(results), done, final=True)
  table, _, profiles = text.partition("\n\n== Profile")
  if profiles:  # The profiles first, so that the table ends the output (the part a tail keeps).
    print("\n== Profile" + profiles)
  print("\n" + table)
  print(f"\nwritten: {', '.join(sorted(os.listdir(out)))}")


def _summary_record(path: str, tag, source) -> dict:
  """The record of job `tag` (else the one the trace file `source` is named after) in a suite's summary.json."""
  with open(path) as f:
    records = [r for r in json.load(f).get("records", []) if "error" not in r]
  name = lambda r: f"{r['variant']}_{r['config']}_b{r['global_batch']}"
  base = os.path.basename((source or "").split(": ")[-1])
  found = [r for r in records if (name(r) == tag if tag else base.startswith(name(r) + "."))]
  return found[0] if found else {}


def parse_only():
  """The `parse` mode: the breakdown of --trace_dir (and --hlo_text) to stdout and --out."""
  events, source, notes = profile_breakdown.load_events(_TRACE_DIR.value)
  hlo = profile_breakdown.parse_hlo(profile_breakdown.read_text(_HLO_TEXT.value)) if _HLO_TEXT.value else None
  record = _summary_record(_SUMMARY_JSON.value, _RECORD.value, source) if _SUMMARY_JSON.value else {}
  if _SUMMARY_JSON.value and not record:
    notes.append(f"no record {_RECORD.value or 'named like the trace file'} in {_SUMMARY_JSON.value}")
  step_flops = None
  if record.get("flops_per_image"):
    f, batch = record["flops_per_image"], record["global_batch"]
    step_flops = {"query_forward": f["query_forward"] * batch, "prompted_forward": f["prompted_forward"] * batch,
                  "backward": (f["backward_activations"] + f["backward_trainable_weights"]
                               + f["backward_frozen_weights"]) * batch, "train_total": f["train_total"] * batch}
  untraced = _UNTRACED_MS.value if _UNTRACED_MS.value is not None else record.get("ms_per_step_median")
  traced = _TRACED_MS.value if _TRACED_MS.value is not None else record.get("traced_ms_median")
  b = profile_breakdown.breakdown(
      events, num_steps=_NUM_STEPS.value or _TRACE_STEPS.value, hlo=hlo, untraced_step_ms=untraced,
      traced_step_ms=traced, step_flops=step_flops, top=_TOP.value)
  b["source"], b["notes"] = source, notes + b["notes"]
  title = (f"{record['variant']} {record['config']} b{record['global_batch']}" if record
           else os.path.basename(os.path.normpath(_TRACE_DIR.value)))
  text = profile_breakdown.format_breakdown(b, title)
  print(text)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "breakdown.json"), "w") as f:
      json.dump(b, f, indent=1)
    with open(os.path.join(_OUT.value, "breakdown.txt"), "w") as f:
      f.write(text + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; every option is a --flag.")
  if _MODE.value == "suite":
    run_suite()
  elif _MODE.value == "run":
    run_jobs()
  else:
    if not _TRACE_DIR.value:
      raise app.UsageError("--trace_dir is required in parse mode")
    parse_only()


if __name__ == "__main__":
  app.run(main)
