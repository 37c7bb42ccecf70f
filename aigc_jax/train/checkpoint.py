"""Orbax checkpoints of a run: the train state, the data iterator's position and the
config, saved asynchronously; the last `keep` are kept; resume restores the newest.

Every save also records a CRC-32 of each state array, of the iterator state and of the
config; restore verifies them, because Orbax restores a data file with flipped bytes
without any error. A checkpoint that fails to restore or to verify is reported on stderr
(its step and the reason) and the next older one is tried; one whose checksums do not
match is moved aside to `STEP.damaged` (kept for inspection, out of the way of the step
that will be saved again).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from aigc_jax.errors import UserError


def checksums(state, data_state: dict, config: dict | None = None) -> dict[str, int]:
  """{path: CRC-32} of every array of `state` (fetched to the host), and of the JSON of
  `data_state` and `config`."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
  sums = {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(leaf).tobytes())
          for path, leaf in leaves}
  sums["<data>"] = zlib.crc32(json.dumps(data_state, sort_keys=True).encode())
  if config is not None:
    sums["<config>"] = zlib.crc32(json.dumps(config, sort_keys=True).encode())
  return sums


FROZEN = "<frozen>"


class ChecksumMismatch(ValueError):
  """The arrays restored from a checkpoint are not the ones that were saved."""


class CheckpointWriteError(UserError):
  """A save failed (disk full, quota, permissions); the previous checkpoints are intact."""


class Checkpointer:
  """Orbax checkpoints of one run in `directory`: the train state, the data iterator's
  position and the config per step, saved asynchronously, the newest `keep` kept, verified
  by CRC-32 on restore."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._saving_step = None
    self._frozen_crc = None
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "data", "config", "checksums"))

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    """Starts an asynchronous save (device-to-host copies happen before it returns, so
    `state` may be donated to the next step right away)."""
    sums = {**checksums(_without_frozen(state), data_state, config),
            **self._frozen_checksum(state)}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_without_frozen(state)),
        data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
        checksums=ocp.args.JsonSave(sums))
    with self._write_errors():  # a failed earlier save surfaces here too
      self._manager.save(step, args=args, force=True)
    self._saving_step = step

  def restore(self, target_state, step: int | None = None):
    """(state, data_state, step) with `target_state`'s structure, shapes and shardings
    (concrete arrays or `jax.ShapeDtypeStruct`s): the given step, or the newest checkpoint
    that restores and verifies (older ones are tried in turn)."""
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise UserError(f"no checkpoint in {self.directory}: train first (aigc-jax train ...)")
    abstract = jax.tree.map(_abstract, _without_frozen(target_state))
    failures = []
    for candidate in steps:
      try:
        state, data_state, frozen_crc = self._restore_verified(candidate, abstract)
      except Exception as e:  # noqa: BLE001 - any failure means "not this checkpoint"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        failures.append(f"step {candidate}: {reason}")
        if isinstance(e, ChecksumMismatch) and jax.process_index() == 0:
          os.replace(os.path.join(self.directory, str(candidate)),
                     os.path.join(self.directory, f"{candidate}.damaged"))
          self._manager.reload()
          reason += f"; moved to {candidate}.damaged"
        print(f"warning: checkpoint at step {candidate} in {self.directory} is unusable "
              f"({reason}); trying an older one", file=sys.stderr)
        continue
      if hasattr(target_state, "frozen"):
        if frozen_crc is not None and self._frozen_checksum(target_state).get(FROZEN) != frozen_crc:
          raise UserError(f"the checkpoint of step {candidate} in {self.directory} was trained "
                          "on other frozen (pretrained) weights than the ones loaded now: "
                          "point the config at the original weights, or use a new workdir")
        state = state.replace(frozen=target_state.frozen)
      return state, data_state, candidate
    raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
                    + ". Delete the damaged step folders to start over, or restore them")

  def _restore_verified(self, step: int, abstract):
    if not os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
      print(f"warning: checkpoint at step {step} in {self.directory} has no checksums "
            "(written by an older aigc_jax): restoring it unverified", file=sys.stderr)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      return restored.state, restored.data, None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        checksums=ocp.args.JsonRestore()))
    expected = {k: v for k, v in restored.checksums.items() if k not in ("<config>", FROZEN)}
    actual = checksums(restored.state, restored.data)
    bad = sorted(k for k in expected.keys() | actual.keys()
                 if expected.get(k) != actual.get(k))
    if bad:
      raise ChecksumMismatch(f"checksum mismatch in {', '.join(bad[:3])}"
                       + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    return restored.state, restored.data, restored.checksums.get(FROZEN)

  def _frozen_checksum(self, state) -> dict[str, int]:
    """{'<frozen>': one CRC-32 over the frozen parameters} (computed once: they never
    change), so a resume can tell that the pretrained weights it loaded are the same."""
    if not getattr(state, "frozen", None):
      return {}
    if self._frozen_crc is None:
      crc = 0
      for leaf in jax.tree.leaves(state.frozen):  # one array on the host at a time
        crc = zlib.crc32(np.ascontiguousarray(jax.device_get(leaf)), crc)
      self._frozen_crc = crc
    return {FROZEN: self._frozen_crc}

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns a failed write into one CheckpointWriteError naming the step, the reason and
    the newest committed checkpoint."""
    try:
      yield
    except Exception as e:
      reason = (str(e).splitlines() or [type(e).__name__])[0].split(": ")[-1]
      kept = self._manager.latest_step()
      kept = (f"the checkpoint of step {kept} is intact" if kept is not None
              else "no earlier checkpoint exists")
      raise CheckpointWriteError(
          f"writing the checkpoint of step {self._saving_step} in {self.directory} failed "
          f"({reason}); {kept}. Free disk space (or fix the directory's permissions) and "
          "re-run the same command to resume") from e

  def wait(self) -> None:
    """Blocks until the last asynchronous save has committed (raises if it failed)."""
    with self._write_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save, then releases Orbax's threads."""
    try:
      with self._write_errors():
        self._manager.wait_until_finished()
    finally:
      self._manager.close()


def _without_frozen(state):
  """Frozen parameters are not saved: they come from their pretrained source."""
  return state.replace(frozen={}) if hasattr(state, "frozen") else state


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
