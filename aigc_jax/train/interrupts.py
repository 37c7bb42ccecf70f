"""Ctrl-C and SIGTERM from a command's first moments, before a training run installs its
stop handlers (`train.preemption.stop_requests`).

Python's default turns SIGINT into a KeyboardInterrupt wherever the main thread happens
to be: inside a garbage-collection callback of JAX's it is printed and ignored (the run
carries on), inside Orbax's or XLA's callbacks the process can end in a crash. Instead,
`take_over` installs a handler that never raises: commands that only read a run (eval,
sample) end at once with status 128 + the signal (130 for Ctrl-C); a training command
notes the signal, and its run honours it at its first chance (before opening the run,
after restoring, after compiling) by stopping with status 75; a second signal while it
starts ends it at once. Only the standard library is imported here, so the CLI can call
it before anything heavy loads.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []  # signals noted for a training run, oldest first


def exit_at_once(signum: int, message: str) -> None:
  """Ends the process now with status 128 + `signum`, after `message` on stderr (what was
  printed to stdout is flushed first)."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001 - interrupted mid-write: the rest is lost either way
    pass
  os.write(2, message.encode() + b"\n")
  os._exit(128 + signum)


def take_over(*, exit_now: bool) -> dict:
  """Installs the handler for SIGINT and SIGTERM (main thread only); returns the previous
  handlers, for `restore`."""

  def handler(signum, _frame):
    if exit_now:
      exit_at_once(signum, "interrupted: nothing of the run was changed")
    if _pending:  # a second request while the run starts: do not make the user wait
      exit_at_once(signum, "interrupted again while starting: stopped at once, before any "
                   "training step; re-run the same command to resume")
    _pending.append(signum)

  return {s: signal.signal(s, handler) for s in SIGNALS}


def take_over_for_exit() -> None:
  """For a process that is ending: a signal now ends it at once with 128 + the signal,
  never a KeyboardInterrupt (which Python ends by killing itself with SIGINT, after a
  traceback). Python's own teardown resets the handlers at its very end; a signal in
  that last moment kills the process with SIGINT, which a shell reports as 130 too."""
  for s in SIGNALS:
    signal.signal(s, lambda signum, _frame: exit_at_once(
        signum, "interrupted while exiting: the run's files were already written"))


def restore(previous: dict) -> None:
  """Puts back the handlers `take_over` replaced, and forgets a noted signal."""
  for s, handler in previous.items():
    signal.signal(s, handler)
  _pending.clear()


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
