"""Breaks a GPU profile of a train step down: where the kernel time goes, by kind and part of the step.

  python bench/gpu_profile.py --mode parse --trace_dir DIR --hlo_text HLO.txt.gz

Reads a `jax.profiler` trace (its xplane.pb through `jax.profiler.ProfileData`, else the
`*.trace.json.gz` beside it; no TensorFlow, TensorBoard plugin or protobuf module needed) and the
optimized HLO text of the traced module (`--xla_dump_to ... --xla_dump_hlo_as_text`). On a GPU the
events are the CUPTI kernel records of the device plane ('/device:GPU:0', lines 'Stream #N(...)').
XLA annotates each kernel with its HLO instruction ('hlo_op'), or, inside a CUDA graph (an XLA
command buffer), only with the command buffer; those kernels are matched to instructions by
aligning each stream's kernel sequence with the module's schedule. The instruction gives a fusion
kind, its ops, its op_name (JAX name stack: 'PromptedViT/...' is the frozen query pass,
'jvp(PromptedViT)/...' the prompted forward pass, 'transpose(jvp(PromptedViT))/...' the backward
pass) and its source file (optax: the optimizer). On a CPU the events are the XLA thunks of the
host threads, which carry 'hlo_op' too. `bench/gpu_profile.py` runs the profiles and calls this.
"""

import collections
import dataclasses
import difflib
import glob
import gzip
import json
import math
import os
import re

import jax


# --------------------------------------------------------------------------------------------
# Optimized HLO: what each instruction (a kernel's 'hlo_op') is.
# --------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_BACKEND_KIND = re.compile(r'\\?"kind\\?"\s*:\s*\\?"([^"\\]+)')
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)"')
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
_DEDUP = re.compile(r'deduplicated_name="([^"]+)"')
_NAMES = re.compile(r"%[\w.\-]+")


@dataclasses.dataclass
class HloOp:
  """An instruction of the optimized HLO, with what its fused computation holds.

  Attributes:
    opcode: e.g. 'fusion', 'custom-call', 'copy'.
    fusion_kind: kLoop, kInput, kOutput or kCustom ('' for other ops).
    backend_kind: the fusion backend config's kind, e.g. '__triton_gemm', '__cudnn$fusion'.
    target: custom-call target, e.g. '__cublas$gemm', '__cudnn$fmhaSoftmax'.
    op_name: its own metadata op_name.
    op_names: op_names of the ops it fuses (its own first).
    ops: opcodes it fuses (itself when not a fusion).
    files: source files of its and its fused ops' innermost frames.
    calls: the fused computation.
    name: the instruction's name.
    dedup_name: metadata deduplicated_name: the instruction whose kernel it runs ('' if none given).
    entry: whether it is an instruction of the ENTRY computation.
    body: its fused computation's text without names and metadata, for fusions (identical ones may share a
      kernel, named after one of them, even without a deduplicated_name).
  """
  opcode: str
  fusion_kind: str = ""
  backend_kind: str = ""
  target: str = ""
  op_name: str = ""
  op_names: list = dataclasses.field(default_factory=list)
  ops: set = dataclasses.field(default_factory=set)
  files: set = dataclasses.field(default_factory=set)
  calls: str = ""
  name: str = ""
  dedup_name: str = ""
  entry: bool = False
  body: str = ""


class HloModule(dict):
  """{instruction name: HloOp} of one module; `name` is the module's, `schedule` its ENTRY instructions in order
  (the optimized module is scheduled: its thunks, kernels and command-buffer commands run in this order)."""

  def __init__(self, name: str = ""):
    super().__init__()
    self.name = name
    self.schedule = []


def _frame_files(lines) -> dict:
  """stack_frame_id -> source file of that (innermost) frame, from the module's frame tables."""
  tables, current = collections.defaultdict(dict), None
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
      continue
    if current is None:
      continue
    m = _TABLE_ROW.match(line)
    if not m:
      if line and not line[0].isdigit():
        current = None
      continue
    tables[current][int(m.group(1))] = m.group(2)
  files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
  location_file = {}
  for k, v in tables["FileLocations"].items():
    m = re.search(r"file_name_id=(\d+)", v)
    if m:
      location_file[k] = files.get(int(m.group(1)), "")
  frames = {}
  for k, v in tables["StackFrames"].items():
    m = re.search(r"file_location_id=(\d+)", v)
    if m:
      frames[k] = location_file.get(int(m.group(1)), "")
  return frames


def parse_hlo(text: str) -> HloModule:
  """Optimized HLO text -> {instruction name: HloOp} for every instruction of the module (an `HloModule`)."""
  lines = text.splitlines()
  frames = _frame_files(lines)
  module = re.match(r"HloModule\s+([^\s,]+)", text)
  computations, instructions, computation = {}, HloModule(module.group(1) if module else ""), None
  entry, bodies = False, collections.defaultdict(list)
  for line in lines:
    if not line:
      continue
    if not line[0].isspace():
      m = _HEADER.match(line)
      computation = m.group(1) if m and line.rstrip().endswith("{") else None
      entry = computation is not None and line.startswith("ENTRY")
      if computation is not None:
        computations[computation] = []
      continue
    if computation is None:
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, rest = m.group(1), m.group(2)
    if not entry:
      bodies[computation].append(_NAMES.sub("%", rest.split(", metadata=")[0]))
    opcode = _OPCODE.search(" " + rest)
    op = HloOp(opcode=opcode.group(1) if opcode else "?", name=name, entry=entry)
    dedup = _DEDUP.search(rest)
    op.dedup_name = dedup.group(1) if dedup else ""
    for pattern, field in ((_FUSION_KIND, "fusion_kind"), (_BACKEND_KIND, "backend_kind"), (_TARGET, "target"),
                           (_OP_NAME, "op_name")):
      found = pattern.search(rest)
      if found:
        setattr(op, field, found.group(1))
    frame = _FRAME.search(rest)
    source = _SOURCE.search(rest)
    if source:
      op.files.add(source.group(1))
    elif frame:
      op.files.add(frames.get(int(frame.group(1)), ""))
    calls = _CALLS.search(rest) if op.opcode == "fusion" else None
    op.calls = calls.group(1) if calls else ""
    if op.calls:
      op.body = rest.split("(")[0] + " " + (_FUSION_KIND.search(rest) or re.match("", "")).group(0)
    computations[computation].append(op)
    instructions[name] = op
    if entry:
      instructions.schedule.append(op)
  for op in instructions.values():
    op.op_names = [op.op_name] if op.op_name else []
    op.ops = {op.opcode}
    if op.calls and op.calls in computations:
      op.body += "\n" + "\n".join(bodies[op.calls])
      fused = computations[op.calls]
      op.ops = {f.opcode for f in fused} - {"parameter"} or op.ops
      op.op_names += sorted({f.op_name for f in fused if f.op_name} - {op.op_name})
      for f in fused:
        op.files |= f.files
        if f.opcode == "fusion" and f.backend_kind and not op.backend_kind:
          op.backend_kind = f.backend_kind
    op.files.discard("")
  return instructions


def read_text(path: str) -> str:
  """A text file, gunzipped when it ends in .gz."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", errors="replace") as f:
    return f.read()


# --------------------------------------------------------------------------------------------
# Profile: events.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
  """One timed event of the profile (ns)."""
  plane: str
  line: str
  name: str
  start_ns: float
  dur_ns: float
  stats: dict


# Lines that XProf derives from the stream lines (absent from raw traces; skipped if present).
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Launch Stats", "Source code", "TensorFlow Ops",
                  "TensorFlow Name Scope", "Async XLA Ops")


def _is_device_plane(name: str) -> bool:
  return name.startswith("/device:") and not name.startswith("/device:CPU")


def _keep(plane: str, line: str, dur_ns: float, stats: dict) -> bool:
  if dur_ns <= 0 or line in _DERIVED_LINES or line == "CUPTI overhead":
    return False
  return _is_device_plane(plane) or "hlo_op" in stats


def _xplane(path: str):
  """`jax.profiler.ProfileData` of an .xplane.pb file (or of a gzipped one, as the suite returns them)."""
  if path.endswith(".gz"):
    with gzip.open(path, "rb") as f:
      return jax.profiler.ProfileData.from_serialized_xspace(f.read())
  return jax.profiler.ProfileData.from_file(path)


def events_from_xplane(path: str) -> list:
  """Device events, and host events that carry an 'hlo_op', of an .xplane.pb(.gz) file."""
  data = _xplane(path)
  events = []
  for plane in data.planes:
    device = _is_device_plane(plane.name)
    for line in plane.lines:
      for ev in line.events:
        try:
          stats = dict(ev.stats)
        except Exception:  # pylint: disable=broad-except  # A stat of an unexpected type.
          stats = {}
        if (device or "hlo_op" in stats) and _keep(plane.name, line.name, ev.duration_ns, stats):
          events.append(Event(plane.name, line.name, ev.name, float(ev.start_ns), float(ev.duration_ns), stats))
  return events


def events_from_trace_json(path: str) -> list:
  """The same events from a (gzipped) Chrome trace JSON: ts and dur in microseconds."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  raw = data.get("traceEvents", []) if isinstance(data, dict) else data
  processes, threads = {}, {}
  for ev in raw:
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      processes[ev.get("pid")] = ev.get("args", {}).get("name", "")
    elif ev.get("ph") == "M" and ev.get("name") == "thread_name":
      threads[(ev.get("pid"), ev.get("tid"))] = ev.get("args", {}).get("name", "")
  events = []
  for ev in raw:
    if ev.get("ph") != "X":
      continue
    plane, line = processes.get(ev.get("pid"), ""), threads.get((ev.get("pid"), ev.get("tid")), "")
    stats, dur = ev.get("args", {}) or {}, 1e3 * float(ev.get("dur", 0))
    if _keep(plane, line, dur, stats):
      events.append(Event(plane, line, ev.get("name", ""), 1e3 * float(ev.get("ts", 0)), dur, stats))
  return events


def events_from_xplane_proto(path: str) -> list:
  """Last resort: the xplane.pb through a protobuf module, where one is importable."""
  xplane_pb2 = None
  for module in ("tsl.profiler.protobuf.xplane_pb2", "xprof.protobuf.xplane_pb2",
                 "tensorboard_plugin_profile.protobuf.xplane_pb2"):
    try:
      xplane_pb2 = __import__(module, fromlist=["XSpace"])
      break
    except Exception:  # pylint: disable=broad-except
      continue
  if xplane_pb2 is None:
    raise RuntimeError("no xplane protobuf module importable")
  space = xplane_pb2.XSpace()
  with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
    space.ParseFromString(f.read())
  events = []
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
    for line in plane.lines:
      for ev in line.events:
        stats = {}
        for s in ev.stats:
          kind = s.WhichOneof("value")
          value = getattr(s, kind) if kind else None
          stats[stat_names.get(s.metadata_id, str(s.metadata_id))] = (
              stat_names.get(value, value) if kind == "ref_value" else value)
        dur = ev.duration_ps / 1e3
        if _keep(plane.name, line.name, dur, stats):
          start = line.timestamp_ns + ev.offset_ps / 1e3
          events.append(Event(plane.name, line.name, names.get(ev.metadata_id, "?"), start, dur, stats))
  return events


def find_trace_files(trace_dir: str) -> dict:
  """{'xplane': [...], 'trace_json': [...], 'listing': [...]}, newest first."""
  listing = sorted(glob.glob(os.path.join(trace_dir, "**", "*"), recursive=True))
  files = [p for p in listing if os.path.isfile(p)]
  newest = lambda ps: sorted(ps, key=os.path.getmtime, reverse=True)
  return {"xplane": newest([p for p in files if p.endswith((".xplane.pb", ".xplane.pb.gz"))]),
          "trace_json": newest([p for p in files if p.endswith((".trace.json.gz", ".trace.json"))
                                and not os.path.basename(p).startswith("perfetto")]) +
                        newest([p for p in files if os.path.basename(p).startswith("perfetto_trace.json")]),
          "listing": [f"{os.path.relpath(p, trace_dir)} ({os.path.getsize(p)} B)" for p in files]}


def load_events(trace_dir: str) -> tuple:
  """(events, source description, notes): tries every reader on every file found."""
  found, notes = find_trace_files(trace_dir), []
  readers = [(p, events_from_xplane, "xplane via jax.profiler.ProfileData") for p in found["xplane"]]
  readers += [(p, events_from_trace_json, "trace JSON") for p in found["trace_json"]]
  readers += [(p, events_from_xplane_proto, "xplane via protobuf") for p in found["xplane"]]
  for path, reader, how in readers:
    try:
      events = reader(path)
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"{how} failed on {os.path.basename(path)}: {type(e).__name__}: {e}"[:300])
      continue
    if events:
      return events, f"{how}: {os.path.relpath(path, trace_dir)}", notes
    notes.append(f"{how}: no device or XLA-op events in {os.path.basename(path)}")
  notes.append("trace folder holds: " + ("; ".join(found["listing"]) or "nothing"))
  return [], None, notes


# --------------------------------------------------------------------------------------------
# Profile: attribution.
# --------------------------------------------------------------------------------------------

PHASES = ("query forward (frozen)", "prompted forward + loss", "backward", "optimizer", "other", "unattributed")
_MOVE_OPS = {"transpose", "copy", "bitcast", "reshape", "broadcast", "parameter", "tuple", "get-tuple-element",
             "constant", "slice", "bitcast-convert"}
_SLICE_OPS = {"dynamic-slice", "dynamic-update-slice", "pad", "concatenate", "slice", "gather", "scatter", "iota",
              "select-and-scatter"}


def _is_optimizer_file(path: str) -> bool:
  return ("/optax/" in path and "/losses/" not in path) or path.endswith("libml/optim.py")


def _phase_of_name(name: str):
  if "transpose(" in name:
    return "backward"
  if "jvp(" in name:
    return "prompted forward + loss"
  if "PromptedViT" in name or "encoderblock_" in name:
    return "query forward (frozen)"
  return None


def phase_of(op, stats: dict) -> str:
  """Which part of the step a kernel belongs to, from HLO op_names (else the trace annotation)."""
  names = []
  if op is not None:
    names = op.op_names
  if not names:
    full = "/".join(str(stats[k]) for k in ("prefix", "name") if stats.get(k))
    names = [n for n in (stats.get("op_name"), full, stats.get("tf_op")) if n]
  if op is not None and op.files and all(_is_optimizer_file(f) for f in op.files):
    return "optimizer"
  if not names:
    return "unattributed"
  votes = collections.Counter(_phase_of_name(str(n)) for n in names)
  own = _phase_of_name(str(names[0]))
  if own is not None:
    return own
  if op is not None and any(_is_optimizer_file(f) for f in op.files):
    return "optimizer"
  best = [p for p, _ in votes.most_common() if p is not None]
  return best[0] if best else "other"


def category_of(kernel: str, op) -> str:
  """Kernel category: GEMM library, attention, or the kind of fusion."""
  k = kernel.lower()
  if "memcpy" in k or "memset" in k:
    return "memcpy/memset"
  names = " ".join(op.op_names) if op is not None else ""
  backward = lambda s: re.search(r"backward|bwd|bprop|dgrad", s.lower()) is not None
  library = kernel_library_class(kernel)[1] if op is None else None  # From the kernel name alone.
  if library == "conv" or (op is not None and "conv" in op.target.lower()):
    return "convolution" + (" (patch embedding)" if op is not None and "embedding" in op.op_name else "") + (
        " (no HLO op)" if op is None else "")
  if library in ("attn_fwd", "attn_bwd"):
    return "attention: cuDNN " + library[-3:]
  if re.search(r"fmha|sdpa|flash_[fb]prop", k) or (op is not None and (
      re.search(r"fmha|attention|sdpa", op.target.lower()) or
      ("cudnn" in op.backend_kind.lower() and "dot_product_attention" in names))):
    return "attention: cuDNN " + ("bwd" if backward(k) or (op is not None and (
        backward(op.target) or "transpose(" in names)) else "fwd")
  if op is not None and op.target:
    t = op.target.lower()
    if "cublas" in t or "gemm" in t or "matmul" in t:
      return "gemm: cuBLASLt" if "$lt$" in t else "gemm: cuBLAS"
    if "cudnn" in t:
      return "cuDNN other"
    return "custom-call: " + op.target[:40]
  if op is not None and op.backend_kind:
    b = op.backend_kind.lower()
    if "triton_gemm" in b or ("triton" in b and "dot" in op.ops):
      return "gemm: Triton"
    if "cudnn" in b:
      return "gemm: cuDNN fusion"
    if "custom_fusion" in b or "cutlass" in b:
      return "gemm: CUTLASS fusion"
  if op is None and k.startswith("gemm_fusion"):
    return "gemm: Triton (no HLO op)"
  if re.search(r"nvjet|gemm|xmma|cutlass|wgmma|cublas|splitk", k) and not _XLA_KERNEL.match(k):
    return "gemm: library kernel" + (" (no HLO op)" if op is None else "")
  if op is None:
    if "triton" in k:
      return "Triton kernel (no HLO op)"
    return "other (no HLO op)"
  ops = op.ops
  if op.files and all(_is_optimizer_file(f) for f in op.files):
    return "optimizer update"
  if ops & {"dot", "convolution"}:
    return "gemm: XLA-emitted dot/conv"
  if ops <= _MOVE_OPS:
    if ops & _SLICE_OPS:
      return "slice/pad/concat/gather"
    return "transpose" if "transpose" in ops else ("copy" if "copy" in ops else "reshape/broadcast")
  if "LayerNorm" in names or "encoder_norm" in names:
    return "layer norm"
  if ops & {"tanh", "erf"} or "gelu" in names or ("MlpBlock" in op.op_name and not ops <= _MOVE_OPS | {"convert"}):
    return "GELU (+ bias/residual)"
  if "exponential" in ops and ops & {"reduce", "reduce-window"}:
    return "softmax / cross-entropy"
  if ops & _SLICE_OPS:
    return "slice/pad/concat/gather"
  if "reduce" in ops:
    return "reduce (other)"
  if "convert" in ops and ops <= _MOVE_OPS | {"convert"}:
    return "dtype convert"
  if any(_is_optimizer_file(f) for f in op.files):
    return "optimizer update"
  if "sort" in ops:
    return "sort / top-k"
  return "elementwise (other)"


# --------------------------------------------------------------------------------------------
# Profile: kernels -> HLO instructions where the trace does not say (kernels of command buffers).
# --------------------------------------------------------------------------------------------

# Instructions that launch nothing.
_NO_KERNEL_OPS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
                  "replica-id", "opt-barrier", "add-dependency", "domain"}
_GLUE, _AUX, _MAIN = "glue", "aux", "main"
# Names of XLA-emitted kernels (fusions, Triton fusions, sorts, copies): never a library's.
_XLA_KERNEL = re.compile(r"(loop|input|wrapped|fusion|triton|gemm_fusion|copy|sort|transpose|reduce|concatenate|"
                         r"scatter|dynamic|slice|pad|convert|broadcast)[_a-z0-9]*$")


def _library_class(op) -> str:
  """What library a custom-call (or a library-backed fusion) runs: gemm, attn_fwd, attn_bwd, conv or other."""
  t = (op.target or op.backend_kind).lower()
  if re.search(r"fmha|attention|sdpa", t):
    return "attn_bwd" if re.search(r"backward|bwd", t) else "attn_fwd"
  if "conv" in t:
    return "conv"
  if re.search(r"gemm|matmul|cublas", t) or ("cudnn" in t and "dot" in op.ops):
    return "gemm"
  return "other"


def _is_library_op(op) -> bool:
  """Its kernels are a library's (cuBLAS, cuDNN, CUTLASS), not named after the instruction."""
  if op.opcode == "custom-call":
    return True
  b = op.backend_kind.lower()
  return op.opcode == "fusion" and ("cudnn" in b or "custom_fusion" in b or "cutlass" in b)


def kernel_library_class(kernel: str) -> tuple:
  """(role, class) of a kernel that is not named after an HLO instruction, from its name alone.

  role: 'glue' (memset, memcpy: belongs to the op next to it), 'main' (a library call's main kernel, one per
  call), 'aux' (a library call's helper kernel: cuDNN attention's dO.O / dQ conversion, convolution padding,
  a split-K reduction) or None (unknown). class: gemm, attn_fwd, attn_bwd, conv or other.
  """
  k = kernel.lower()
  if "memcpy" in k or "memset" in k:
    return _GLUE, "other"
  if _XLA_KERNEL.match(k):
    return None, "other"
  if re.search(r"fmha|sdpa|flash_[fb]prop|flash_(fwd|bwd)", k):
    return _MAIN, ("attn_bwd" if re.search(r"bprop|bwd|backward", k) else "attn_fwd")
  if "cudnn::fusion" in k or "dot_do_o" in k or "convert_dq" in k:
    return _AUX, "attn_bwd"
  if re.search(r"fprop|dgrad|wgrad|implicit_(gemm|precomp)|conv(olution|2d|_|$)", k):
    return _MAIN, "conv"
  if re.search(r"nhwc|nchw|addpadding", k):
    return _AUX, "conv"
  if re.search(r"splitk|reduce_kernel|epilogue", k) and not k.startswith(("loop_", "input_")):
    return _AUX, "gemm"
  if re.search(r"nvjet|gemm|xmma|cutlass|wgmma|cublas|^sm\d+_", k):
    return _MAIN, "gemm"
  return None, "other"


def _kernel_key(name: str) -> str:
  """The kernel name XLA gives an instruction's kernel: its name with '.' as '_'."""
  return name.replace(".", "_")


def kernel_groups(hlo) -> dict:
  """Instruction name -> its kernel group, for the instructions that launch XLA-emitted kernels.

  XLA emits one kernel for identical fusions and names it after one of them: instructions with the same
  deduplicated_name share one, and so may fusions of identical fused computations without that metadata
  (e.g. wrapped_convert.14 runs kernel 'wrapped_convert_15'). A group joins both; a kernel name identifies its
  group only, and the schedule order tells which instruction of the group it ran for.
  """
  cached = getattr(hlo, "_kernel_groups", None)
  if cached is not None:
    return cached
  parent = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  first_of_body = {}
  for op in hlo.values():
    if not (op.entry or op.opcode == "fusion") or op.opcode in _NO_KERNEL_OPS or _is_library_op(op):
      continue
    find(op.name)
    if op.dedup_name:
      parent[find(op.name)] = find(op.dedup_name)
    if op.body:
      other = first_of_body.setdefault(op.body, op.name)
      parent[find(op.name)] = find(other)
  groups = {name: find(name) for name in parent}
  try:
    hlo._kernel_groups = groups  # pylint: disable=protected-access
  except AttributeError:  # A plain dict.
    pass
  return groups


def _schedule_tokens(hlo) -> tuple:
  """(tokens, ops) of the ENTRY schedule's kernel-launching instructions: 'k:<kernel name>' for XLA-emitted
  kernels, 'lib:<class>' for library calls."""
  tokens, ops = [], []
  for op in getattr(hlo, "schedule", []):
    if op.opcode in _NO_KERNEL_OPS:
      continue
    if _is_library_op(op):
      tokens.append("lib:" + _library_class(op))
    else:
      tokens.append("k:" + kernel_groups(hlo).get(op.name, op.name))
    ops.append(op)
  return tokens, ops


def attribute_kernels(events, hlo) -> tuple:
  """The HLO instruction of each event, and how it was found: ([HloOp or None], [method]).

  Each stream's kernels (of the module, in time order) are aligned with the ENTRY schedule repeated once per
  execution (difflib.SequenceMatcher on tokens: an XLA kernel's kernel group, a library call's main kernel's
  library), since a command buffer runs its commands in schedule order. Methods:
  'hlo_op': the trace's own annotation (kernels launched outside command buffers carry it);
  'schedule': the instruction of the slot the alignment put it in;
  'name': an XLA kernel the alignment left out: the free slot of its kernel group between its aligned
    neighbors, else the group's instruction it is named after ('name (shared)' when the group spans phases);
  'order': a library main kernel the alignment left out (the free slot of its library between its neighbors),
    a library helper kernel (cuDNN's dO.O before / dQ conversion after the flash backward kernel, conv padding:
    the library call next to it), an unknown kernel or a memcpy (the one free slot between its neighbors, e.g.
    a sort inside a fusion, a copy);
  'neighbor': a memset (or a kernel left over): the op of the library kernel right after it, else of the
    kernel before it;
  None: not matched.
  """
  ops, methods = [None] * len(events), [None] * len(events)
  if not hlo:
    return ops, methods
  for i, e in enumerate(events):
    op = hlo.get(str(e.stats.get("hlo_op", "")).lstrip("%"))
    if op is not None:
      ops[i], methods[i] = op, "hlo_op"
  if all(m is not None for m in methods):
    return ops, methods
  sched_tokens, sched_ops = _schedule_tokens(hlo)
  if not sched_tokens:
    return ops, methods
  groups = kernel_groups(hlo)
  keys = {_kernel_key(name): group for name, group in groups.items()}  # XLA kernel name -> kernel group
  by_key = collections.defaultdict(list)  # kernel group -> its instructions in the schedule
  for op in sched_ops:
    if not _is_library_op(op):
      by_key[groups.get(op.name, op.name)].append(op)
  by_line = collections.defaultdict(list)
  for i, e in enumerate(events):
    module = e.stats.get("hlo_module")
    if module and getattr(hlo, "name", "") and str(module) != hlo.name:
      continue  # Another program's kernels.
    by_line[(e.plane, e.line)].append(i)
  for idx in by_line.values():
    idx.sort(key=lambda i: events[i].start_ns)
    _align_line(events, idx, sched_tokens, sched_ops, keys, groups, by_key, ops, methods)
  return ops, methods


def _event_token(e, op, keys, groups) -> tuple:
  """(token, role, class) of an event: tokens as `_schedule_tokens`'; role/class of library kernels."""
  if op is not None:
    if _is_library_op(op):
      role, cls = kernel_library_class(e.name)
      return ("lib:" + _library_class(op) if role == _MAIN else None), role, _library_class(op)
    return "k:" + groups.get(op.name, op.name), "xla", None
  if e.name in keys:
    return "k:" + keys[e.name], "xla", None
  base = re.sub(r"_\d+$", "", e.name)  # A sort's kernels: sort_2_1, sort_2_2 for sort.2.
  if base in keys and not e.name.startswith(("loop_", "input_", "wrapped_", "fusion")):
    return "k:" + keys[base], "xla", None
  role, cls = kernel_library_class(e.name)
  return ("lib:" + cls if role == _MAIN else None), role, cls


def _align_line(events, idx, sched_tokens, sched_ops, keys, groups, by_key, ops, methods):
  """`attribute_kernels` for the events `idx` (time order) of one stream."""
  n_sched = len(sched_tokens)
  info = [_event_token(events[i], ops[i], keys, groups) for i in idx]
  seq = [(j, t) for j, (t, _, _) in enumerate(info) if t is not None]
  if not seq:
    return
  runs = max(1, math.ceil(len(seq) / n_sched))  # Executions of the module in the trace (a spare copy is harmless).
  tiled = sched_tokens * runs
  matcher = difflib.SequenceMatcher(None, tiled, [t for _, t in seq], autojunk=False)
  pos = [None] * len(idx)  # Position in the tiled schedule.
  for a, b, size in matcher.get_matching_blocks():
    for d in range(size):
      pos[seq[b + d][0]] = a + d
  taken = {p for p in pos if p is not None}
  for j, i in enumerate(idx):
    if pos[j] is not None and methods[i] is None:
      ops[i], methods[i] = sched_ops[pos[j] % n_sched], "schedule"

  def neighbor_pos(j, step):
    k = j + step
    while 0 <= k < len(idx):
      if pos[k] is not None:
        return pos[k]
      k += step
    return -1 if step < 0 else len(tiled)

  # XLA kernels and library main kernels the alignment left out: a free schedule slot between their neighbors.
  for j, i in enumerate(idx):
    token, role, cls = info[j]
    if pos[j] is not None or token is None:
      continue
    lo, hi = neighbor_pos(j, -1), neighbor_pos(j, 1)
    free = [p for p in range(lo + 1, min(hi, len(tiled))) if p not in taken and tiled[p] == token]
    if free:
      pos[j] = free[0]
      taken.add(free[0])
      if methods[i] is None:
        ops[i], methods[i] = sched_ops[free[0] % n_sched], ("order" if role == _MAIN else "name")
    elif role == "xla" and methods[i] is None:
      group = by_key.get(token[2:], [])
      if group:
        rep = next((o for o in group if _kernel_key(o.name) == events[i].name),
                   next((o for o in group if o.name == token[2:]), group[0]))
        shared = len({_phase_of_name(o.op_name) for o in group}) > 1
        ops[i], methods[i] = rep, ("name (shared)" if shared else "name")

  # Helper kernels, memsets/memcpys and unknown kernels: the library call next to them.
  def library_neighbor(j, step, cls):
    k = j + step
    while 0 <= k < len(idx):
      _, role, c = info[k]
      if role == _MAIN:
        return idx[k] if c == cls and ops[idx[k]] is not None else None
      if role not in (_GLUE, _AUX):
        return None
      k += step
    return None

  for j, i in enumerate(idx):
    if methods[i] is not None:
      continue
    token, role, cls = info[j]
    if role == _AUX:
      order = (1, -1) if "dot_do_o" in events[i].name.lower() else (-1, 1)
      for step in order:
        k = library_neighbor(j, step, cls)
        if k is not None:
          ops[i], methods[i] = ops[k], "order"
          break
      else:
        lo, hi = neighbor_pos(j, -1), neighbor_pos(j, 1)
        slots = [p for p in range(lo + 1, min(hi, len(tiled))) if tiled[p] == "lib:" + cls]
        if len(slots) == 1:
          ops[i], methods[i] = sched_ops[slots[0] % n_sched], "order"
  # Unknown kernels (e.g. a sort's inside a fusion), then memcpys/memsets: the one schedule slot left free
  # between their aligned neighbors (a copy's memcpy, a sort fusion's kernels), else (memsets, unknown
  # kernels) the op of the library kernel right after them, else of the kernel before them.
  for wanted in (None, _GLUE):
    for j, i in enumerate(idx):
      if methods[i] is not None or info[j][1] != wanted:
        continue
      lo, hi = neighbor_pos(j, -1), neighbor_pos(j, 1)
      free = [p for p in range(lo + 1, min(hi, len(tiled))) if p not in taken]
      if len(free) == 1:
        taken.add(free[0])
        pos[j] = free[0]
        ops[i], methods[i] = sched_ops[free[0] % n_sched], "order"
  for j, i in enumerate(idx):
    if methods[i] is not None or info[j][1] not in (None, _GLUE):
      continue
    nxt = j + 1
    while nxt < len(idx) and info[nxt][1] == _GLUE:
      nxt += 1
    prev = j - 1
    while prev >= 0 and info[prev][1] == _GLUE:
      prev -= 1
    after = idx[nxt] if nxt < len(idx) and info[nxt][1] != "xla" else None
    before = idx[prev] if prev >= 0 else None
    for k in (after, before):
      if k is not None and ops[k] is not None:
        ops[i], methods[i] = ops[k], "neighbor"
        break


def graph_order_check(events, ops, hlo):
  """(pairs agreeing, pairs) of consecutive XLA kernels of one CUDA-graph launch: the graph node ids that the
  trace gives kernels of command buffers count the buffer's commands, so the step between two kernels' node ids
  should equal the step between the schedule slots they were matched to (an independent check of the alignment;
  a command of two nodes, e.g. a sort's memcpy + kernel, makes one pair disagree)."""
  slot = {id(op): k for k, op in enumerate(_schedule_tokens(hlo)[1])} if hlo else {}
  launches = collections.defaultdict(list)
  for e, op in zip(events, ops):
    node = e.stats.get("cuda_graph_node_id")
    if node is None or op is None or id(op) not in slot or _is_library_op(op) or kernel_library_class(e.name)[0]:
      continue
    launches[(e.plane, e.line, e.stats.get("hlo_op"), e.stats.get("correlation_id"))].append(
        (e.start_ns, int(node), slot[id(op)]))
  agree = pairs = 0
  for items in launches.values():
    items.sort()
    for (_, n1, s1), (_, n2, s2) in zip(items, items[1:]):
      pairs += 1
      agree += (n2 - n1) == (s2 - s1)
  return agree, pairs


MATRIX_CATEGORIES = ("gemm", "attention", "convolution")
ELEMENTWISE_GROUPS = ("LayerNorm", "MLP bias + GELU", "residual add", "attention pad/slice",
                      "attention prefix concat/split", "embedding (cls, position)", "prompts (selection, concat)",
                      "dtype convert", "softmax / cross-entropy", "optimizer", "memcpy/memset", "other",
                      "other (no HLO op)")
_ATTENTION_PAD_SLICE = re.compile(r"(MultiHeadDotProductAttention|Attention)[^/]*/(.*/)?(pad|slice|jit\(_pad\))")
_ATTENTION_PREFIX = re.compile(r"(MultiHeadDotProductAttention|Attention)[^/]*/(.*/)?(concatenate|split)")
_PROMPTS = re.compile(r"[eg]_prompt/|/prompt|Transformer/concatenate")
_SOFTMAX = re.compile(r"softmax|cross_entropy|logsumexp|log_softmax|one_hot|/loss")


def _group_of_name(name: str):
  """The elementwise group a JAX name stack points at, or None."""
  if _ATTENTION_PAD_SLICE.search(name):
    return "attention pad/slice"
  if _ATTENTION_PREFIX.search(name):
    return "attention prefix concat/split"
  if "posembed_input" in name or re.search(r"/embedding/|/cls\b|_pool/", name):
    return "embedding (cls, position)"
  if _PROMPTS.search(name):
    return "prompts (selection, concat)"
  if "LayerNorm" in name or "encoder_norm" in name:
    return "LayerNorm"
  if "MlpBlock" in name:
    return "MLP bias + GELU"
  if re.search(r"encoderblock_\d+/add(_any)?$", name):
    return "residual add"
  if _SOFTMAX.search(name):
    return "softmax / cross-entropy"
  return None


def elementwise_group(category: str, op) -> str:
  """What a non-matrix kernel computes, from its fusion's op_names (its own first, then its fused ops').

  LayerNorm (with what is fused into it, e.g. the residual add before the norm), MLP bias + GELU, residual
  adds, attention pad/slice (cuDNN attention pads the tokens to a multiple of CUDNN_PAD_MULTIPLE and slices the result),
  attention prefix concat/split (prefix-tuning's key/value prompts), embedding (cls token, position add),
  prompts (selection, concat), dtype converts (fusions of converts and data movement only), softmax /
  cross-entropy, optimizer (optax or libml/optim.py source only), memcpy/memset, other.
  """
  if category == "memcpy/memset":
    return "memcpy/memset"
  if op is None:
    return "other (no HLO op)"
  if category == "optimizer update" or (op.files and all(_is_optimizer_file(f) for f in op.files)):
    return "optimizer"
  if "convert" in op.ops and op.ops <= _MOVE_OPS | {"convert"}:
    return "dtype convert"
  own = _group_of_name(op.op_name) if op.op_name else None
  if own:
    return own
  if op.ops <= _MOVE_OPS | _SLICE_OPS and any(_ATTENTION_PAD_SLICE.search(n) for n in op.op_names):
    return "attention pad/slice"
  votes = collections.Counter(g for g in map(_group_of_name, op.op_names) if g)
  if votes:
    return votes.most_common(1)[0][0]
  if any(_is_optimizer_file(f) for f in op.files):
    return "optimizer"
  return "other"


def fused_groups(op, group: str) -> set:
  """The other elementwise groups whose ops a kernel's fusion holds (e.g. a LayerNorm with its residual add)."""
  if op is None or op.opcode != "fusion" or group in ("dtype convert", "optimizer", "memcpy/memset"):
    return set()
  return {g for g in map(_group_of_name, op.op_names) if g and g != group}


def _union(intervals) -> tuple:
  """(busy ns of the union of [start, end) intervals, the gaps between them)."""
  busy, gaps, end = 0.0, [], None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      if end is not None:
        gaps.append(start - end)
      busy += stop - start
      end = stop
    elif stop > end:
      busy += stop - end
      end = stop
  return busy, gaps


def breakdown(events, *, num_steps: int, hlo=None, untraced_step_ms=None, traced_step_ms=None,
              step_flops=None, top: int = 25) -> dict:
  """Kernel time per step by category, by part of the step and by kernel, and the idle time.

  Args:
    events: `Event`s from `load_events`.
    num_steps: steps the trace covers (times are divided by it).
    hlo: `parse_hlo` of the traced module, or None (then kernel names and annotations only).
    untraced_step_ms: the step's median time when not traced.
    traced_step_ms: its median time while traced.
    step_flops: {'query_forward', 'prompted_forward', 'backward', 'train_total': FLOPs per step}
      (analytic matrix-product FLOPs), for the TFLOP/s of the matrix kernels.
    top: kernels listed.
  """
  hlo = hlo or {}
  device = [e for e in events if _is_device_plane(e.plane)]
  kind = "GPU kernels (CUPTI)" if device else "XLA thunks on host threads (CPU backend)"
  device = device or events
  out = {"events": kind, "num_steps": num_steps, "kernels_per_step": len(device) / max(num_steps, 1),
         "hlo_ops_known": bool(hlo), "notes": []}
  if not device:
    out["notes"].append("no events to break down")
    return out
  per_step = 1e-6 / num_steps  # ns -> ms per step
  total = sum(e.dur_ns for e in device)
  busy, gaps = _union((e.start_ns, e.start_ns + e.dur_ns) for e in device)
  window = max(e.start_ns + e.dur_ns for e in device) - min(e.start_ns for e in device)
  out.update({
      "kernel_ms_per_step": total * per_step, "busy_ms_per_step": busy * per_step,
      "window_ms_per_step": window * per_step, "idle_in_window_ms_per_step": (window - busy) * per_step,
      "untraced_step_ms": untraced_step_ms, "traced_step_ms": traced_step_ms,
      "busy_fraction_of_untraced_step": (busy * per_step / untraced_step_ms) if untraced_step_ms else None,
      "gaps_ms_per_step": {
          "under_10us": sum(g for g in gaps if g < 1e4) * per_step,
          "10us_to_100us": sum(g for g in gaps if 1e4 <= g < 1e5) * per_step,
          "over_100us": sum(g for g in gaps if g >= 1e5) * per_step,
          "count_per_step": len(gaps) / num_steps,
          "largest_ms": [g * 1e-6 for g in sorted(gaps, reverse=True)[:5]]},
  })
  by_category, by_phase = collections.Counter(), collections.Counter()
  counts = collections.Counter()
  matrix = collections.defaultdict(collections.Counter)
  kernels = collections.defaultdict(lambda: {"ns": 0.0, "count": 0, "categories": collections.Counter(),
                                             "phases": collections.Counter(), "hlo_ops": collections.Counter()})
  modules, streams = collections.Counter(), collections.Counter()
  how_n, how_ns = collections.Counter(), collections.Counter()
  elementwise = collections.defaultdict(collections.Counter)  # group -> phase -> ns
  elementwise_n, elementwise_kernels = collections.Counter(), collections.defaultdict(collections.Counter)
  elementwise_fused = collections.defaultdict(collections.Counter)  # group -> other group fused in -> ns
  pad_slice = collections.defaultdict(collections.Counter)  # 'pad'/'slice' -> phase -> ns
  conv = collections.Counter()
  graphs = collections.Counter()
  ops, methods = attribute_kernels(device, hlo)
  for e, op, how in zip(device, ops, methods):
    how_n[how or "none"] += 1
    how_ns[how or "none"] += e.dur_ns
    category, phase = category_of(e.name, op), phase_of(op, e.stats)
    by_category[category] += e.dur_ns
    counts[category] += 1
    by_phase[phase] += e.dur_ns
    matrix[category][phase] += e.dur_ns
    k = kernels[e.name]
    k["ns"] += e.dur_ns
    k["count"] += 1
    k["categories"][category] += e.dur_ns
    k["phases"][phase] += e.dur_ns
    hlo_op = op.name if op is not None else str(e.stats.get("hlo_op", "")).lstrip("%")
    if hlo_op:
      k["hlo_ops"][hlo_op] += e.dur_ns
    if category.startswith("convolution") or (op is not None and "conv" in op.target.lower()):
      conv[category] += e.dur_ns
    if not category.startswith(MATRIX_CATEGORIES):
      group = elementwise_group(category, op)
      elementwise[group][phase] += e.dur_ns
      elementwise_n[group] += 1
      elementwise_kernels[group][e.name] += e.dur_ns
      for other in fused_groups(op, group):
        elementwise_fused[group][other] += e.dur_ns
      if group == "attention pad/slice":
        pad_slice["pad" if "pad" in op.ops else "slice"][phase] += e.dur_ns
    if "cuda_graph_id" in e.stats:
      graphs[str(e.stats.get("hlo_op", "?"))] += e.dur_ns
    modules[str(e.stats.get("hlo_module", "?"))] += e.dur_ns
    streams[e.line] += e.dur_ns
  pct = lambda ns: 100.0 * ns / total
  agree, pairs = graph_order_check(device, ops, hlo)
  out["graph_node_check"] = {"agree": agree, "pairs": pairs}
  out["events_matched_to_hlo"] = 1.0 - how_n["none"] / len(device)
  out["time_matched_to_hlo"] = 1.0 - how_ns["none"] / total
  out["attribution"] = {h: {"kernels_pct": 100.0 * n / len(device), "time_pct": pct(how_ns[h])}
                        for h, n in how_n.most_common()}
  nonmatrix = sum(sum(v.values()) for v in elementwise.values())
  out["elementwise"] = {
      "ms_per_step": nonmatrix * per_step,
      "groups": [{"group": g, "ms_per_step": sum(v.values()) * per_step,
                  "pct_of_elementwise": 100.0 * sum(v.values()) / nonmatrix if nonmatrix else 0.0,
                  "pct": pct(sum(v.values())), "count_per_step": elementwise_n[g] / num_steps,
                  "by_phase_ms_per_step": {p: ns * per_step for p, ns in v.most_common()},
                  "top_kernels": [[name, ns * per_step] for name, ns in elementwise_kernels[g].most_common(3)],
                  "with_fused_ms_per_step": {o: ns * per_step for o, ns in elementwise_fused[g].most_common()}}
                 for g, v in sorted(elementwise.items(), key=lambda kv: -sum(kv[1].values()))]}
  out["attention_pad_slice_ms_per_step"] = {
      "total": sum(sum(v.values()) for v in pad_slice.values()) * per_step,
      **{f"{kind}_{p}": ns * per_step for kind, v in sorted(pad_slice.items()) for p, ns in v.most_common()},
      **{kind: sum(v.values()) * per_step for kind, v in sorted(pad_slice.items())}}
  out["convolution_ms_per_step"] = {"total": sum(conv.values()) * per_step,
                                    **{c: ns * per_step for c, ns in conv.most_common()}}
  out["command_buffers_ms_per_step"] = {g: ns * per_step for g, ns in graphs.most_common(6)}
  out["categories"] = [{"category": c, "ms_per_step": ns * per_step, "pct": pct(ns),
                        "count_per_step": counts[c] / num_steps} for c, ns in by_category.most_common()]
  out["phases"] = [{"phase": p, "ms_per_step": ns * per_step, "pct": pct(ns)} for p, ns in by_phase.most_common()]
  out["category_by_phase_ms_per_step"] = {c: {p: ns * per_step for p, ns in v.most_common()}
                                          for c, v in matrix.items()}
  out["query_pass_share_of_kernel_time"] = by_phase["query forward (frozen)"] / total
  out["top_kernels"] = [
      {"kernel": name, "ms_per_step": k["ns"] * per_step, "pct": pct(k["ns"]),
       "count_per_step": k["count"] / num_steps, "mean_us": k["ns"] / k["count"] / 1e3,
       "category": k["categories"].most_common(1)[0][0],
       "phases": {p: round(100.0 * ns / k["ns"], 1) for p, ns in k["phases"].most_common(3)},
       "hlo_ops": [h for h, _ in k["hlo_ops"].most_common(3)]}
      for name, k in sorted(kernels.items(), key=lambda kv: -kv[1]["ns"])[:top]]
  out["distinct_kernels"] = len(kernels)
  out["hlo_modules_ms_per_step"] = {m: ns * per_step for m, ns in modules.most_common(5)}
  out["streams_ms_per_step"] = {s: ns * per_step for s, ns in streams.most_common(6)}
  matmul_ns = sum(ns for c, ns in by_category.items() if c.startswith(MATRIX_CATEGORIES))
  out["matmul_kernel_ms_per_step"] = matmul_ns * per_step
  out["non_matmul_kernel_ms_per_step"] = (total - matmul_ns) * per_step
  if step_flops:
    mm = {p: sum(v.get(p, 0.0) for c, v in matrix.items() if c.startswith(MATRIX_CATEGORIES))
          for p in PHASES}
    rate = lambda f, ns: f / (ns * 1e-9) / 1e12 if ns else None
    out["matmul_tflops"] = {
        "all": rate(step_flops["train_total"], matmul_ns / num_steps),
        "query forward (frozen)": rate(step_flops["query_forward"], mm["query forward (frozen)"] / num_steps),
        "prompted forward + loss": rate(step_flops["prompted_forward"], mm["prompted forward + loss"] / num_steps),
        "backward": rate(step_flops["backward"], mm["backward"] / num_steps)}
  if how_n["none"] == len(device) and hlo:
    out["notes"].append("no kernel was matched to the HLO dump (a different module?)")
  if graphs:
    out["notes"].append(
        f"{100.0 * sum(graphs.values()) / total:.0f}% of the kernel time ran in CUDA graphs (XLA command buffers), "
        "whose kernels are annotated with the command buffer only: they are matched to the HLO by aligning the "
        "kernel sequence of each stream with the ENTRY schedule ('schedule': XLA kernels by name, deduplicated "
        "kernels included, library calls' main kernels by library; 'order': library helper kernels, memcpys "
        "and kernels left out by the alignment, by the slot between aligned neighbors; 'neighbor': memsets, "
        "the library call after them)")
  if how_n.get("name (shared)"):
    out["notes"].append(f"{how_n['name (shared)']} kernels outside the alignment run a kernel shared by "
                        "instructions of different phases: attributed to the instruction they are named after")
  if kind.startswith("GPU"):
    out["notes"].append("the traced steps are slower than untraced ones (profiler overhead), and idle gaps in "
                        "the trace overstate the untraced step's; compare busy time with the untraced step time")
  return out


def format_breakdown(b: dict, title: str = "") -> str:
  """`breakdown` as text."""
  lines = [f"== Profile {title}: {b.get('events')}, {b.get('num_steps')} steps, "
           f"{b.get('kernels_per_step', 0):.0f} kernels/step"]
  if "kernel_ms_per_step" not in b:
    return "\n".join(lines + [f"  note: {n}" for n in b.get("notes", [])])
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  lines.append(f"per step: kernels {b['kernel_ms_per_step']:.2f} ms, busy {b['busy_ms_per_step']:.2f} ms, "
               f"trace window {b['window_ms_per_step']:.2f} ms; step untraced {fmt(b['untraced_step_ms'])} ms, "
               f"traced {fmt(b['traced_step_ms'])} ms; busy/untraced step "
               + (f"{100 * b['busy_fraction_of_untraced_step']:.1f}%" if b["busy_fraction_of_untraced_step"] else "-"))
  g = b["gaps_ms_per_step"]
  lines.append(f"gaps per step (traced): {g['count_per_step']:.0f}, <10us {g['under_10us']:.2f} ms, "
               f"10-100us {g['10us_to_100us']:.2f} ms, >100us {g['over_100us']:.2f} ms; largest "
               + ", ".join(f"{x:.2f}" for x in g["largest_ms"]) + " ms")
  lines.append(f"matrix kernels (gemm, attention, convolution) {b['matmul_kernel_ms_per_step']:.2f} ms/step, others "
               f"{b['non_matmul_kernel_ms_per_step']:.2f} ms/step; frozen query pass "
               f"{100 * b['query_pass_share_of_kernel_time']:.1f}% of kernel time")
  if "attribution" in b:
    lines.append(f"matched to HLO instructions: {100 * b['events_matched_to_hlo']:.1f}% of kernels, "
                 f"{100 * b.get('time_matched_to_hlo', 0):.1f}% of kernel time; by (% kernels / % time): "
                 + ", ".join(f"{h} {v['kernels_pct']:.1f}/{v['time_pct']:.1f}" for h, v in b["attribution"].items()))
    check = b.get("graph_node_check") or {}
    if check.get("pairs"):
      lines.append(f"alignment check: {check['agree']} of {check['pairs']} pairs of consecutive XLA kernels in a CUDA "
                   "graph step as far in graph node ids as in the HLO schedule (commands of several nodes, e.g. a "
                   "sort's memcpy + kernel, account for a few)")
  if b.get("matmul_tflops"):
    lines.append("matrix-kernel TFLOP/s (analytic FLOPs / kernel time): " +
                 ", ".join(f"{k} {fmt(v)}" for k, v in b["matmul_tflops"].items()))
  lines.append(f"{'category':<34} {'ms/step':>8} {'%':>6} {'n/step':>7}   by phase (ms/step)")
  short = {"query forward (frozen)": "query", "prompted forward + loss": "fwd", "backward": "bwd",
           "optimizer": "opt", "other": "other", "unattributed": "?"}
  for c in b["categories"]:
    split = b["category_by_phase_ms_per_step"][c["category"]]
    lines.append(f"{c['category'][:34]:<34} {c['ms_per_step']:8.3f} {c['pct']:6.1f} {c['count_per_step']:7.1f}   "
                 + " ".join(f"{short.get(p, p)} {ms:.2f}" for p, ms in split.items()))
  lines.append(f"{'phase':<34} {'ms/step':>8} {'%':>6}")
  for p in b["phases"]:
    lines.append(f"{p['phase']:<34} {p['ms_per_step']:8.3f} {p['pct']:6.1f}")
  e = b.get("elementwise")
  if e and e.get("groups"):
    lines.append(f"{'non-matrix kernels by what they fuse':<34} {'ms/step':>8} {'%':>6} {'n/step':>7}   "
                 f"by phase (ms/step); % of the {e['ms_per_step']:.2f} ms/step of non-matrix kernels")
    for g in e["groups"]:
      lines.append(f"{g['group'][:34]:<34} {g['ms_per_step']:8.3f} {g['pct_of_elementwise']:6.1f} "
                   f"{g['count_per_step']:7.1f}   "
                   + " ".join(f"{short.get(p, p)} {ms:.2f}" for p, ms in g["by_phase_ms_per_step"].items())
                   + "   top: " + ", ".join(f"{n[:28]} {ms:.2f}" for n, ms in g["top_kernels"])
                   + ("   (in fusions also holding: " + ", ".join(
                       f"{o} {ms:.2f}" for o, ms in g["with_fused_ms_per_step"].items()) + ")"
                      if g.get("with_fused_ms_per_step") else ""))
  ps = b.get("attention_pad_slice_ms_per_step")
  if ps is not None:
    lines.append(f"attention pad+slice (cuDNN attention's token padding): {ps['total']:.3f} ms/step"
                 + "".join(f"; {kind} {ps[kind]:.3f} (" + " ".join(
                     f"{short.get(k[len(kind) + 1:], k)} {v:.2f}" for k, v in ps.items()
                     if k.startswith(kind + "_")) + ")" for kind in ("pad", "slice") if kind in ps))
  cv = b.get("convolution_ms_per_step")
  if cv is not None:
    lines.append(f"convolution kernels (patch embedding, incl. cuDNN's padding kernels): {cv['total']:.3f} ms/step"
                 + "".join(f"; {c} {ms:.3f}" for c, ms in cv.items() if c != "total"))
  if b.get("command_buffers_ms_per_step"):
    lines.append("command buffers (CUDA graphs), kernel ms/step: "
                 + ", ".join(f"{g} {ms:.2f}" for g, ms in b["command_buffers_ms_per_step"].items()))
  lines.append(f"top kernels of {b['distinct_kernels']}: ms/step, %, n/step, mean us, category, phases %, hlo ops")
  for k in b["top_kernels"]:
    phases = ",".join(f"{short.get(p, p)}{v:.0f}" for p, v in k["phases"].items())
    lines.append(f"  {k['ms_per_step']:7.3f} {k['pct']:5.1f} {k['count_per_step']:5.1f} {k['mean_us']:8.1f}  "
                 f"{k['category'][:24]:<24} {phases:<18} {k['kernel'][:90]}  [{' '.join(k['hlo_ops'])[:60]}]")
  lines.append("streams (ms/step): " + ", ".join(f"{s} {ms:.2f}" for s, ms in b["streams_ms_per_step"].items()))
  lines.append("HLO modules (ms/step): " + ", ".join(f"{m} {ms:.2f}" for m, ms in b["hlo_modules_ms_per_step"].items()))
  lines += [f"note: {n}" for n in b.get("notes", [])]
  return "\n".join(lines)
