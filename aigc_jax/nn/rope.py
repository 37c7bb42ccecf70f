"""Rotary position embeddings (RoFormer), in the "rotate half" layout of Llama/HF."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
  """Rotates feature pairs (i, i + H/2) of each head by angle position * base^(-2i/H).

  Computed in float32 for accuracy, returned in the input dtype.
  """
  head_dim = x_BTNH.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
  half = head_dim // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTF = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
  sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
  cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTNH.dtype)
