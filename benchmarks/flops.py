"""Matmul and convolution FLOPs: 2 per multiply-add of every dot and convolution, nothing
else (elementwise work, reductions and data movement are not counted), counted two ways:

- `compiled_matmul_flops(compiled)`: from the optimized HLO of a compiled program
  (`jax.jit(f).lower(...).compile()`), after XLA's dead-code elimination and rewrites:
  what the program runs, not what tracing produced (a custom VJP such as `UpConv2x`'s
  traces forward passes whose results it discards; XLA removes them).
- `count_matmul_flops(fn, *args)`: from fn's jaxpr with dead code removed (`dce`), in the
  same convention, without compiling. The GAN's and VAE's benchmark "model FLOPs"; the
  tests check that it equals the compiled program's count for every CPU case.

A convolution's multiply-adds are those whose two operands are real elements: taps that
fall on padding or on the zeros an input (lhs) dilation inserts (a transposed conv) are
not counted. This is XLA's own convention (`HloCostAnalysis::GetConvolutionFlops`) and
the only one that does not change when XLA rewrites a convolution into an equivalent one
(swapped operands, a weight gradient as a batch-grouped convolution, a conv as a dot). At
the border of a 'SAME' convolution it counts fewer taps than 2 x outputs x window x
input features. For the LM the closed formula of `TransformerConfig.flops_per_token`
(MaxText's convention) is used instead.

A dot that contracts nothing (a contraction of length 1: an outer product, such as the
input gradient of a layer with one output) is elementwise multiplication, and XLA runs it
as such: neither counter counts it.

Sub-computations count as many times as they run: a `while` body `known_trip_count`
times (XLA records it for loops with a static count: scan, fori_loop), a jaxpr `scan`
body `length` times (a jaxpr `while` body once), a `conditional`/`cond` its most
expensive branch. In the compiled program a `while` whose trip count XLA does not know
raises if its body holds any dot or convolution.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
from jax import core as jax_core

try:  # jax >= 0.4.36 moved the jaxpr types to jax.extend
  from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover - older JAX
  ClosedJaxpr, Jaxpr = jax_core.ClosedJaxpr, jax_core.Jaxpr


# ---------------------------------------------------------------------------------------
# The convention, shared by both counters.

def valid_taps(in_size: int, out_size: int, window: int, stride: int = 1, pad_low: int = 0,
               lhs_dilation: int = 1, rhs_dilation: int = 1) -> int:
  """Along one spatial dimension: the (output position, window tap) pairs whose input
  position is a real element of the input (not padding, not an inserted zero)."""
  if min(in_size, out_size, window) <= 0:
    return 0
  small, large = sorted((out_size, window))
  big = np.arange(large)
  total = 0
  for i in range(small):  # loop over the shorter of outputs and taps, vectorise the other
    o, k = (i, big) if out_size == small else (big, i)
    pos = o * stride + k * rhs_dilation - pad_low
    ok = (pos >= 0) & (pos <= (in_size - 1) * lhs_dilation) & (pos % lhs_dilation == 0)
    total += int(np.count_nonzero(ok))
  return total


def conv_macs(lhs_spatial, out_spatial, window, strides, pads_low, lhs_dilation,
              rhs_dilation, out_batch: int, out_features: int, in_features: int) -> int:
  """Multiply-adds of a convolution: output batch x output features x the kernel's input
  features (per group: correct for feature- and batch-grouped convolutions) x the real
  (output, tap) pairs of every spatial dimension."""
  taps = math.prod(valid_taps(*dims) for dims in zip(lhs_spatial, out_spatial, window,
                                                       strides, pads_low, lhs_dilation,
                                                       rhs_dilation, strict=True))
  return out_batch * out_features * in_features * taps


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 x (every lhs element) x (rhs's free dimensions): batch and contracting dims of the
  lhs appear once, the rhs's free dimensions multiply it."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in (*rhs_contract, *rhs_batch)]
  return 2 * math.prod(lhs_shape) * math.prod(rhs_free)


# ---------------------------------------------------------------------------------------
# From a jaxpr.

def conv_flops(lhs_shape, rhs_shape, out_shape, params) -> int:
  """FLOPs of a `conv_general_dilated` equation from its shapes and params."""
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  n = len(lhs_spec) - 2
  pads = params["padding"]
  return 2 * conv_macs([lhs_shape[d] for d in lhs_spec[2:]],
                       [out_shape[d] for d in out_spec[2:]],
                       [rhs_shape[d] for d in rhs_spec[2:]], params["window_strides"],
                       [lo for lo, _ in pads], params["lhs_dilation"] or (1,) * n,
                       params["rhs_dilation"] or (1,) * n, out_shape[out_spec[0]],
                       out_shape[out_spec[1]], rhs_shape[rhs_spec[1]])


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
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      if math.prod(lhs[d] for d in lhs_contract) > 1:  # else an outer product (see above)
        total += dot_general_flops(lhs, rhs, eqn.params["dimension_numbers"])
    elif name == "conv_general_dilated":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += conv_flops(lhs, rhs, eqn.outvars[0].aval.shape, eqn.params)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def _dce(jaxpr):
  """jaxpr without the equations no output depends on (JAX's own pass; it follows pjit,
  scan, cond and while bodies). Effectful equations are kept."""
  from jax._src.interpreters import partial_eval as pe  # no public DCE entry point
  return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


def count_matmul_flops(fn, *args, dce: bool = True) -> int:
  """Matmul + convolution FLOPs of one call of fn(*args) (traced, not run); with dce,
  those of equations some output depends on (as the compiled program runs them)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return jaxpr_flops(_dce(jaxpr) if dce else jaxpr)


# ---------------------------------------------------------------------------------------
# From optimized HLO text.

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"^(\w+)\[([^\]]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|"
                     r"false_computation|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
# Custom calls that hide a matmul or convolution this module does not read: counting them
# as 0 would understate the FLOPs silently.
_OPAQUE = re.compile(r"conv|gemm|matmul|dot|fmha|onednn|attention|triton", re.IGNORECASE)


def _close(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at text[start]."""
  opening, closing = text[start], {"(": ")", "{": "}", "[": "]"}[text[start]]
  depth = 0
  for i in range(start, len(text)):
    depth += (text[i] == opening) - (text[i] == closing)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced {opening!r} in HLO: {text[start:start + 80]!r}")


def _dims(shape_text: str) -> list[int] | None:
  """[2, 3] from 'f32[2,3]{1,0}' (bounded dynamic dims at their bound); None for tuples
  and tokens."""
  m = _ARRAY.match(shape_text.strip())
  if m is None:
    return None
  return [int(d.lstrip("<=")) for d in m.group(2).split(",") if d.strip()]


def _split_top(text: str) -> list[str]:
  """Comma-separated items of text, not splitting inside brackets."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += (ch in "([{") - (ch in ")]}")
    if ch == "," and depth == 0:
      items.append(text[start:i].strip())
      start = i + 1
  if text[start:].strip():
    items.append(text[start:].strip())
  return items


def _parse_instruction(rest: str):
  """(result shape text, opcode, operand texts, attribute text) of 'TYPE opcode(...) ...'."""
  rest = re.sub(r"/\*.*?\*/", "", rest)
  end = _close(rest, 0) if rest.startswith("(") else rest.index(" ")
  shape, tail = rest[:end], rest[end:].lstrip()
  paren = tail.index("(")
  close = _close(tail, paren)
  return shape, tail[:paren], _split_top(tail[paren + 1:close - 1]), tail[close:]


def _attribute(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=", attrs)
  if m is None:
    return None
  start = m.end()
  if attrs[start] in "{[":
    return attrs[start + 1:_close(attrs, start) - 1]
  if attrs[start] == '"':
    return attrs[start + 1:attrs.index('"', start + 1)]
  return re.match(r"[^,\s]*", attrs[start:]).group(0)


def _conv_hlo_macs(lhs: list[int], rhs: list[int], out: list[int], attrs: str) -> int:
  """Multiply-adds of an HLO convolution: dim_labels such as b01f_01io->b01f and window
  {size=4x4 stride=2x2 pad=1_1x1_1 lhs_dilate=2x2 rhs_dilate=2x2}."""
  labels = _attribute(attrs, "dim_labels")
  if labels is None:
    raise ValueError(f"convolution without dim_labels: {attrs[:200]!r}")
  lhs_l, rest = labels.split("_", 1)
  rhs_l, out_l = rest.split("->")
  spatial = sorted(c for c in lhs_l if c.isdigit())
  window = {}
  for item in (_attribute(attrs, "window") or "").split():
    key, value = item.split("=")
    window[key] = value.split("x")
  n = len(spatial)
  size = [int(s) for s in window.get("size", [rhs[rhs_l.index(d)] for d in spatial])]
  if size != [rhs[rhs_l.index(d)] for d in spatial]:
    raise ValueError(f"window size {size} is not the kernel's spatial shape: {attrs!r}")
  ints = lambda key, default: [int(v) for v in window.get(key, [default] * n)]
  pads = [int(p.split("_")[0]) for p in window.get("pad", ["0_0"] * n)]
  return conv_macs([lhs[lhs_l.index(d)] for d in spatial],
                   [out[out_l.index(d)] for d in spatial], size, ints("stride", 1), pads,
                   ints("lhs_dilate", 1), ints("rhs_dilate", 1), out[out_l.index("b")],
                   out[out_l.index("f")], rhs[rhs_l.index("i")])


def _dot_hlo_macs(lhs: list[int], out: list[int], lhs_contracting: list[int]) -> int:
  return math.prod(out) * math.prod(lhs[d] for d in lhs_contracting)


def _int_list(text: str | None) -> list[int]:
  return [int(v) for v in re.findall(r"\d+", text or "")]


class _Module:
  """The computations of an HLO module's text: name -> [(name, shape, opcode, operands,
  attributes)], and the entry computation's name."""

  def __init__(self, text: str):
    self.computations: dict[str, list] = {}
    self.entry = None
    current = None
    for line in text.splitlines():
      if current is None:
        m = _COMPUTATION.match(line)
        if m:
          current = self.computations.setdefault(m.group(1), [])
          if line.startswith("ENTRY"):
            self.entry = m.group(1)
        continue
      if line.strip() == "}":
        current = None
        continue
      m = _INSTRUCTION.match(line)
      if m:
        current.append((m.group(1), *_parse_instruction(m.group(2))))
    if self.entry is None:
      raise ValueError("no ENTRY computation in the HLO text")
    self._memo: dict[str, int] = {}

  def flops(self, name: str | None = None) -> int:
    """FLOPs of one execution of computation `name` (the entry by default)."""
    name = name or self.entry
    if name not in self._memo:
      self._memo[name] = 0  # a guard against cycles; HLO has none
      self._memo[name] = self._count(name)
    return self._memo[name]

  def _count(self, name: str) -> int:
    shapes = {}
    total = 0
    for inst, shape, opcode, operands, attrs in self.computations[name]:
      shapes[inst] = shape

      def operand_dims(i, operands=operands):
        text = operands[i]
        if _ARRAY.match(text):  # 'f32[2,3]{1,0} %x' when operand shapes are printed
          return _dims(text)
        return _dims(shapes[text.split()[-1].lstrip("%")])

      if opcode == "convolution":
        total += 2 * _conv_hlo_macs(operand_dims(0), operand_dims(1), _dims(shape), attrs)
      elif opcode == "dot":
        if "sparsity=" in attrs:
          raise ValueError(f"sparse dot {inst} is not counted by this module")
        total += 2 * _dot_hlo_macs(operand_dims(0), _dims(shape),
                                   _int_list(_attribute(attrs, "lhs_contracting_dims")))
      elif opcode == "custom-call":
        total += self._custom_call(inst, shape, operand_dims, attrs)
      called = [c.strip().lstrip("%") for m in _CALLED.finditer(attrs)
                for c in m.group(1).strip("{}").split(",") if c.strip()]
      if opcode == "while":
        body = _attribute(attrs, "body").lstrip("%")
        cond = _attribute(attrs, "condition").lstrip("%")
        inner = self.flops(body) + self.flops(cond)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
        if trips is None and inner:
          raise ValueError(
              f"while loop {inst} runs dots or convolutions but its trip count is not "
              "known to XLA; its FLOPs cannot be counted from the compiled program")
        total += inner * int(trips.group(1)) if trips else 0
      elif opcode == "conditional":
        total += max((self.flops(c) for c in called), default=0)
      else:  # fusion, call, async ops, custom-call bodies; reduce/sort/scatter's scalar
        total += sum(self.flops(c) for c in called)  # computations hold no dots
    return total

  @staticmethod
  def _custom_call(inst, shape, operand_dims, attrs) -> int:
    target = _attribute(attrs, "custom_call_target") or ""
    results = [s for s in _split_top(shape.strip("()"))] if shape.startswith("(") else [shape]
    if target.startswith("__cudnn$conv"):
      # cuDNN convolutions keep the forward convolution's window and dim_labels; which of
      # operands and result are its input, kernel and output depends on the kind.
      result = _dims(results[0])
      if "BackwardInput" in target:
        lhs, rhs, out = result, operand_dims(1), operand_dims(0)
      elif "BackwardFilter" in target:
        lhs, rhs, out = operand_dims(0), result, operand_dims(1)
      else:
        lhs, rhs, out = operand_dims(0), operand_dims(1), result
      return 2 * _conv_hlo_macs(lhs, rhs, out, attrs)
    if target.startswith(("__cublas$gemm", "__cublas$lt$matmul")):
      config = json.loads(_attribute_json(attrs))
      dnums = config.get("gemm_backend_config", config)["dot_dimension_numbers"]
      return 2 * _dot_hlo_macs(operand_dims(0), _dims(results[0]),
                               [int(d) for d in dnums.get("lhs_contracting_dimensions", [])])
    if _OPAQUE.search(target):
      raise ValueError(f"custom call {inst} ({target}) may run a matmul or convolution "
                       "that this module cannot count")
    return 0


def _attribute_json(attrs: str) -> str:
  start = attrs.index("backend_config=") + len("backend_config=")
  if attrs[start] == '"':  # older printers quote and escape the JSON
    return json.loads(re.match(r'"(?:[^"\\]|\\.)*"', attrs[start:]).group(0))
  return attrs[start:_close(attrs, start)]


def hlo_matmul_flops(hlo_text: str) -> int:
  """Matmul + convolution FLOPs of one run of the HLO module printed in hlo_text."""
  return _Module(hlo_text).flops()


def compiled_matmul_flops(compiled) -> int:
  """Matmul + convolution FLOPs of one run of a compiled JAX program
  (`jax.jit(f).lower(*args).compile()`), read from its optimized HLO. A program on
  several devices is one device's share (SPMD partitioned); its count is multiplied by
  the number of devices the program runs on."""
  shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  devices = max((len(s.device_set) for s in shardings), default=1)
  return devices * hlo_matmul_flops(compiled.as_text())
