"""The train state: one pytree that steps transform, Orbax saves and shardings apply to."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  """step: int32 scalar; params: NNX parameters as a pure nested dict (`nnx.to_pure_dict`);
  opt_state: Optax state; rng: uint32 [2] base key (per-step keys are folded from it);
  extra: family-specific arrays (e.g. EMA parameters, a second optimizer's state);
  frozen: parameters the step reads but never trains (fine-tuning: the pretrained base
  weights), not in checkpoints — they are loaded again from their source."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  extra: Any = struct.field(default_factory=dict)
  frozen: Any = struct.field(default_factory=dict)

  @classmethod
  def create(cls, params, tx, rng: jax.Array, extra=None, frozen=None) -> TrainState:
    """A step-0 state: `params` (a pure dict), `tx.init(params)` as the optimizer state."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=rng, extra=extra or {}, frozen=frozen or {})


def count_params(tree) -> int:
  """The number of scalars in a pytree of arrays."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
