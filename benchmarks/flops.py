"""Matmul and convolution FLOPs counted from a function's jaxpr: 2 per multiply-add of
every `dot_general` and `conv_general_dilated`, forward and backward as traced, nothing
else (elementwise work, reductions and data movement are not counted). This is the
analytic "model FLOPs" of a step whose model has no closed formula (GAN, VAE); for the LM
the closed formula of `TransformerConfig.flops_per_token` is used instead.

Sub-computations are followed: `scan` bodies count `length` times, `cond` counts its most
expensive branch, and a `while` body counts once (its trip count is not static).
"""

from __future__ import annotations

import math

import jax
from jax import core as jax_core

try:  # jax >= 0.4.36 moved the jaxpr types to jax.extend
  from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover - older JAX
  ClosedJaxpr, Jaxpr = jax_core.ClosedJaxpr, jax_core.Jaxpr


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 x (every lhs element) x (rhs's free dimensions): batch and contracting dims of the
  lhs appear once, the rhs's free dimensions multiply it."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in (*rhs_contract, *rhs_batch)]
  return 2 * math.prod(lhs_shape) * math.prod(rhs_free)


def conv_flops(out_shape, rhs_shape, dimension_numbers, lhs_dilation=None) -> int:
  """2 x (every output element) x (the kernel's window x input features per group);
  correct for feature- and batch-grouped convolutions (the rhs already holds the per-group
  input features). With an lhs (input) dilation, as in a transposed convolution or the
  input gradient of a strided one, only 1 / prod(dilation) of the window meets real
  inputs; the multiplies by inserted zeros are not counted."""
  out_feature_dim = dimension_numbers.rhs_spec[0]
  per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
  return 2 * math.prod(out_shape) * per_output // math.prod(lhs_dilation or (1,))


def _sub_jaxprs(value):
  if isinstance(value, ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += dot_general_flops(lhs, rhs, eqn.params["dimension_numbers"])
    elif name == "conv_general_dilated":
      total += conv_flops(eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape,
                          eqn.params["dimension_numbers"], eqn.params["lhs_dilation"])
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def count_matmul_flops(fn, *args) -> int:
  """Matmul + convolution FLOPs of one call of fn(*args) (traced, not run)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
