"""Autoregressive generation for the transformer LM: a compiled prefill, then a compiled
decode loop over a KV cache, with temperature, top-k and top-p (nucleus) sampling and a
repetition penalty.

`generate_arrays` is the array function (jit-able, composable into a user's JAX code);
`generate` is the host helper over it that takes and returns lists of 1-D id arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.nn.concrete import concrete_values
from aigc_jax.ranges import range_problem

# The sampling settings `generate` takes (and the `sample.*` config keys of the LM families).
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
_F32 = np.finfo(np.float32)


# The range of each sampling setting (lo, hi, keyword arguments of `config.range_problem`);
# max_new_tokens is checked when given (0 in a config: no samples).
SAMPLING_RANGES = {
    "temperature": (0, None, {}),  # 0: greedy
    "top_k": (0, 2**31 - 1, dict(integer=True)),  # 0: all ids (an int32 in the step)
    # (0, 1], from float32's smallest normal number up: XLA flushes subnormals to zero.
    "top_p": (1.2e-38, 1, {}),
    "repetition_penalty": (0, None, dict(lo_open=True)),  # 1.0: no penalty
    "max_new_tokens": (0, 2**31 - 1, dict(integer=True)),
}


def check_sampling(where: str = "", **settings) -> None:
  """One `UserError` for sampling settings out of range, NaN and infinities included
  (`where`: e.g. "config 'sample'"), naming each bad setting, its value and its range.
  `settings`: every key of SAMPLING_KEYS, and optionally max_new_tokens."""
  bad = []
  for key in (*SAMPLING_KEYS, "max_new_tokens"):
    if key in settings or key != "max_new_tokens":
      lo, hi, kw = SAMPLING_RANGES[key]
      problem = range_problem(settings[key], lo, hi, **kw)
      if problem:
        bad.append(f"{key} {problem}")
  if bad:
    raise UserError(f"{where + ': ' if where else ''}need temperature >= 0, top_k >= 0, "
                    f"0 < top_p <= 1, repetition_penalty > 0 (finite numbers, top_k an "
                    f"integer); {'; '.join(bad)}")


def penalize_repeats(logits_BV: jax.Array, seen_BV: jax.Array, penalty: float) -> jax.Array:
  """CTRL's repetition penalty (Keskar et al. 2019), as in Hugging Face's `generate`: the
  logit of every id already in the prompt or the output is divided by `penalty` when
  positive and multiplied by it when negative (penalty > 1 discourages repeats)."""
  logits_BV = logits_BV.astype(jnp.float32)
  # Any finite penalty > 0, kept inside float32's normal range (never 0 or inf: 0 * inf).
  penalty = min(max(float(penalty), _F32.tiny), _F32.max)
  penalized_BV = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
  return jnp.where(seen_BV, penalized_BV, logits_BV)


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Token ids [B]: greedy when temperature == 0, else sampled from the tempered
  distribution restricted to the top_k most likely ids (0: all) and to the smallest set
  whose probability reaches top_p (1.0: all)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  # Shifted so that the largest logit is 0 (clipped to finite first: a tiny penalty can
  # overflow), then tempered by any finite temperature > 0 kept inside float32's normal
  # range: the largest stays 0 and the others <= 0 (at worst -inf), never NaN.
  logits_BV = jnp.clip(logits_BV.astype(jnp.float32), -_F32.max, _F32.max)
  logits_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  logits_BV = logits_BV / min(max(float(temperature), _F32.tiny), _F32.max)
  top_k = top_k if top_k < logits_BV.shape[-1] else 0  # k >= the vocabulary: all ids
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    top_p = float(top_p)
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep an id if the mass strictly before it is below top_p (so the top id always stays).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = before_BV < top_p
    threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


# The arguments of `generate_arrays` that are Python values (static under `jax.jit`).
GENERATE_STATIC_ARGNAMES = ("max_new_tokens", "temperature", "top_k", "top_p",
                            "repetition_penalty", "max_len")


def generate_arrays(model: nnx.Module, tokens_BP: jax.Array, lengths_B: jax.Array,
                    key: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    eos_id: int | jax.Array = -1,
                    max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues a batch of left-padded prompts: arrays in, arrays out, callable under
  `jax.jit` (`static_argnames=GENERATE_STATIC_ARGNAMES`) or inside a user's compiled code.

  tokens_BP: int ids, row b's prompt in its last lengths_B[b] slots (the left padding
  before it is masked out; any id). lengths_B: int [B], 1 <= length <= P. A compiled
  prefill, then a `lax.while_loop` decode over a KV cache that stops when every row has
  produced `eos_id` (-1: never). Dropout is off whatever the model's mode.

  Returns (new_BN int32 [B, max_new_tokens]: each row's new ids, `eos_id` from its first
  end-of-sequence on; lengths_B int32 [B]: the new ids before it, max_new_tokens if none).

  Shapes, dtypes and settings are checked always, lengths and ids when their values are
  concrete (UserError). Under `jax.jit` they cannot raise: a row with a length outside
  [1, P] or a prompt id outside the vocabulary returns no new tokens (all `eos_id`,
  length 0).
  """
  cfg = model.cfg
  if jnp.ndim(tokens_BP) != 2 or not jnp.issubdtype(jnp.result_type(tokens_BP), jnp.integer):
    raise UserError(f"tokens must be integer ids of shape [batch, prompt_len], got "
                    f"{jnp.result_type(tokens_BP)} {jnp.shape(tokens_BP)}")
  B, P = tokens_BP.shape
  if jnp.shape(lengths_B) != (B,) or not jnp.issubdtype(jnp.result_type(lengths_B),
                                                         jnp.integer):
    raise UserError(f"lengths must be integers of shape [batch] = ({B},), got "
                    f"{jnp.result_type(lengths_B)} {jnp.shape(lengths_B)}")
  check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  limit = max_len or cfg.max_seq_len
  if P + max_new_tokens > limit:
    raise UserError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"model's context of {limit} tokens: shorten the prompt or generate fewer")
  lengths = concrete_values(lengths_B)
  if lengths is not None and lengths.size and (lengths.min() < 1 or lengths.max() > P):
    raise UserError(f"prompt lengths must be in [1, {P}] (the prompt width), got "
                    f"{lengths.tolist()}: every prompt needs at least one token")
  model = nnx.view(model, deterministic=True, raise_if_not_found=False)
  V = cfg.vocab_size
  tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
  start_B = P - jnp.asarray(lengths_B, jnp.int32)
  eos_id = jnp.asarray(eos_id, jnp.int32)
  cache = model.init_cache(B, P + max_new_tokens)
  positions_BP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - start_B[:, None], 0)
  logits_BPV, cache = model(tokens_BP, positions_BP, cache=cache, cache_index=jnp.int32(0),
                            start_B=start_B)
  # The ids each row has seen (its prompt, not the left padding), kept only for a penalty.
  seen_BV = None
  real_BP = jnp.arange(P)[None, :] >= start_B[:, None]  # the prompt, not its left padding
  if repetition_penalty != 1.0:
    seen_BV = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], tokens_BP].add(
        real_BP.astype(jnp.int32)) > 0

  def next_token(logits_BV, seen_BV, key):
    if seen_BV is None:
      return sample_logits(logits_BV, key, temperature, top_k, top_p), None
    logits_BV = penalize_repeats(logits_BV, seen_BV, repetition_penalty)
    next_B = sample_logits(logits_BV, key, temperature, top_k, top_p)
    return next_B, seen_BV.at[jnp.arange(B), next_B].set(True)

  # Traced inputs cannot raise: a row with a length outside [1, P] or a prompt id outside
  # the vocabulary gets no new tokens (all eos_id, length 0) rather than arbitrary ones.
  valid_B = ((start_B >= 0) & (start_B < P)
             & jnp.all(~real_BP | ((tokens_BP >= 0) & (tokens_BP < V)), axis=1))
  key, sub = jax.random.split(key)
  first_B, seen_BV = next_token(logits_BPV[:, -1], seen_BV, sub)
  first_B = jnp.where(valid_B, first_B, eos_id)
  out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)
  done_B = (first_B == eos_id) | ~valid_B

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, out_BN, cache, done_B, seen_BV, key = carry
    slot = P + i - 1  # the slot of the token generated last
    prev_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    logits_B1V, cache = model(prev_B1, (slot - start_B)[:, None], cache=cache,
                              cache_index=slot, start_B=start_B)
    key, sub = jax.random.split(key)
    next_B, seen_BV = next_token(logits_B1V[:, 0], seen_BV, sub)
    next_B = jnp.where(done_B, eos_id, next_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, next_B[:, None], i, axis=1)
    return i + 1, out_BN, cache, done_B | (next_B == eos_id), seen_BV, key

  carry = (jnp.int32(1), out_BN, cache, done_B, seen_BV, key)
  out_BN = jax.lax.while_loop(cond, body, carry)[1]
  is_eos_BN = out_BN == eos_id
  lengths_B = jnp.where(is_eos_BN.any(axis=1), jnp.argmax(is_eos_BN, axis=1),
                        max_new_tokens)
  lengths_B = jnp.where(valid_B, lengths_B, 0).astype(jnp.int32)
  return out_BN, lengths_B


_generate_jit = jax.jit(generate_arrays, static_argnames=GENERATE_STATIC_ARGNAMES)


def left_pad(prompts: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Prompts (1-D arrays of ids) as (tokens [B, P] int32 left-padded with `pad_id`,
  lengths [B] int32), P the longest prompt: the input of `generate_arrays`."""
  P = max(len(p) for p in prompts)
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  lengths_B = np.zeros(len(prompts), np.int32)
  for b, p in enumerate(prompts):
    tokens_BP[b, P - len(p):] = p
    lengths_B[b] = len(p)
  return tokens_BP, lengths_B


def generate(model: nnx.Module, prompts: list[np.ndarray], *, max_new_tokens: int, key,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, eos_id: int = -1,
             max_len: int | None = None) -> list[np.ndarray]:
  """Continues each prompt (a 1-D array of ids) by up to `max_new_tokens` ids, stopping a
  row at `eos_id` (not included in its output). Prompts of different lengths are
  left-padded and batched. Returns the new ids of each prompt. A host-side helper over
  `generate_arrays` (compiled once per model structure, shapes and settings)."""
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
  # Checked before the conversions below (int(nan) would raise a bare ValueError).
  check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens)
  tokens_BP, lengths_B = left_pad(prompts)
  out_BN, out_lengths_B = jax.device_get(_generate_jit(
      model, tokens_BP, lengths_B, key, max_new_tokens=max_new_tokens,
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
      repetition_penalty=float(repetition_penalty), eos_id=int(eos_id), max_len=max_len))
  return [row[:n] for row, n in zip(out_BN, out_lengths_B, strict=True)]
