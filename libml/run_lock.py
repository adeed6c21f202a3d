"""One run at a time in a workdir: `<workdir>/run.lock`.

The lock is a small JSON file, {host, pid, started, token, ...}, created with O_EXCL (atomic,
also on NFS) and read back to verify. A second start finds it and refuses in one line naming
the holder. A lock whose holder is gone is taken over:

- on this host (same host name, boot and pid namespace), the holder is gone when its pid no
  longer exists, or now belongs to a process started at another time (pid reused);
- a lock of another host (or boot, or container) cannot be checked by pid: a live holder rewrites its lock every
  `HEARTBEAT_S` seconds, so a start watches it for `WATCH_S` seconds and takes it over only
  if nothing changed (a run preempted on one machine and resumed on another goes on by itself).

Taking over renames the stale file aside (one start wins the rename), checks that what it
moved is the stale lock it judged (else puts it back), and then competes for a fresh O_EXCL
create like any start, so that racing starts let exactly one in.

The holder releases the lock when its run ends, also on an error; a process killed outright
leaves a stale lock that the next start takes over. This module imports no JAX, so that a
lock can be tested, and taken, cheaply.
"""

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from libml.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0  # A holder rewrites its lock this often.
WATCH_S = 35.0  # A lock of another host that does not change for this long is left by a run that is gone.
_PARTIAL_S = 2.0  # A lock file still empty (or not JSON) after this long was left by a crashed start.
_ATTEMPTS = 20


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip() or None
  except OSError:
    return None


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` (clock ticks since boot; Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _own_record(token: str) -> dict:
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "token": token}
  for key, value in (("boot_id", _boot_id()), ("pid_ns", _pid_namespace()),
                     ("pid_start", _process_start(os.getpid()))):
    if value is not None:
      record[key] = value
  return record


def _read(path: str) -> str | None:
  """The lock file's text, or None when there is none."""
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise UserError(f"{path} cannot be read ({e.strerror}); fix its permissions, or delete it if no run "
                    "is using its workdir.") from e


def _parse(text: str | None) -> dict | None:
  try:
    holder = json.loads(text or "")
  except ValueError:
    return None
  if not isinstance(holder, dict) or not holder.get("host"):
    return None
  pid = holder.get("pid")
  if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
    return None
  return holder


def _local_verdict(holder: dict) -> bool | None:
  """True: the holder runs here; False: it is gone; None: it runs elsewhere (pids cannot tell).

  Another boot id or pid namespace under the same host name is "elsewhere": a rebooted host,
  another machine or container with the same name.
  """
  if holder["host"] != socket.gethostname():
    return None
  for key, ours in (("boot_id", _boot_id()), ("pid_ns", _pid_namespace())):
    if holder.get(key) and ours and holder[key] != ours:
      return None
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, owned by someone else.
  except OSError:
    return None
  start = _process_start(holder["pid"])
  if holder.get("pid_start") and start and holder["pid_start"] != start:
    return False  # The pid now belongs to another process.
  return True


def _held_message(workdir: str, path: str, holder: dict, *, remote: bool) -> str:
  message = (f"workdir {workdir!r} is in use by another run: pid {holder['pid']} on host {holder['host']}, "
             f"since {holder.get('started', '?')} ({path}); wait for it to end or stop it, or choose another "
             "--workdir")
  if remote:
    message += f"; if that run is gone, delete {path}"
  return message + "."


def check_free(workdir: str, *, own: "RunLock | None" = None) -> None:
  """Raises UserError if a live run on this host holds `workdir`'s lock (not `own`). Reads only.

  A lock of another host, or one being written, is left to `acquire` to judge.
  """
  path = os.path.join(workdir, LOCK_FILE)
  holder = _parse(_read(path))
  if own is not None and holder is not None and holder.get("token") == own.record["token"]:
    return
  if holder is not None and _local_verdict(holder):
    raise UserError(_held_message(workdir, path, holder, remote=False))


def _watch(path: str, text: str, seconds: float) -> bool:
  """True if the lock file changes (or goes) within `seconds`."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    if _read(path) != text:
      return True
  return False


def _take_over(path: str, text: str) -> None:
  """Removes the stale lock whose content is `text`, unless another start got there first."""
  aside = f"{path}.stale-{uuid.uuid4().hex}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # Another start removed it.
  moved = _read(aside)
  if moved != text:  # A fresh lock took the stale one's place before the rename: put it back.
    try:
      os.link(aside, path)
    except FileExistsError:
      pass
    except OSError:  # No hard links here.
      if not os.path.exists(path):
        os.rename(aside, path)
  if os.path.exists(aside):
    os.remove(aside)


def _create(path: str, record: dict) -> bool:
  """Creates the lock file holding `record`; False if one exists."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  return True


def acquire(workdir: str) -> "RunLock":
  """Takes `workdir`'s lock (the directory must exist) or raises UserError naming its holder."""
  path = os.path.join(workdir, LOCK_FILE)
  token = uuid.uuid4().hex
  record = _own_record(token)
  for _ in range(_ATTEMPTS):
    if _create(path, record):
      if (_parse(_read(path)) or {}).get("token") == token:  # Verify: still ours.
        return RunLock(path, record)
      continue
    text = _read(path)
    if text is None:
      continue  # Released meanwhile.
    holder = _parse(text)
    if holder is not None and holder.get("token") == token:  # Ours, put back by a racing start.
      return RunLock(path, record)
    if holder is None:  # Being written, or left half-written by a start that crashed.
      if _watch(path, text, _PARTIAL_S):
        continue
    else:
      alive = _local_verdict(holder)
      if alive is None:
        logging.warning("%s is held by pid %s on host %s since %s; watching it for %.0f s for a sign of "
                        "life before taking it over.", path, holder["pid"], holder["host"],
                        holder.get("started", "?"), WATCH_S)
        alive = _watch(path, text, WATCH_S)
        if alive and holder.get("token") != (_parse(_read(path)) or {}).get("token"):
          continue  # Another start took it meanwhile: judge that one.
        if alive:
          raise UserError(_held_message(workdir, path, holder, remote=True))
      elif alive:
        raise UserError(_held_message(workdir, path, holder, remote=False))
      logging.warning("Taking over the lock of a run that is gone: %s (pid %s on host %s, since %s).", path,
                      holder["pid"], holder["host"], holder.get("started", "?"))
    _take_over(path, text)
  raise UserError(f"Could not take {path}: other starts kept taking it; start again, one run per workdir.")


def _heartbeat(path: str, record: dict, stop: threading.Event) -> None:
  """Rewrites the lock every HEARTBEAT_S seconds while it is still `record`'s."""
  beat = 0
  while not stop.wait(HEARTBEAT_S):
    try:
      if (_parse(_read(path)) or {}).get("token") != record["token"]:
        logging.error("%s no longer holds this run's lock (removed or taken over); another run may now "
                      "write to the same workdir.", path)
        return
      beat += 1
      tmp = f"{path}.{record['token']}.tmp"
      with open(tmp, "w") as f:
        json.dump({**record, "beat": beat, "beat_time": _now()}, f)
      os.replace(tmp, path)
    except (OSError, UserError) as e:
      logging.warning("Could not refresh %s: %s", path, e)


class RunLock:
  """A held workdir lock. `release` it when the run ends; garbage collection releases it too."""

  def __init__(self, path: str, record: dict):
    self._released = False
    self.path, self.record = path, record
    self._stop = threading.Event()
    # The thread holds no reference to this object, so that dropping the object releases the lock.
    self._thread = threading.Thread(target=_heartbeat, args=(path, record, self._stop), daemon=True,
                                    name="run-lock-heartbeat")
    self._thread.start()

  def release(self, *, moved_to: str | None = None) -> None:
    """Stops the heartbeat and removes the lock file if it is still this run's.

    Args:
      moved_to: where the lock file now is, when its directory was renamed meanwhile.
    """
    if self._released:
      return
    self._released = True
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join(timeout=HEARTBEAT_S + 5)
    path = moved_to or self.path
    if (_parse(_read(path)) or {}).get("token") == self.record["token"]:
      try:
        os.remove(path)
      except FileNotFoundError:
        pass

  def pause(self) -> None:
    """Stops the heartbeat (before the lock's directory is renamed); `release` still removes it."""
    self._stop.set()
    self._thread.join(timeout=HEARTBEAT_S + 5)

  def __del__(self):
    try:
      self.release()
    except Exception:  # pylint: disable=broad-except
      pass  # At interpreter exit the lock stays; the next start finds its holder gone.


class NotHeld:
  """What processes other than 0 hold in a multi-host run: process 0 holds the one lock."""

  def release(self, **_) -> None:
    pass
