"""Grouped-query self-attention with rotary embeddings and a functional KV cache.

The cache is a plain pytree (`KVCache`) passed in and returned, so prefill and decode
are pure functions that `jax.jit` compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.nn.linear import Linear
from aigc_jax.nn.rope import RopeAngles, rope_angles, rotate


class KVCache(NamedTuple):
  """Keys and values of one layer for positions [0, S)."""

  k_BSKH: jax.Array
  v_BSKH: jax.Array


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
  shape = (batch, max_len, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def einsum_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     mask_B1TS: jax.Array | None = None) -> jax.Array:
  """Softmax attention as two batched matmuls, heads grouped by their shared KV head.

  mask_B1TS: True where query t may attend to key s; None means causal (S == T).
  Faster than `jax.nn.dot_product_attention`'s XLA path on CPU, where it avoids a
  broadcast of K/V to all query heads; the softmax runs in float32.
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  q_BKQH = jnp.swapaxes(q_BTNH, 1, 2).reshape(B, K, G * T, H) * jnp.asarray(H ** -0.5,
                                                                            q_BTNH.dtype)
  k_BKSH = jnp.swapaxes(k_BSKH, 1, 2)
  v_BKSH = jnp.swapaxes(v_BSKH, 1, 2)
  logits_BKGTS = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH).reshape(B, K, G, T, S)
  if mask_B1TS is None:
    allowed = jnp.tril(jnp.ones((T, S), bool))[None, None, None]
  else:
    allowed = mask_B1TS[:, :, None]
  logits_BKGTS = jnp.where(allowed, logits_BKGTS.astype(jnp.float32), -1e30)
  probs_BKQS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype).reshape(B, K, G * T, S)
  out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BKSH)
  return jnp.swapaxes(out_BKQH.reshape(B, N, T, H), 1, 2)


def attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, implementation: str) -> jax.Array:
  """Dispatches to an attention implementation: 'einsum' (ours), or 'xla' / 'cudnn' /
  'jax' (JAX's choice) through `jax.nn.dot_product_attention`."""
  if implementation == "einsum":
    return einsum_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS)
  impl = None if implementation == "jax" else implementation
  if mask_B1TS is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                        implementation=impl)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                      implementation="xla" if impl == "cudnn" else impl)


class Attention(nnx.Module):
  """Multi-head attention with `num_kv_heads` shared key/value heads (GQA).

  `implementation` names the attention kernel (see `attend`); the cached path uses an
  explicit mask, and 'cudnn' falls back to XLA there.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_base: float, implementation: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_base = rope_base
    self.implementation = implementation
    linear = lambda i, o: Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(embed_dim, num_heads * head_dim)
    self.k_proj = linear(embed_dim, num_kv_heads * head_dim)
    self.v_proj = linear(embed_dim, num_kv_heads * head_dim)
    self.o_proj = linear(num_heads * head_dim, embed_dim)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array | RopeAngles, *,
               cache: KVCache | None = None, cache_index: jax.Array | None = None,
               mask_B1TS: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, KVCache | None]:
    """Without a cache: causal attention over the T inputs. With a cache: the inputs are
    written at [cache_index, cache_index + T) and attend to the cache under `mask_B1TS`.
    `positions_BT`: int positions, or their `rope_angles` (computed once for all layers)."""
    B, T, _ = x_BTD.shape
    kw = dict(deterministic=deterministic, rngs=rngs)  # for LoRA adapters' dropout
    q_BTNH = self.q_proj(x_BTD, **kw).reshape(B, T, self.num_heads, self.head_dim)
    k_BTKH = self.k_proj(x_BTD, **kw).reshape(B, T, self.num_kv_heads, self.head_dim)
    v_BTKH = self.v_proj(x_BTD, **kw).reshape(B, T, self.num_kv_heads, self.head_dim)
    angles = (positions_BT if isinstance(positions_BT, RopeAngles)
              else rope_angles(positions_BT, self.head_dim, self.rope_base))
    q_BTNH = rotate(q_BTNH, angles)
    k_BTKH = rotate(k_BTKH, angles)
    if cache is None:
      out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, None, self.implementation)
      new_cache = None
    else:
      start = (0, cache_index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache.k_BSKH, k_BTKH.astype(cache.k_BSKH.dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(cache.v_BSKH, v_BTKH.astype(cache.v_BSKH.dtype), start)
      new_cache = KVCache(k_BSKH, v_BSKH)
      out_BTNH = attend(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype),
                        mask_B1TS, self.implementation)
    out_BTD = self.o_proj(out_BTNH.reshape(B, T, self.num_heads * self.head_dim), **kw)
    return out_BTD, new_cache
