"""Autoregressive generation for the transformer LM: a compiled prefill, then a compiled
decode loop over a KV cache, with temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.errors import UserError


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Token ids [B]: greedy when temperature == 0, else sampled from the tempered
  distribution restricted to the top_k most likely ids (0: all) and to the smallest set
  whose probability reaches top_p (1.0: all)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep an id if the mass strictly before it is below top_p (so the top id always stays).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = before_BV < top_p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id"))
def _generate(graphdef, params, tokens_BP, start_B, key, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, eos_id: int):
  model = nnx.merge(graphdef, params)
  B, P = tokens_BP.shape
  cache = model.init_cache(B, P + max_new_tokens)
  positions_BP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - start_B[:, None], 0)
  logits_BPV, cache = model(tokens_BP, positions_BP, cache=cache, cache_index=jnp.int32(0),
                            start_B=start_B)
  key, sub = jax.random.split(key)
  first_B = sample_logits(logits_BPV[:, -1], sub, temperature, top_k, top_p)
  out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
  done_B = first_B == eos_id

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, out_BN, cache, done_B, key = carry
    slot = P + i - 1  # the slot of the token generated last
    prev_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    logits_B1V, cache = model(prev_B1, (slot - start_B)[:, None], cache=cache,
                              cache_index=slot, start_B=start_B)
    key, sub = jax.random.split(key)
    next_B = sample_logits(logits_B1V[:, 0], sub, temperature, top_k, top_p)
    next_B = jnp.where(done_B, eos_id, next_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
    return i + 1, out_BN, cache, done_B | (next_B == eos_id), key

  _, out_BN, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out_BN, cache, done_B, key))
  return out_BN


def generate(model: nnx.Module, prompts: list[np.ndarray], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int = -1, max_len: int | None = None) -> list[np.ndarray]:
  """Continues each prompt (a 1-D array of ids) by up to `max_new_tokens` ids, stopping a
  row at `eos_id` (not included in its output). Prompts of different lengths are
  left-padded and batched. Returns the new ids of each prompt."""
  cfg = model.cfg
  if not prompts:
    raise UserError("generate needs at least one prompt")
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token (an empty prompt can start "
                    "from the end-of-sequence id)")
  for p in prompts:
    bad = p[(p < 0) | (p >= cfg.vocab_size)]
    if bad.size:
      raise UserError(f"prompt token id {int(bad[0])} is outside the vocabulary "
                      f"[0, {cfg.vocab_size})")
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise UserError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                    f"{temperature}, {top_p}, {top_k}")
  P = max(len(p) for p in prompts)
  limit = max_len or cfg.max_seq_len
  if P + max_new_tokens > limit:
    raise UserError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"model's context of {limit} tokens: shorten the prompt or generate fewer")
  tokens_BP = np.zeros((len(prompts), P), np.int32)
  start_B = np.zeros(len(prompts), np.int32)
  for b, p in enumerate(prompts):
    tokens_BP[b, P - len(p):] = p
    start_B[b] = P - len(p)
  graphdef, params = nnx.split(model)
  out_BN = np.asarray(_generate(graphdef, params, tokens_BP, start_B, key,
                                max_new_tokens=max_new_tokens, temperature=float(temperature),
                                top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id)))
  results = []
  for row in out_BN:
    stop = np.flatnonzero(row == eos_id) if eos_id >= 0 else []
    results.append(row[:stop[0]] if len(stop) else row)
  return results
