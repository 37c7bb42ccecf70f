"""Stopping on request between steps: SIGTERM/SIGINT on one process, JAX's preemption sync
point across several.

With several processes, each must stop after the same step (the others would wait
forever in the step's collectives): JAX's coordination service catches SIGTERM on any
process (installed by `jax.distributed.initialize`) and `reached_preemption_sync_point`
answers True on every process at the same step. SIGINT (Ctrl-C) is turned into a SIGTERM
of the process so it takes the same path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax

from aigc_jax.train import interrupts


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after checkpointing `step` (or, `saved=False`,
  during start-up, before training step `step`); re-run to resume."""

  def __init__(self, step: int | None, signum: int, *, saved: bool = True):
    name = signal.Signals(signum).name
    when = "" if step is None else f", before step {step}"
    super().__init__(
        f"stopped by {name} at step {step}; a checkpoint of that step was written: re-run "
        "the same command to resume" if saved else
        f"stopped by {name} during start-up{when}; nothing new to save: re-run the same "
        "command to resume")
    self.step, self.signum, self.saved = step, signum, saved


class StopRequests:
  """`requested(step)`: whether to checkpoint and stop after `step` (called once per
  step, in order, on every process); `signum`: the signal that asked."""

  def __init__(self, multi_process: bool):
    self.multi_process = multi_process
    self.signum: int | None = None
    self.training = False  # set by `begin_training` once the run's first step is near

  def _on_signal(self, signum, _frame) -> None:
    if self.multi_process:
      self.signum = signum
      os.kill(os.getpid(), signal.SIGTERM)  # to the coordination service's notifier
    elif self.signum is None:
      self.signum = signum
    elif not self.training:  # a second request while the run starts: stop at once
      interrupts.exit_at_once(signum, "interrupted again while starting: stopped at once, "
                              "before any training step; re-run the same command to resume")

  def begin_training(self) -> None:
    """From here a request is honoured after the current step (with a checkpoint)."""
    self.training = True

  def during_start_up(self, step: int | None) -> None:
    """Raises Preempted(saved=False) if this process was asked to stop before training
    `step` (None: before the run is opened). One process only: several agree only at a
    step's sync point, after it."""
    if not self.multi_process and self.signum is not None:
      raise Preempted(step, self.signum, saved=False)

  def requested(self, step: int) -> bool:
    """Whether to checkpoint and stop after `step` (every process answers alike)."""
    if not self.multi_process:
      return self.signum is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return False


@contextlib.contextmanager
def stop_requests():
  """Installs the handlers for the duration of a run (main thread only; elsewhere
  signals keep their handlers)."""
  stop = StopRequests(multi_process=jax.process_count() > 1)
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  # With several processes SIGTERM stays with JAX's notifier; SIGINT is forwarded to it.
  signals = (signal.SIGINT,) if stop.multi_process else (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, stop._on_signal) for s in signals}
  early = interrupts.take_pending()  # a Ctrl-C while the command started (CLI)
  if early is not None:
    stop._on_signal(early, None)
  try:
    yield stop
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
