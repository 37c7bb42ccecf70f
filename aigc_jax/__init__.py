"""aigc_jax: generative models in JAX on one compiled, sharded training core.

Importing the package (or any of its modules) changes nothing in the host process: no
environment variables, allocator settings, logging handlers or signal hooks. The names
below load their module on first use, so `import aigc_jax` imports neither JAX nor Orbax.
Process-wide tuning is opt-in: `aigc_jax.xla_flags.apply_fast_cpu_flags()` (before JAX
starts a backend) and `aigc_jax.train.memory.keep_step_memory()`; the `aigc-jax` CLI and
the benchmarks apply both.

Subpackages: `aigc_jax.nn` (shared layers), `aigc_jax.models` (NNX models and their
losses), `aigc_jax.train` (state, steps, mesh, checkpoints, the loop),
`aigc_jax.families` (models bound to the loop), `aigc_jax.data`, `aigc_jax.evaluation`,
`aigc_jax.pretrained`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aigc_jax._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # Errors
    "UserError": "aigc_jax.errors",
    # Transformer LM
    "Transformer": "aigc_jax.models.transformer",
    "TransformerConfig": "aigc_jax.models.transformer",
    "generate": "aigc_jax.models.sampling",
    "sample_logits": "aigc_jax.models.sampling",
    # Training core
    "TrainState": "aigc_jax.train.state",
    "make_supervised_step": "aigc_jax.train.steps",
    "guard_step": "aigc_jax.train.guard",
    "Checkpointer": "aigc_jax.train.checkpoint",
    "make_mesh": "aigc_jax.train.mesh",
    "Family": "aigc_jax.train.family",
    "load_family": "aigc_jax.train.family",
    "open_run": "aigc_jax.train.loop",
    "train_and_evaluate": "aigc_jax.train.loop",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see (re-exports)
  # ruff: noqa: F401
  from aigc_jax.errors import UserError
  from aigc_jax.models.sampling import generate, sample_logits
  from aigc_jax.models.transformer import Transformer, TransformerConfig
  from aigc_jax.train.checkpoint import Checkpointer
  from aigc_jax.train.family import Family, load_family
  from aigc_jax.train.guard import guard_step
  from aigc_jax.train.loop import open_run, train_and_evaluate
  from aigc_jax.train.mesh import make_mesh
  from aigc_jax.train.state import TrainState
  from aigc_jax.train.steps import make_supervised_step
