"""Rotary position embeddings (RoFormer), in the "rotate half" layout of Llama/HF."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
  """Rotates feature pairs (i, i + H/2) of each head by angle position * base^(-2i/H).

  Computed in float32 for accuracy, returned in the input dtype. The halves are handled
  as an axis of size 2 (reversed and signed) rather than sliced and concatenated, which
  keeps the backward pass free of pads and copies.
  """
  B, T, N, head_dim = x_BTNH.shape
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
  half = head_dim // 2
  inv_freq_F = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTF = positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_F[None, None, :]
  sin_BT11F = jnp.sin(angles_BTF)[:, :, None, None, :]
  cos_BT11F = jnp.cos(angles_BTF)[:, :, None, None, :]
  x_BTN2F = x_BTNH.astype(jnp.float32).reshape(B, T, N, 2, half)
  sign_21 = jnp.array([[-1.0], [1.0]], jnp.float32)
  rotated_BTN2F = x_BTN2F[:, :, :, ::-1, :] * sign_21[None, None, None]  # (-x2, x1)
  out = x_BTN2F * cos_BT11F + rotated_BTN2F * sin_BT11F
  return out.reshape(B, T, N, head_dim).astype(x_BTNH.dtype)
