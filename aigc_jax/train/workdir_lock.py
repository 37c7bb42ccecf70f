"""One training run per workdir: an exclusive `flock` on WORKDIR/.lock for the run's life.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so the
lock file a dead run leaves behind never blocks the next run. The file holds the holder's pid,
host and start time, only to name it to a run that finds the workdir taken. `eval`, `sample`
and `export` only read a workdir and take no lock. With several JAX processes only process 0
takes it (the others share the workdir by design). On a filesystem without `flock` support the
run goes on unlocked after one warning line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from aigc_jax.errors import UserError

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class WorkdirLock:
  """An exclusive, non-blocking lock on `workdir` (created if missing).

  `acquire()` takes it or raises one UserError naming the holder and the fix; `release()`
  (or leaving a `with` block) gives it back. Two objects on one workdir exclude each other
  even within one process (`flock` belongs to an open file, not to a process).
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self.locked = False  # False while released, and when the filesystem has no flock

  def acquire(self) -> WorkdirLock:
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this object")
    try:
      os.makedirs(self.workdir, exist_ok=True)
      # No O_TRUNC: the holder's details stay readable until this process holds the lock.
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise UserError(f"workdir {self.workdir!r} is not writable ({e.strerror}): choose "
                      "another --workdir") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd)
        os.close(fd)
        raise UserError(f"workdir {self.workdir!r} is in use by another training run "
                        f"({holder}): wait for it, stop it, or use another --workdir") from None
      os.close(fd)
      if e.errno not in _UNSUPPORTED:
        raise
      print(f"warning: the filesystem of {self.workdir!r} does not support file locks "
            f"({e.strerror}); training without a workdir lock: do not start a second run "
            "on this workdir", file=sys.stderr)
      return self
    self._fd, self.locked = fd, True
    _write_holder(fd)
    return self

  def release(self) -> None:
    fd, self._fd, self.locked = self._fd, None, False
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)  # no holder any more (best effort; the lock is what counts)
    except OSError:
      pass
    finally:
      os.close(fd)  # closing the last descriptor releases the flock

  close = release

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def training_lock(workdir: str):
  """The lock a training run on `workdir` holds (a context manager): a `WorkdirLock` on
  JAX process 0; nothing on the other processes of a multi-process run."""
  import jax
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  return WorkdirLock(workdir)


def _write_holder(fd: int) -> None:
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "argv": sys.argv}
  data = (json.dumps(info) + "\n").encode()
  # Written in place, then cut to length: a reader sees whole details (never an empty
  # file once a holder has written); unbuffered, so visible to other processes at once.
  os.pwrite(fd, data, 0)
  os.ftruncate(fd, len(data))


def _read_holder(fd: int, attempts: int = 10) -> str:
  """'pid P on HOST, since TIME' from the lock file; a holder that has only just taken
  the lock may not have written yet, so a few short retries."""
  for attempt in range(attempts):
    try:
      info = json.loads(os.pread(fd, 65536, 0).decode())
      return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
      if attempt + 1 < attempts:
        time.sleep(0.05)
  return "holder unknown: its details could not be read"
