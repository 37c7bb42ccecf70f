"""Shared training machinery: state, optimizers, steps, mesh, checkpoints, the loop.

Names load their module on first use: `import aigc_jax.train.state` imports neither
Orbax nor tqdm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aigc_jax._lazy import lazy_exports

_EXPORTS = {
    "Checkpointer": "aigc_jax.train.checkpoint",
    "Family": "aigc_jax.train.family",
    "load_family": "aigc_jax.train.family",
    "open_run": "aigc_jax.train.loop",
    "train_and_evaluate": "aigc_jax.train.loop",
    "TrainState": "aigc_jax.train.state",
    "make_supervised_step": "aigc_jax.train.steps",
    "guard_step": "aigc_jax.train.guard",
    "init_sharded_state": "aigc_jax.train.loop",
    "state_shardings": "aigc_jax.train.sharding",
    "rules_from_config": "aigc_jax.train.mesh",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see (re-exports)
  # ruff: noqa: F401
  from aigc_jax.train.checkpoint import Checkpointer
  from aigc_jax.train.family import Family, load_family
  from aigc_jax.train.guard import guard_step
  from aigc_jax.train.loop import init_sharded_state, open_run, train_and_evaluate
  from aigc_jax.train.mesh import rules_from_config
  from aigc_jax.train.sharding import state_shardings
  from aigc_jax.train.state import TrainState
  from aigc_jax.train.steps import make_supervised_step
