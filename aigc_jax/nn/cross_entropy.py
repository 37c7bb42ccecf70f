"""The output layer and its cross-entropy fused, a block of sequence positions at a time.

loss = sum_{b,t} weight[b, t] * -log softmax(h[b, t] @ w)[target[b, t]]

Written plainly, a step holds the logits [B, T, V] in float32 several times over (the
logits, their softmax and its gradient): 403 MB each for 8 x 256 tokens of a
49,152-token vocabulary, more than the rest of a LoRA step of SmolLM2-135M. Here the
positions are visited `chunk_len` at a time inside a `lax.scan`, and the gradients are
formed in the same pass (softmax minus one-hot is known as soon as the logits are), so
only [B, chunk_len, V] logits ever exist and no logits are kept for the backward pass.
The FLOPs equal the plain version's (forward, dh and dw matmuls); the cost is that the
gradients are computed even when only the loss is differentiated (always the case in a
train step). Without differentiation (evaluation) only the loss is computed.

Chunks run along the sequence axis, so a batch sharded over devices stays sharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunked(x_BT, chunk_len: int):
  """[B, T, ...] -> [K, B, chunk_len, ...] (T zero-padded to K * chunk_len)."""
  B, T = x_BT.shape[:2]
  K = -(-T // chunk_len)
  pad = [(0, 0), (0, K * chunk_len - T)] + [(0, 0)] * (x_BT.ndim - 2)
  x = jnp.pad(x_BT, pad).reshape(B, K, chunk_len, *x_BT.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunked(x_KBC, T: int):
  """The inverse of `_chunked`: [K, B, C, ...] -> [B, T, ...]."""
  K, B, C = x_KBC.shape[:3]
  return jnp.moveaxis(x_KBC, 0, 1).reshape(B, K * C, *x_KBC.shape[3:])[:, :T]


def _chunk_nll(h_BCD, w_DV, targets_BC):
  """(-log p(target) [B, C], logits [B, C, V], log-sum-exp [B, C]), all float32."""
  logits_BCV = jax.lax.dot_general(h_BCD, w_DV, (((2,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_logit_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return lse_BC - target_logit_BC, logits_BCV, lse_BC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_cross_entropy(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                         weights_BT: jax.Array, chunk_len: int) -> jax.Array:
  """sum(weights * nll) float32 for hidden states h [B, T, D] and output weights w [D, V]
  (same dtype), integer targets [B, T] and float weights [B, T]; [B, chunk_len, V]
  logits at a time."""
  def body(total, xs):
    h_BCD, targets_BC, weights_BC = xs
    nll_BC = _chunk_nll(h_BCD, w_DV, targets_BC)[0]
    return total + (nll_BC * weights_BC).sum(), None

  xs = (_chunked(h_BTD, chunk_len), _chunked(targets_BT, chunk_len),
        _chunked(weights_BT.astype(jnp.float32), chunk_len))
  return jax.lax.scan(body, jnp.float32(0), xs)[0]


def _fwd(h_BTD, w_DV, targets_BT, weights_BT, chunk_len):
  # With symbolic zeros, each differentiable input arrives with `perturbed`: whether its
  # gradient is wanted. A frozen output layer (LoRA) then costs no dw matmul.
  want_dw = w_DV.perturbed
  h_BTD, w_DV, targets_BT, weights_BT = (x.value for x in (h_BTD, w_DV, targets_BT,
                                                          weights_BT))

  def body(carry, xs):
    total, dw_DV = carry
    h_BCD, targets_BC, weights_BC = xs
    nll_BC, logits_BCV, lse_BC = _chunk_nll(h_BCD, w_DV, targets_BC)
    # d(sum weights * nll) / d logits = weights * (softmax - one_hot(target))
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    onehot_BCV = jax.nn.one_hot(targets_BC, w_DV.shape[1], dtype=jnp.float32)
    dlogits_BCV = ((probs_BCV - onehot_BCV) * weights_BC[..., None]).astype(h_BCD.dtype)
    dh_BCD = jax.lax.dot_general(dlogits_BCV, w_DV, (((2,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    if want_dw:
      dw_DV = dw_DV + jax.lax.dot_general(h_BCD, dlogits_BCV, (((0, 1), (0, 1)), ((), ())),
                                          preferred_element_type=jnp.float32)
    return (total + (nll_BC * weights_BC).sum(), dw_DV), (nll_BC, dh_BCD)

  T = h_BTD.shape[1]
  xs = (_chunked(h_BTD, chunk_len), _chunked(targets_BT, chunk_len),
        _chunked(weights_BT.astype(jnp.float32), chunk_len))
  init = (jnp.float32(0), jnp.zeros(w_DV.shape if want_dw else (), jnp.float32))
  (total, dw_DV), (nll_KBC, dh_KBCD) = jax.lax.scan(body, init, xs)
  # Residuals in the dtypes of the inputs they are cotangents of.
  return total, (_unchunked(dh_KBCD, T).astype(h_BTD.dtype),
                 dw_DV.astype(w_DV.dtype) if want_dw else None,
                 _unchunked(nll_KBC, T).astype(weights_BT.dtype))


def _bwd(chunk_len, residuals, g):
  del chunk_len
  dh_BTD, dw_DV, nll_BT = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the loss was not used
    return None, None, None, None
  return ((g * dh_BTD).astype(dh_BTD.dtype),
          None if dw_DV is None else (g * dw_DV).astype(dw_DV.dtype), None,
          (g * nll_BT).astype(nll_BT.dtype))


linear_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)
