"""Gated MLP (SwiGLU, Shazeer 2020) as used by Llama-family models."""

from __future__ import annotations

import jax
from flax import nnx

from aigc_jax.nn.linear import Linear


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); no biases."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = lambda i, o: Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = linear(embed_dim, mlp_dim)
    self.up = linear(embed_dim, mlp_dim)
    self.down = linear(mlp_dim, embed_dim)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(nnx.silu(self.gate(x_BTD)) * self.up(x_BTD))
