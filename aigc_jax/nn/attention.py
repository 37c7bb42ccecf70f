"""Grouped-query self-attention with rotary embeddings and a functional KV cache.

The cache is a plain pytree (`KVCache`) passed in and returned, so prefill and decode
are pure functions that `jax.jit` compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.nn.linear import Linear
from aigc_jax.nn.partitioning import constrain
from aigc_jax.nn.rope import RopeAngles, rope_angles, rotate


class KVCache(NamedTuple):
  """Keys and values of one layer for positions [0, S)."""

  k_BSKH: jax.Array
  v_BSKH: jax.Array


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
  """An empty KVCache: k and v zeros of shape [batch, max_len, num_kv_heads, head_dim]."""
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


# Causal attention in this many query blocks: block i skips the key blocks after it, a
# (n - 1) / 2n share of the full T x T work (37.5% for 4), and each block's softmax
# passes over a smaller array. More blocks save little more and add ops.
CAUSAL_QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 16


def query_block_bounds(seq_len: int) -> list[int]:
  """Start of each query block, then seq_len: near-equal blocks of >= MIN_QUERY_BLOCK."""
  blocks = max(1, min(CAUSAL_QUERY_BLOCKS, seq_len // MIN_QUERY_BLOCK))
  return [round(i * seq_len / blocks) for i in range(blocks + 1)]


def blockwise_causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array,
                               v_BTKH: jax.Array) -> jax.Array:
  """Causal softmax attention computed per query block, each against only the keys it can
  see (its own block and those before it), so the masked upper triangle is mostly never
  computed. Equal to `einsum_attention(q, k, v)`; the softmax runs in float32.

  Heads are grouped by their shared KV head; each block's queries are laid out
  [B, K, Tq * G, H] so one batched matmul serves all heads of a group.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = N // K
  scale = jnp.asarray(H ** -0.5, q_BTNH.dtype)
  q_BKTGH = jnp.transpose((q_BTNH * scale).reshape(B, T, K, G, H), (0, 2, 1, 3, 4))
  k_BKSH = jnp.swapaxes(k_BTKH, 1, 2)
  v_BKSH = jnp.swapaxes(v_BTKH, 1, 2)
  bounds = query_block_bounds(T)
  outs = []
  for start, end in zip(bounds[:-1], bounds[1:], strict=True):
    rows = (end - start) * G
    q_BKRH = q_BKTGH[:, :, start:end].reshape(B, K, rows, H)
    logits_BKRS = jnp.einsum("bkrh,bksh->bkrs", q_BKRH, k_BKSH[:, :, :end])
    # Row r is query start + r // G; trace-time constant, only the diagonal part masks.
    allowed_RS = np.repeat(np.arange(start, end), G)[:, None] >= np.arange(end)[None, :]
    logits_BKRS = jnp.where(allowed_RS, logits_BKRS.astype(jnp.float32), -1e30)
    probs_BKRS = jax.nn.softmax(logits_BKRS, axis=-1).astype(v_BTKH.dtype)
    out_BKRH = jnp.einsum("bkrs,bksh->bkrh", probs_BKRS, v_BKSH[:, :, :end])
    outs.append(out_BKRH.reshape(B, K, end - start, G, H))
  out_BKTGH = jnp.concatenate(outs, axis=2)
  return jnp.transpose(out_BKTGH, (0, 2, 1, 3, 4)).reshape(B, T, N, H)


def attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, implementation: str) -> jax.Array:
  """Dispatches to an attention implementation: 'einsum' (ours, full T x S), 'blockwise'
  (ours, causal blocks; with a mask it is 'einsum'), or 'xla' / 'cudnn' / 'jax' (JAX's
  choice) through `jax.nn.dot_product_attention`."""
  if implementation == "blockwise" and mask_B1TS is None:
    return blockwise_causal_attention(q_BTNH, k_BSKH, v_BSKH)
  if implementation in ("einsum", "blockwise"):
    return einsum_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS)
  impl = None if implementation == "jax" else implementation
  if mask_B1TS is None:
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                        implementation=impl)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                      implementation="xla" if impl == "cudnn" else impl)


def bidirectional_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                            key_mask_BS: jax.Array | None = None,
                            implementation: str = "einsum") -> jax.Array:
  """Non-causal softmax attention (encoders, image self-attention): query t sees every key
  s where `key_mask_BS` is True (None: all keys). 'einsum' is `einsum_attention` (ours,
  softmax in float32); 'xla' / 'cudnn' / 'jax' go through `jax.nn.dot_product_attention`
  ('cudnn' needs 16-bit inputs and, with a key mask, falls back to 'xla')."""
  mask_B1TS = None if key_mask_BS is None else key_mask_BS[:, None, None, :]
  if implementation == "einsum":
    allowed = jnp.ones((1, 1, 1, 1), bool) if mask_B1TS is None else mask_B1TS
    return einsum_attention(q_BTNH, k_BSKH, v_BSKH, allowed)
  if implementation not in ("xla", "cudnn", "jax"):
    raise ValueError(f"bidirectional attention implementation must be einsum, xla, cudnn or "
                     f"jax, got {implementation!r}")
  impl = None if implementation == "jax" else implementation
  if mask_B1TS is not None and impl == "cudnn":
    impl = "xla"
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=False,
                                      implementation=impl)


_HEADS = ("act_batch", "act_length", "act_heads", None)
_KV_HEADS = ("act_batch", "act_length", "act_kv_heads", None)


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
    linear = lambda i, o, axes: Linear(i, o, dtype=dtype, param_dtype=param_dtype,
                                       axes=axes, rngs=rngs)
    # Megatron's split: Q, K, V column-parallel (by head), O row-parallel.
    self.q_proj = linear(embed_dim, num_heads * head_dim, ("embed", "heads"))
    self.k_proj = linear(embed_dim, num_kv_heads * head_dim, ("embed", "kv_heads"))
    self.v_proj = linear(embed_dim, num_kv_heads * head_dim, ("embed", "kv_heads"))
    self.o_proj = linear(num_heads * head_dim, embed_dim, ("heads", "embed"))

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array | RopeAngles, *,
               cache: KVCache | None = None, cache_index: jax.Array | None = None,
               mask_B1TS: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Without a cache: causal attention over the T inputs. With a cache: the inputs are
    written at [cache_index, cache_index + T) and attend to the cache under `mask_B1TS`.
    `positions_BT`: int positions, or their `rope_angles` (computed once for all layers)."""
    B, T, _ = x_BTD.shape
    q_BTNH = self.q_proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim)
    k_BTKH = self.k_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, self.num_kv_heads, self.head_dim)
    angles = (positions_BT if isinstance(positions_BT, RopeAngles)
              else rope_angles(positions_BT, self.head_dim, self.rope_base))
    q_BTNH = constrain(rotate(q_BTNH, angles), _HEADS)
    k_BTKH = constrain(rotate(k_BTKH, angles), _KV_HEADS)
    v_BTKH = constrain(v_BTKH, _KV_HEADS)
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
    out_BTD = self.o_proj(out_BTNH.reshape(B, T, self.num_heads * self.head_dim))
    return out_BTD, new_cache
