"""Rotary position embeddings (RoFormer), in the "rotate half" layout of Llama/HF."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class RopeAngles(NamedTuple):
  """sin and cos of position * base^(-2i/H) for i < H/2, each [B or 1, T, H/2] float32."""

  sin_BTF: jax.Array
  cos_BTF: jax.Array


def _inv_freq(head_dim: int, base: float, xp=jnp):
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
  half = head_dim // 2
  return base ** (-xp.arange(half, dtype=xp.float32) / half)


def rope_angles(positions_BT: jax.Array, head_dim: int, base: float) -> RopeAngles:
  """The rotation angles' sines and cosines for arbitrary positions [B, T]."""
  angles_BTF = (positions_BT.astype(jnp.float32)[:, :, None]
                * _inv_freq(head_dim, base)[None, None, :])
  return RopeAngles(jnp.sin(angles_BTF), jnp.cos(angles_BTF))


def rope_angles_from_zero(seq_len: int, head_dim: int, base: float) -> RopeAngles:
  """The angles of positions 0..T-1 (every row of a training batch) as constants [1, T, H/2].

  Computed in NumPy at trace time: XLA:CPU fuses sin/cos into every consumer and, left
  to compute them itself, recomputes them for each of the N x H elements they scale, in
  every layer's forward and backward pass (~8 ms of the nanoGPT-shape step's ~45 ms).
  """
  angles_TF = np.arange(seq_len, dtype=np.float64)[:, None] * _inv_freq(head_dim, base, np)
  return RopeAngles(jnp.asarray(np.sin(angles_TF)[None], jnp.float32),
                    jnp.asarray(np.cos(angles_TF)[None], jnp.float32))


def rotate(x_BTNH: jax.Array, angles: RopeAngles) -> jax.Array:
  """Rotates feature pairs (i, i + H/2) of each head by the given angles.

  Computed in float32 for accuracy, returned in the input dtype. The halves are handled
  as an axis of size 2 (reversed and signed) rather than sliced and concatenated, which
  keeps the backward pass free of pads and copies.
  """
  B, T, N, head_dim = x_BTNH.shape
  half = head_dim // 2
  sin_BT11F = angles.sin_BTF[:, :, None, None, :]
  cos_BT11F = angles.cos_BTF[:, :, None, None, :]
  x_BTN2F = x_BTNH.astype(jnp.float32).reshape(B, T, N, 2, half)
  sign_21 = jnp.array([[-1.0], [1.0]], jnp.float32)
  rotated_BTN2F = x_BTN2F[:, :, :, ::-1, :] * sign_21[None, None, None]  # (-x2, x1)
  out = x_BTN2F * cos_BT11F + rotated_BTN2F * sin_BT11F
  return out.reshape(B, T, N, head_dim).astype(x_BTNH.dtype)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
  """Rotates feature pairs (i, i + H/2) of each head by angle position * base^(-2i/H)."""
  return rotate(x_BTNH, rope_angles(positions_BT, x_BTNH.shape[-1], base))
