"""An exponential moving average of parameters, kept in the train state's `extra` (the
GAN's generator, the diffusion model), with a warm-up of its decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """The EMA's decay at `step`: min(decay, (1 + step) / (10 + step)), so the average
  forgets the random initial weights within the first few hundred steps instead of
  keeping e^-1 of them after 1/(1 - decay) steps."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, decay: float, step: jax.Array):
  """ema <- d * ema + (1 - d) * params with d = ema_decay(decay, step), leaf by leaf."""
  d = ema_decay(decay, step)
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
