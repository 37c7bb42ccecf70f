"""Gated MLP (SwiGLU, Shazeer 2020) as used by Llama-family models."""

from __future__ import annotations

import jax
from flax import nnx

from aigc_jax.nn.dense import dense_dot_general


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); no biases."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(
        i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        dot_general=dense_dot_general, rngs=rngs)
    self.gate = linear(embed_dim, mlp_dim)
    self.up = linear(embed_dim, mlp_dim)
    self.down = linear(mlp_dim, embed_dim)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(nnx.silu(self.gate(x_BTD)) * self.up(x_BTD))
