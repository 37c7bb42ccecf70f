"""Orbax checkpoints of a run: the train state, the data iterator's position and the
config, saved asynchronously; the last `keep` are kept; resume restores the newest.

Every save also records a fingerprint of each state array (computed on the devices that
hold it: see `fingerprint`), and a CRC-32 of the iterator state and of the config; restore
verifies them, because Orbax restores a data file with flipped bytes without any error. A
fingerprint does not depend on the mesh or the sharding, so a checkpoint saved under one
topology verifies under another. A checkpoint that fails to restore or to verify is
reported on stderr (its step and the reason) and the next older one is tried; one whose
checksums do not match, or that cannot be restored at all, is moved aside by a training
run to `STEP.damaged` (kept for inspection, out of the
way of the step that will be saved again). An item that the step's own list of items
(Orbax's `_CHECKPOINT_METADATA`) names but that is missing is damage too; only a step
that never had checksums (written by an older aigc_jax) restores unverified. A step that
disappears while a reader restores it was rotated away by a training run, not damaged:
the reader lists the steps again. Checkpoints written before fingerprints (no
`<algorithm>` entry: CRC-32 of each array's host bytes) still verify, one array fetched to
the host at a time. A read-only Checkpointer (eval, sample) writes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from aigc_jax.errors import UserError
from aigc_jax.train.fingerprints import fingerprint, fingerprints  # noqa: F401

ALGORITHM = "<algorithm>"  # the checksums item's entry naming how arrays were summed
FINGERPRINT_V1 = "fingerprint-v1"
FROZEN = "<frozen>"
# Entries restore does not compare to the restored state: the config is not restored, the
# frozen weights are checked against the ones loaded now.
_UNCHECKED = ("<config>", FROZEN, ALGORITHM)

def _json_crc(value) -> int:
  return zlib.crc32(json.dumps(value, sort_keys=True).encode())


def checksums(state, data_state: dict, config: dict | None = None) -> dict[str, int | str]:
  """{path: fingerprint} of every array of `state` (computed on device), the CRC-32 of
  the JSON of `data_state` (and `config`), and the algorithm tag."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  sums: dict = dict(zip(paths, fingerprints(state), strict=True))
  sums["<data>"] = _json_crc(data_state)
  if config is not None:
    sums["<config>"] = _json_crc(config)
  sums[ALGORITHM] = FINGERPRINT_V1
  return sums


def _legacy_checksums(state, data_state: dict) -> dict[str, int]:
  """What checkpoints without an algorithm tag recorded: CRC-32 of each array's host bytes
  (fetched one array at a time)."""
  sums = {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(
              jax.device_get(leaf)).tobytes())
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  sums["<data>"] = _json_crc(data_state)
  return sums


class ChecksumMismatch(ValueError):
  """The arrays restored from a checkpoint are not the ones that were saved."""


class UnknownChecksumAlgorithm(UserError):
  """A checkpoint's checksums were made by an algorithm this version does not know."""


class CheckpointWriteError(UserError):
  """A save failed (disk full, quota, permissions); the previous checkpoints are intact."""


class _ReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager is read-only: readers (eval, sample) ask for it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


@functools.cache
def _quiet_read_only_notice() -> None:
  logging.getLogger("absl").addFilter(_ReadOnlyNotice())  # once per process


class Checkpointer:
  """Orbax checkpoints of one run in `directory`: the train state, the data iterator's
  position and the config per step, saved asynchronously, the newest `keep` kept, verified
  by fingerprints on restore (onto the shardings of the state it is restored into)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    # read_only (eval, sample): an unusable checkpoint is reported but never moved.
    self.directory, self.read_only = os.path.abspath(directory), read_only
    # A reader writes nothing (it may run on a workdir it cannot write).
    if read_only:
      _quiet_read_only_notice()
    options = (ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                            save_interval_steps=0)
               if read_only else ocp.CheckpointManagerOptions(
                   max_to_keep=keep, enable_async_checkpointing=async_save, create=True))
    self._saving_step = None
    self._frozen_sum = None  # the frozen weights' fingerprint (they never change)
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
    if self._saving_step is None:
      self._saving_step = step  # named if this very save fails
    with self._write_errors():  # a failed earlier save surfaces here too
      self._manager.save(step, args=args, force=True)
    self._saving_step = step

  def restore(self, target_state, step: int | None = None):
    """(state, data_state, step) with `target_state`'s structure, shapes and shardings
    (concrete arrays or `jax.ShapeDtypeStruct`s): the given step, or the newest checkpoint
    that restores and verifies (older ones are tried in turn)."""
    if step is None and not self.all_steps():
      raise UserError(f"no checkpoint in {self.directory}: train first (aigc-jax train ...)")
    abstract = jax.tree.map(_abstract, _without_frozen(target_state))
    failures, tried = [], set()
    while True:
      candidates = [s for s in (sorted(self.all_steps(), reverse=True) if step is None
                                else [step]) if s not in tried]
      if not candidates:
        break
      candidate = candidates[0]
      tried.add(candidate)
      try:
        state, data_state, frozen_sum, algorithm = self._restore_verified(candidate, abstract)
      except UnknownChecksumAlgorithm:
        raise  # a newer aigc_jax's checkpoint: falling back would train over it
      except Exception as e:  # noqa: BLE001 - any failure means "not this checkpoint"
        if step is None and self._rotated_away(candidate):
          # Removed while we read it: a training run rotating its checkpoints, not damage.
          # Newer steps may have been saved meanwhile: list them again.
          self._reload()
          continue
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        failures.append(f"step {candidate}: {reason}")
        if not self.read_only and jax.process_index() == 0:
          # Out of the way of the step that will be saved again (a training run holds the
          # workdir alone, so a checkpoint it cannot restore is damaged, not in use).
          reason += f"; moved to {self._move_aside(candidate)}"
        print(f"warning: checkpoint at step {candidate} in {self.directory} is unusable "
              f"({reason}); trying an older one", file=sys.stderr)
        continue
      if hasattr(target_state, "frozen"):
        current = None if frozen_sum is None else (
            self._frozen_checksum(target_state) if algorithm == FINGERPRINT_V1
            else _legacy_frozen_checksum(target_state)).get(FROZEN)
        if current != frozen_sum:
          raise UserError(f"the checkpoint of step {candidate} in {self.directory} was trained "
                          "on other frozen (pretrained) weights than the ones loaded now: "
                          "point the config at the original weights, or use a new workdir")
        state = state.replace(frozen=target_state.frozen)
      return state, data_state, candidate
    if not failures:
      raise UserError(f"no checkpoint in {self.directory}: its checkpoints were removed while "
                      "they were being read; re-run the command")
    kept = ("the folders of the damaged steps were left in place (a read-only command)"
            if self.read_only else "the damaged step folders are kept as STEP.damaged")
    raise UserError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
                    + f". {kept}: restore them, or start over in a new --workdir")

  def _rotated_away(self, step: int, wait: float = 2.0) -> bool:
    """Whether `step`'s folder is gone, or (a reader: a training run may be deleting it
    file by file) goes within `wait` seconds."""
    folder = os.path.join(self.directory, str(step))
    deadline = time.monotonic() + (wait if self.read_only else 0.0)
    while os.path.isdir(folder):
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.1)
    return True

  def _reload(self, attempts: int = 20) -> None:
    """Lists the steps again (a step deleted while Orbax lists them: try again)."""
    for attempt in range(attempts):
      try:
        self._manager.reload()
        return
      except FileNotFoundError:
        if attempt == attempts - 1:
          raise
        time.sleep(0.1)

  def saved_config(self) -> tuple[dict, int] | None:
    """(config, step): the config saved with the newest checkpoint whose copy is intact
    (its CRC-32 matches the one recorded beside it), or None."""
    for step in sorted(self.all_steps(), reverse=True):
      folder = os.path.join(self.directory, str(step))
      try:
        if os.path.isdir(os.path.join(folder, "checksums")):
          restored = self._manager.restore(step, args=ocp.args.Composite(
              config=ocp.args.JsonRestore(), checksums=ocp.args.JsonRestore()))
          recorded = restored.checksums.get("<config>")
          if recorded is not None and recorded != _json_crc(restored.config):
            continue
        elif "checksums" in self._listed_items(step):
          continue  # its checksums item is missing: damaged
        else:  # written before checksums
          restored = self._manager.restore(step, args=ocp.args.Composite(
              config=ocp.args.JsonRestore()))
      except Exception:  # noqa: BLE001 - an unreadable copy: try an older one
        continue
      if isinstance(restored.config, dict):
        return restored.config, step
    return None

  def _listed_items(self, step: int) -> list[str]:
    """The items Orbax recorded for `step` in its `_CHECKPOINT_METADATA` (the manifest of
    the step folder; ChecksumMismatch when it is missing or unreadable)."""
    path = os.path.join(self.directory, str(step), "_CHECKPOINT_METADATA")
    try:
      with open(path) as f:
        handlers = json.load(f).get("item_handlers")
    except (OSError, ValueError, AttributeError) as e:
      raise ChecksumMismatch(f"its list of items ({os.path.basename(path)}) is missing or "
                             "unreadable") from e
    if not isinstance(handlers, dict):  # an Orbax that recorded no items: the folders are
      return sorted(name for name in ("state", "data", "config", "checksums")  # the list
                    if os.path.isdir(os.path.join(self.directory, str(step), name)))
    return list(handlers)

  def _move_aside(self, step: int) -> str:
    """Renames the folder of `step` to STEP.damaged (STEP.damaged.N if taken); returns
    the new name."""
    name, n = f"{step}.damaged", 1
    while os.path.exists(os.path.join(self.directory, name)):
      name, n = f"{step}.damaged.{n}", n + 1
    os.replace(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
    self._manager.reload()
    return name

  def _restore_verified(self, step: int, abstract):
    listed = self._listed_items(step)
    missing = [item for item in listed
               if not os.path.isdir(os.path.join(self.directory, str(step), item))]
    if missing:  # removed after the save committed: damage, whatever the item
      raise ChecksumMismatch(f"item{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                             "listed in its metadata missing")
    if "checksums" not in listed:
      print(f"warning: checkpoint at step {step} in {self.directory} has no checksums "
            "(written by an older aigc_jax): restoring it unverified", file=sys.stderr)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      return restored.state, restored.data, None, None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        checksums=ocp.args.JsonRestore()))
    recorded = restored.checksums
    algorithm = recorded.get(ALGORITHM)
    if algorithm == FINGERPRINT_V1:  # on the restored (sharded) arrays, where they are
      actual = checksums(restored.state, restored.data)
    elif algorithm is None:  # written before fingerprints
      actual = _legacy_checksums(restored.state, restored.data)
    else:
      raise UnknownChecksumAlgorithm(
          f"the checkpoint of step {step} in {self.directory} records checksums made by "
          f"{algorithm!r}, which this version of aigc_jax does not know (it knows "
          f"{FINGERPRINT_V1!r}): upgrade aigc_jax to the version that wrote it")
    expected = {k: v for k, v in recorded.items() if k not in _UNCHECKED}
    actual = {k: v for k, v in actual.items() if k not in _UNCHECKED}
    bad = sorted(k for k in expected.keys() | actual.keys()
                 if expected.get(k) != actual.get(k))
    if bad:
      raise ChecksumMismatch(f"checksum mismatch in {', '.join(bad[:3])}"
                       + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    return restored.state, restored.data, recorded.get(FROZEN), algorithm

  def _frozen_checksum(self, state) -> dict[str, int]:
    """{'<frozen>': one 64-bit digest of the frozen parameters' fingerprints} (computed
    once: they never change), so a resume can tell that the pretrained weights it loaded
    are the same, whatever the mesh."""
    if not getattr(state, "frozen", None):
      return {}
    if self._frozen_sum is None:
      digest = hashlib.blake2b(json.dumps(fingerprints(state.frozen)).encode(), digest_size=8)
      self._frozen_sum = int.from_bytes(digest.digest(), "big")
    return {FROZEN: self._frozen_sum}

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


def _legacy_frozen_checksum(state) -> dict[str, int]:
  """The frozen weights' checksum as checkpoints without an algorithm tag recorded it: one
  CRC-32 over every array's host bytes (fetched one at a time)."""
  if not getattr(state, "frozen", None):
    return {}
  crc = 0
  for leaf in jax.tree.leaves(state.frozen):
    crc = zlib.crc32(np.ascontiguousarray(jax.device_get(leaf)).tobytes(), crc)
  return {FROZEN: crc}


def _abstract(x) -> jax.ShapeDtypeStruct:
  """The restore target of one leaf, always with a sharding: the target's own, so a
  checkpoint lands on the current run's mesh whatever mesh saved it (without one, Orbax
  would reuse the saved sharding, which fails on another topology); host values and
  sharding-less structs go to this process's first device."""
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  x = x if hasattr(x, "dtype") and hasattr(x, "shape") else np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
