"""Grouped-query self-attention with rotary embeddings and a functional KV cache.

The cache is a plain pytree (`KVCache`) passed in and returned, so prefill and decode
are pure functions that `jax.jit` compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.nn.rope import apply_rope


class KVCache(NamedTuple):
  """Keys and values of one layer for positions [0, S)."""

  k_BSKH: jax.Array
  v_BSKH: jax.Array


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
  shape = (batch, max_len, num_kv_heads, head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):
  """Multi-head attention with `num_kv_heads` shared key/value heads (GQA).

  `implementation` is passed to `jax.nn.dot_product_attention` on the uncached path
  (None = JAX's choice, 'xla', or 'cudnn' on GPU); the cached path uses an explicit mask
  and the XLA implementation, which every backend supports.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_base: float, implementation: str | None, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_base = rope_base
    self.implementation = implementation
    linear = lambda i, o: nnx.Linear(
        i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(embed_dim, num_heads * head_dim)
    self.k_proj = linear(embed_dim, num_kv_heads * head_dim)
    self.v_proj = linear(embed_dim, num_kv_heads * head_dim)
    self.o_proj = linear(num_heads * head_dim, embed_dim)

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, *,
               cache: KVCache | None = None, cache_index: jax.Array | None = None,
               mask_B1TS: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Without a cache: causal attention over the T inputs. With a cache: the inputs are
    written at [cache_index, cache_index + T) and attend to the cache under `mask_B1TS`."""
    B, T, _ = x_BTD.shape
    q_BTNH = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
    k_BTKH = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_base)
    k_BTKH = apply_rope(k_BTKH, positions_BT, self.rope_base)
    if cache is None:
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=self.implementation)
      new_cache = None
    else:
      start = (0, cache_index, 0, 0)
      k_BSKH = jax.lax.dynamic_update_slice(cache.k_BSKH, k_BTKH.astype(cache.k_BSKH.dtype), start)
      v_BSKH = jax.lax.dynamic_update_slice(cache.v_BSKH, v_BTKH.astype(cache.v_BSKH.dtype), start)
      new_cache = KVCache(k_BSKH, v_BSKH)
      out_BTNH = jax.nn.dot_product_attention(
          q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), mask=mask_B1TS,
          implementation="xla")
    return self.o_proj(out_BTNH.reshape(B, T, self.num_heads * self.head_dim)), new_cache
