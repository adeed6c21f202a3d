"""The tests' launcher: a command forked from the import server behaves as in a fresh interpreter."""

import os
import signal
import sys
import time

import pytest

from tests import forked

_PROGRAM = """
import atexit, json, os, sys
import jax
atexit.register(lambda: print("atexit ran"))
print(json.dumps({"argv": sys.argv[1:], "path0": sys.path[0], "cwd": os.getcwd(), "x": os.environ.get("X"),
                  "home": "HOME" in os.environ, "devices": jax.device_count()}))
print("on stderr", file=sys.stderr)
how = sys.argv[1]
if how == "raise":
  raise RuntimeError("uncaught")
if how == "sleep":
  open(sys.argv[2], "w").close()
  import time; time.sleep(60)
if how == "os_exit":
  os._exit(130)
sys.exit(int(how) if how.isdigit() else how)
"""


def _both(tmp_path, monkeypatch, *args: str, devices: int = 1):
  """(forked, fresh): forked.run of the program in each mode."""
  script = tmp_path / "program.py"
  script.write_text(_PROGRAM)
  cwd = tmp_path / "cwd"
  cwd.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items() if k != "HOME"}  # The server has HOME.
  env.update(X="set", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, str(script), *args]
  monkeypatch.delenv(forked.FRESH_ENV, raising=False)  # Whatever the suite was asked for.
  assert forked._can_fork(cmd, env)  # pylint: disable=protected-access
  got = forked.run(cmd, env, str(cwd), timeout=120)
  monkeypatch.setenv(forked.FRESH_ENV, "1")
  want = forked.run(cmd, env, str(cwd), timeout=120)
  return got, want


@pytest.mark.parametrize("how, status", [("0", 0), ("3", 3), ("a message", 1), ("raise", 1), ("os_exit", 130)])
def test_a_forked_command_exits_prints_and_sees_argv_path_cwd_and_environment_as_a_fresh_interpreter(
    tmp_path, monkeypatch, how, status):
  got, want = _both(tmp_path, monkeypatch, how, "--flag=1", devices=3)
  assert want.returncode == status
  assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
  assert '"devices": 3' in got.stdout and '"x": "set"' in got.stdout and '"home": false' in got.stdout
  assert ("atexit ran" in got.stdout) == (how != "os_exit")
  assert got.stderr.startswith("on stderr\n") and want.stderr.startswith("on stderr\n")
  # A traceback names the same error (its frames differ: runpy's own frames are above the program's).
  assert got.stderr.splitlines()[-1] == want.stderr.splitlines()[-1]
  assert ("Traceback" in got.stderr) == ("Traceback" in want.stderr) == (how == "raise")


def test_a_started_command_can_be_killed(tmp_path, monkeypatch):
  monkeypatch.delenv(forked.FRESH_ENV, raising=False)
  script = tmp_path / "program.py"
  script.write_text(_PROGRAM)
  ready = str(tmp_path / "ready")
  started = forked.start([sys.executable, str(script), "sleep", ready], dict(os.environ), str(tmp_path),
                         log=str(tmp_path / "log"))
  assert started._popen is None  # pylint: disable=protected-access  (forked, not a fresh interpreter)
  while not os.path.exists(ready):
    assert started.poll() is None, started.output()
    time.sleep(0.05)
  started.kill()
  assert started.wait(timeout=60) == -signal.SIGKILL
  assert "on stderr" in started.output()[0]
