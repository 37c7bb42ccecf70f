"""A 2x upsampling transposed convolution (kernel 4, stride 2, 'SAME': the DCGAN layer)
whose weight gradient XLA:CPU computes fast.

XLA:CPU has no fast kernel for the weight gradient of a transposed convolution (an input-
dilated convolution): at 7x7x128 -> 14x14x64, batch 64, it takes ~200 ms against ~8 ms for
the forward pass. Output pixel (2i + a, 2j + b) only sees the kernel taps w[a::2, b::2]
(2x2) over a 2x2 input window, so the weight gradient splits into four stride-1 convolution
weight gradients, which are fast. The forward pass and the input gradient keep XLA's own
transposed convolution. The result equals `jax.lax.conv_transpose(x, w, (2, 2), 'SAME')`
(not kernel-flipped, like `nnx.ConvTranspose`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_DN = ("NHWC", "HWIO", "NHWC")
# For output phase a (row parity), the two input rows used: [i - 1, i] for a = 0 and
# [i, i + 1] for a = 1, i.e. explicit padding (1, 0) or (0, 1) of a stride-1 convolution.
_PHASE_PADDING = {0: (1, 0), 1: (0, 1)}


def _native(x_BHWC: jax.Array, w_44IO: jax.Array) -> jax.Array:
  return jax.lax.conv_transpose(x_BHWC, w_44IO, (2, 2), "SAME", dimension_numbers=_DN)


def _by_phases(x_BHWC: jax.Array, w_44IO: jax.Array) -> jax.Array:
  """The same map as four stride-1 convolutions, one per output phase, interleaved."""
  rows = []
  for a in (0, 1):
    row = [jax.lax.conv_general_dilated(x_BHWC, w_44IO[a::2, b::2], (1, 1),
                                        (_PHASE_PADDING[a], _PHASE_PADDING[b]),
                                        dimension_numbers=_DN) for b in (0, 1)]
    rows.append(jnp.stack(row, axis=3))  # [B, H, W, 2 (b), O]
  y_BHaWbO = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), O]
  B, H, _, W, _, out_features = y_BHaWbO.shape
  return y_BHaWbO.reshape(B, 2 * H, 2 * W, out_features)


@jax.custom_vjp
def _upsample_fast_wgrad(x_BHWC: jax.Array, w_44IO: jax.Array) -> jax.Array:
  return _native(x_BHWC, w_44IO)


def _fwd(x_BHWC, w_44IO):
  return _native(x_BHWC, w_44IO), (x_BHWC, w_44IO)


def _bwd(residuals, dy):
  x_BHWC, w_44IO = residuals
  dx = jax.vjp(lambda x: _native(x, w_44IO), x_BHWC)[1](dy)[0]
  dw = jax.vjp(lambda w: _by_phases(x_BHWC, w), w_44IO)[1](dy)[0]
  return dx, dw


_upsample_fast_wgrad.defvjp(_fwd, _bwd)


def conv_transpose_2x(x_BHWC: jax.Array, w_44IO: jax.Array, impl: str = "auto") -> jax.Array:
  """[B, H, W, I] -> [B, 2H, 2W, O]. impl: 'native' (XLA's gradient), 'phases' (the
  weight gradient by output phases) or 'auto' ('phases' on CPU, where it is several times
  faster; 'native' on GPU/TPU, whose libraries handle the transposed convolution well)."""
  if impl == "auto":
    impl = "phases" if jax.default_backend() == "cpu" else "native"
  if impl == "native":
    return _native(x_BHWC, w_44IO)
  if impl == "phases":
    return _upsample_fast_wgrad(x_BHWC, w_44IO)
  raise ValueError(f"unknown impl {impl!r}: use 'auto', 'native' or 'phases'")


class UpConv2x(nnx.Module):
  """nnx.ConvTranspose(in, out, (4, 4), strides=2, padding='SAME') with the same
  parameters ('kernel' [4, 4, in, out], 'bias' [out]) and initialisers, fast on CPU."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               impl: str = "auto", dtype=None, kernel_init=None):
    init = kernel_init or nnx.initializers.lecun_normal()
    self.dtype = dtype  # compute dtype (None: the input's)
    self.kernel = nnx.Param(init(rngs.params(), (4, 4, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.impl = impl

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    dtype = self.dtype or x_BHWC.dtype
    y = conv_transpose_2x(x_BHWC.astype(dtype), self.kernel[...].astype(dtype), self.impl)
    return y + self.bias[...].astype(dtype)[None, None, None, :]
