"""Command lines of this project's Python programs, started without re-importing the libraries.

A fresh interpreter spends about 9 CPU-seconds importing TensorFlow, TensorFlow Datasets and
JAX before main.py does anything; the reliability, signal and multi-process tests start main.py
many times. `start` and `run` take the same command lines as `subprocess`
(`[python, "-m", module, ...]` or `[python, script, ...]`) and run them in a process forked from
a server that has imported those libraries once (multiprocessing's forkserver, one per test
process), as the interpreter would: `sys.argv`, `sys.path`, the environment, the working
directory, stdout and stderr, the exit status (SystemExit, uncaught exception, signal), atexit.

No library has started in the server: it only imports (no JAX backend, no TensorFlow op), so the
child initialises JAX with its own XLA_FLAGS (device count) as a fresh process does. Variables
that the libraries read at import time (JAX_*, TF_*, ...) are the server's; a command whose
environment differs in one of them, or that is not a Python program, gets a fresh interpreter.
`L2P_TEST_FRESH_INTERPRETERS=1` gives every command one.
"""

import atexit
import multiprocessing
from multiprocessing import forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback

FRESH_ENV = "L2P_TEST_FRESH_INTERPRETERS"
# Imported once by the server (the costly part of every start of main.py).
PRELOAD = ["tensorflow", "tensorflow_datasets", "jax", "flax.linen", "optax", "orbax.checkpoint",
           "clu.metric_writers", "clu.periodic_actions", "train_continual"]
# Environment variables read when those libraries are imported: the server's values must hold.
_IMPORT_TIME_PREFIXES = ("JAX_", "TF_", "XLA_PYTHON_", "OMP_", "OPENBLAS_", "MKL_", "PYTHON")
_context = None  # (multiprocessing context, the server's environment), made on first use.


def _forkserver():
  global _context
  if _context is None:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()  # Now, with the environment recorded here.
    _context = context, dict(os.environ)
  return _context


def _program(cmd: list[str]) -> tuple[str, str] | None:
  """('module' | 'script', name) of a `python -m module ...` or `python script ...` command."""
  if len(cmd) >= 2 and cmd[0] == sys.executable:
    if cmd[1] == "-m" and len(cmd) >= 3:
      return "module", cmd[2]
    if not cmd[1].startswith("-"):
      return "script", cmd[1]
  return None


def _import_time_env(env: dict) -> dict:
  return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_PREFIXES) and k != "PYTHONPATH"}


def _can_fork(cmd: list[str], env: dict) -> bool:
  if os.environ.get(FRESH_ENV) == "1" or _program(cmd) is None:
    return False
  return _import_time_env(env) == _import_time_env(_forkserver()[1])


def _exit_status(error: SystemExit) -> int:
  """The status the interpreter exits with for an uncaught SystemExit."""
  if error.code is None:
    return 0
  if isinstance(error.code, int):
    return error.code
  print(error.code, file=sys.stderr)
  return 1


def _child(cmd: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
  """Runs in the forked process: `cmd` as the interpreter would run it, then exits."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  assert not xla_bridge.backends_are_initialized(), "the server must not start JAX"
  for fd, path in ((1, stdout), (2, stderr)):
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, fd)
    os.close(out)
  os.environ.clear()
  os.environ.update(env)
  os.chdir(cwd)
  kind, name = _program(cmd)
  first = os.getcwd() if kind == "module" else os.path.dirname(os.path.abspath(name))
  extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  sys.path[:] = [first] + extra + [p for p in sys.path if p not in extra and p not in ("", first)]
  sys.argv = [name] + cmd[3 if kind == "module" else 2:]
  status = 0
  try:
    if kind == "module":
      runpy.run_module(name, run_name="__main__", alter_sys=True)
    else:
      runpy.run_path(name, run_name="__main__")
  except SystemExit as e:
    status = _exit_status(e)
  except KeyboardInterrupt:
    traceback.print_exc()
    status = -signal.SIGINT
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    status = 1
  threading._shutdown()  # pylint: disable=protected-access  (the interpreter joins threads first)
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  if status < 0:  # As the interpreter after an uncaught KeyboardInterrupt: killed by SIGINT.
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
  os._exit(status & 0xFF)  # pylint: disable=protected-access


class Started:
  """A started command: subprocess.Popen's poll / wait / kill / send_signal, output in files."""

  def __init__(self, cmd: list[str], env: dict, cwd: str, stdout: str, stderr: str):
    self.args, self.stdout_path, self.stderr_path = cmd, stdout, stderr
    for path in {stdout, stderr}:
      open(path, "w").close()
    if _can_fork(cmd, env):
      context, _ = _forkserver()
      self._process = context.Process(target=_child, args=(cmd, env, cwd, stdout, stderr), daemon=False)
      self._process.start()
      self._popen = None
      self.pid = self._process.pid
    else:
      with open(stdout, "a") as out, open(stderr, "a") as err:
        self._popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
      self.pid = self._popen.pid

  def poll(self) -> int | None:
    if self._popen is not None:
      return self._popen.poll()
    return self._process.exitcode

  def wait(self, timeout: float | None = None) -> int:
    """The exit status (negative: killed by that signal); subprocess.TimeoutExpired after `timeout`."""
    if self._popen is not None:
      return self._popen.wait(timeout)
    self._process.join(timeout)
    if self._process.exitcode is None:
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self._process.exitcode

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def output(self) -> tuple[str, str]:
    """(stdout, stderr) so far; the same text twice when they share a file."""
    with open(self.stdout_path, errors="replace") as out, open(self.stderr_path, errors="replace") as err:
      return out.read(), err.read()


def start(cmd: list[str], env: dict, cwd: str, *, log: str | None = None) -> Started:
  """Starts `cmd`; its stdout and stderr go to `log` together, or to two temporary files."""
  if log is not None:
    return Started(cmd, env, cwd, log, log)
  fd, stdout = tempfile.mkstemp(prefix="l2p_stdout_")
  os.close(fd)
  fd, stderr = tempfile.mkstemp(prefix="l2p_stderr_")
  os.close(fd)
  return Started(cmd, env, cwd, stdout, stderr)


def run(cmd: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
  """subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)."""
  started = start(cmd, env, cwd)
  try:
    status = started.wait(timeout)
  finally:
    started.kill()
    started.wait()
    stdout, stderr = started.output()
    os.remove(started.stdout_path)
    os.remove(started.stderr_path)
  return subprocess.CompletedProcess(cmd, status, stdout, stderr)

