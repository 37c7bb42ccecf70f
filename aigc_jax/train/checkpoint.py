"""Orbax checkpoints of a run: the train state, the data iterator's position and the
config, saved asynchronously; the last `keep` are kept; resume restores the newest."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from aigc_jax.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    """Starts an asynchronous save (device-to-host copies happen before it returns, so
    `state` may be donated to the next step right away)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, target_state, step: int | None = None):
    """(state, data_state, step) with `target_state`'s structure, shapes and shardings
    (concrete arrays or `jax.ShapeDtypeStruct`s)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}: train first (aigc-jax train ...)")
    abstract = jax.tree.map(_abstract, target_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored.state, restored.data, step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
