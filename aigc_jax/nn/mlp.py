"""Gated MLP (SwiGLU, Shazeer 2020) as used by Llama-family models."""

from __future__ import annotations

import jax
from flax import nnx

from aigc_jax.nn.linear import Linear
from aigc_jax.nn.partitioning import constrain


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); no biases."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    linear = lambda i, o, axes: Linear(i, o, dtype=dtype, param_dtype=param_dtype,
                                       axes=axes, rngs=rngs)
    # Megatron's split: gate and up column-parallel, down row-parallel.
    self.gate = linear(embed_dim, mlp_dim, ("embed", "mlp"))
    self.up = linear(embed_dim, mlp_dim, ("embed", "mlp"))
    self.down = linear(mlp_dim, embed_dim, ("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = constrain(nnx.silu(self.gate(x_BTD)) * self.up(x_BTD),
                      ("act_batch", "act_length", "act_mlp"))
    return self.down(h_BTF)
