"""Ctrl-C and SIGTERM from a command's first moments, before a training run installs its
stop handlers (`train.preemption.stop_requests`).

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens
to be: inside a garbage-collection callback of JAX's it is printed and ignored (the run
carries on), inside Orbax's or XLA's threads' callbacks the process can end in a crash.
Instead, `take_over` installs a handler that never raises: commands that change nothing
(eval, sample, export) end at once with status 128 + the signal; a training command
notes the signal, and its run honours it at its first chance (before opening the run,
after restoring, after compiling) by stopping with status 75. Only the standard library
is imported here, so the CLI can call it before anything heavy loads.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []  # signals noted for a training run, oldest first


def take_over(*, exit_now: bool) -> None:
  """Installs the handler for SIGINT and SIGTERM, then lets signals held by `hold` (for
  instance across the CLI's restart of itself) arrive."""

  def handler(signum, _frame):
    if exit_now:
      os.write(2, b"interrupted: nothing of the run was changed\n")
      os._exit(128 + signum)
    if not _pending:
      _pending.append(signum)

  for s in SIGNALS:
    signal.signal(s, handler)
  release()


def hold() -> None:
  """Blocks SIGINT and SIGTERM: they wait, pending, until `release` (a blocked mask
  survives `exec`, so a restarting process loses none)."""
  signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def release() -> None:
  """Unblocks SIGINT and SIGTERM (a pending one is delivered now)."""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def take_pending() -> int | None:
  """The signal noted since `take_over` (then forgotten), or None."""
  return _pending.pop() if _pending else None
