"""The non-finite / loss-spike guard every family's train step runs inside.

`guard_step(train_step, ...)` wraps a family's pure step: when any floating metric of the
step (losses, gradient norms) is NaN or infinite — or, with `spike_sigma` > 0, the loss
lies more than `spike_sigma` standard deviations above its running mean — the update is
not applied (parameters, optimizer and family state keep their previous values; the step
counter still advances) and the step's `skipped` metric is 1. The running loss statistics
and the count of skipped steps live in the train state (`extra["guard"]`), so they are
checkpointed and resume exactly.

What happens next is the loop's `train.nan_policy`: `abort` stops the run with an error
naming the step and the last checkpoint (which is intact: the bad update was never
applied), `skip` carries on and reports `skipped_total` in the metrics. Spikes are always
skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aigc_jax.config import require
from aigc_jax.errors import UserError

NAN_POLICIES = ("abort", "skip")
# Keys every family's `train` config section carries.
DEFAULTS = dict(nan_policy="abort", spike_sigma=0.0, spike_window=100)
_KEY = "guard"


class NonFiniteLoss(UserError):
  """A step's loss or gradients were NaN/Inf under train.nan_policy='abort'."""

  def __init__(self, step: int, checkpoint_step: int | None, checkpoint_dir: str):
    last = (f"the last checkpoint (step {checkpoint_step} in {checkpoint_dir}) is intact"
            if checkpoint_step is not None else "no checkpoint was written yet")
    super().__init__(
        f"step {step}: the loss or gradients are not finite (NaN/Inf); the update was not "
        f"applied and {last}. Lower optim.lr, clip gradients, or set "
        "train.nan_policy='skip' to skip such steps")
    self.step = step


def check(metrics, step: int, policy: str, checkpointer) -> None:
  """Raises NonFiniteLoss for a non-finite step under the 'abort' policy (reads one
  scalar of `metrics` from the device)."""
  if policy != "abort":
    return
  skipped, spike = jax.device_get((metrics["skipped"], metrics["skipped_spike"]))
  if skipped and not spike:
    raise NonFiniteLoss(step, checkpointer.latest_step(), checkpointer.directory)


def validate(c) -> None:
  """Checks the guard's keys of the `train` config section."""
  t = c.train
  require(t.nan_policy in NAN_POLICIES, "train.nan_policy",
          f"must be one of {NAN_POLICIES}, got {t.nan_policy!r}")
  require(t.spike_sigma >= 0, "train.spike_sigma", "must be >= 0 (0: off)")
  require(t.spike_window >= 2, "train.spike_window", "must be at least 2 steps")


def init(state):
  """The state with zeroed guard statistics in `extra["guard"]`."""
  zero = jnp.zeros((), jnp.float32)
  stats = {"skipped_total": jnp.zeros((), jnp.int32), "loss_mean": zero, "loss_sq_mean": zero,
           "loss_count": jnp.zeros((), jnp.int32)}
  return state.replace(extra={**state.extra, _KEY: stats})


def guard_step(train_step, spike_sigma: float = 0.0, spike_window: int = 100,
               spike_metric: str = "loss"):
  """(state, batch) -> (state, metrics) that skips non-finite (and spiking) updates; the
  state must come from `init`."""

  def guarded(state, batch):
    stats = state.extra[_KEY]
    inner = state.replace(extra={k: v for k, v in state.extra.items() if k != _KEY})
    new, metrics = train_step(inner, batch)
    # Python numbers (a constant schedule's learning rate) become arrays like the rest.
    metrics = jax.tree.map(jnp.asarray, metrics)
    floats = [v for v in jax.tree.leaves(metrics) if jnp.issubdtype(v.dtype, jnp.floating)]
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in floats]))
    spike = jnp.zeros((), bool)
    loss = metrics.get(spike_metric)
    if spike_sigma > 0 and loss is not None:
      std = jnp.sqrt(jnp.maximum(stats["loss_sq_mean"] - stats["loss_mean"] ** 2, 0.0))
      warmed_up = stats["loss_count"] >= spike_window
      spike = warmed_up & (loss > stats["loss_mean"] + spike_sigma * std)
      ok = ok & ~spike
    keep = lambda n, o: jnp.where(ok, n, o)
    # Frozen parameters pass through untouched (no select over the whole base model).
    applied = jax.tree.map(keep, new.replace(step=state.step, frozen={}),
                           inner.replace(frozen={})).replace(step=new.step, frozen=new.frozen)
    stats = dict(stats, skipped_total=stats["skipped_total"] + (~ok).astype(jnp.int32))
    if loss is not None:
      # An exponential window over the accepted losses (the first ones averaged evenly).
      count = stats["loss_count"] + ok.astype(jnp.int32)
      rate = jnp.where(ok, 1.0 / jnp.minimum(count, spike_window).clip(1), 0.0)
      safe = jnp.where(ok, loss, 0.0).astype(jnp.float32)
      stats.update(loss_count=count,
                   loss_mean=stats["loss_mean"] + rate * (safe - stats["loss_mean"]),
                   loss_sq_mean=stats["loss_sq_mean"] + rate * (safe ** 2
                                                               - stats["loss_sq_mean"]))
    applied = applied.replace(extra={**applied.extra, _KEY: stats})
    return applied, {**metrics, "skipped": (~ok).astype(jnp.int32),
                     "skipped_spike": spike.astype(jnp.int32),
                     "skipped_total": stats["skipped_total"]}

  return guarded
