"""What a run records about itself: the devices it runs on, the library versions, the commit.

`topology` is what decides a run's batches and prompt-vote groups (process and device counts,
images per device, global batch) plus the kind of device; `versions` the libraries that
compute it; `git_commit` the project's commit (`-dirty` when the checkout has changes; absent
when the project is not a git checkout or git is missing). `validation.record_run` stores
them in `<workdir>/run.json`; `results.json` repeats them.
"""

import collections
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time

import jax

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys of `topology` that must match for a run to resume exactly; the device kind may differ.
STRICT_KEYS = ("process_count", "device_count", "local_device_counts", "per_device_batch_size", "global_batch")
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow", "tensorflow-datasets", "numpy")
_OPTIONAL = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
_TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly")


def topology(config) -> dict:
  """The devices and batch of this start (the same on every process)."""
  devices = jax.devices()
  per_process = collections.Counter(d.process_index for d in devices)
  return {
      "process_count": jax.process_count(),
      "device_count": len(devices),
      "local_device_counts": [per_process[i] for i in range(jax.process_count())],
      "platform": ", ".join(sorted({d.platform for d in devices})),
      "device_kind": ", ".join(sorted({d.device_kind for d in devices})),
      "per_device_batch_size": config.per_device_batch_size,
      "global_batch": config.per_device_batch_size * len(devices),
  }


def describe(t: dict) -> str:
  """E.g. '2 processes x 4 TPU v4 devices (8 in all), 16 images per device, global batch 128'."""
  procs, counts, kind = t["process_count"], t["local_device_counts"], t["device_kind"]
  plural = lambda n, word: f"{n} {word}{'' if n == 1 else ('es' if word.endswith('s') else 's')}"
  if len(set(counts)) == 1:
    where = f"{plural(procs, 'process')} x {plural(counts[0], kind + ' device')}"
  else:
    where = f"{plural(procs, 'process')} with {'+'.join(map(str, counts))} {kind} devices"
  if procs > 1:
    where += f" ({t['device_count']} in all)"
  return f"{where}, {plural(t['per_device_batch_size'], 'image')} per device, global batch {t['global_batch']}"


def _version(name: str) -> str | None:
  names = _TENSORFLOW_DISTRIBUTIONS if name == "tensorflow" else (name,)
  for distribution in names:
    try:
      return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def versions() -> dict[str, str]:
  """Versions of the libraries that compute a run (those installed) and of Python."""
  out = {name: _version(name) for name in _LIBRARIES}
  out.update({name: _version(name) for name in _OPTIONAL})
  out["python"] = platform.python_version()
  return {k: v for k, v in out.items() if v is not None}


def git_commit(directory: str = PROJECT_DIR) -> str | None:
  """`git rev-parse HEAD` in `directory`, plus '-dirty' if it has changes; None if unknown."""
  env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # `git status` must not take the index lock.

  def git(*args):
    return subprocess.run(["git", *args], cwd=directory, env=env, capture_output=True, text=True, timeout=20)

  try:
    head = git("rev-parse", "HEAD")
    if head.returncode or not head.stdout.strip():
      return None
    status = git("status", "--porcelain")
  except (OSError, subprocess.SubprocessError):
    return None
  dirty = status.returncode == 0 and status.stdout.strip()
  return head.stdout.strip() + ("-dirty" if dirty else "")


def start_record(config) -> dict:
  """This start: when, where, on what, with which libraries and commit."""
  record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            "pid": os.getpid(), "argv": list(sys.argv), "topology": topology(config), "versions": versions()}
  commit = git_commit()
  if commit is not None:
    record["git_commit"] = commit
  return record
