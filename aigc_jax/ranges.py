"""Numeric ranges for settings (NaN and infinities always refused): the words for a range
and the check, shared by config validation and the samplers (no config library needed)."""

from __future__ import annotations

import math
import numbers

import numpy as np


def describe_range(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                   integer: bool = False) -> str:
  """The words for a range: 'an integer >= 0', 'a finite number in (0, 1]', ..."""
  kind = "an integer" if integer else "a finite number"
  if lo is not None and hi is not None:
    return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if lo is not None:
    return f"{kind} {'>' if lo_open else '>='} {lo}"
  if hi is not None:
    return f"{kind} {'<' if hi_open else '<='} {hi}"
  return kind


def range_problem(value, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                  integer: bool = False) -> str | None:
  """None when `value` is a finite number (an integer if `integer`; never a bool) within the
  bounds (None: unbounded; `*_open`: the bound itself excluded), else what it must be:
  'must be a finite number in (0, 1], got nan'. NaN and infinities are always refused."""
  def inside(v) -> bool:
    ok = _finite(v)
    if ok and lo is not None:
      ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
      ok = v < hi if hi_open else v <= hi
    return ok

  expected = describe_range(lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer)
  if not _is_number(value) or (integer and not isinstance(value, numbers.Integral)):
    return f"must be {expected}, got {value!r}"
  if not inside(value):
    return f"must be {expected}, got {value!r}"
  if not integer:
    # Steps compute in float32: 1e-50 is 0 there, 0.99999999 is 1 and 1e39 is inf.
    try:
      as_float = float(value)
    except OverflowError:  # an int beyond float64
      as_float = math.inf
    with np.errstate(over="ignore", under="ignore"):
      as_f32 = float(np.float32(as_float))
    if not inside(as_f32):
      return f"must be {expected} in float32, got {value!r} ({as_f32!r} in float32)"
  return None


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
  return isinstance(value, numbers.Integral) or math.isfinite(value)
