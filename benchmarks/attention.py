"""Causal attention, forward + backward, in every implementation this backend offers:
agreement with float32 einsum attention, step time and FLOP/s.

It answers "which attention does `attention='auto'` pick, and is it right here?": on GPU
cuDNN's fused kernel (16-bit only) beside XLA's and ours, on CPU our blockwise and einsum
attention beside XLA's.

  python -m benchmarks.attention [--shape B,T,N,K,H] [--dtype bfloat16] [--steps 20]

The default shape is the LM's attention at the preset's scale: width 384's on CPU
(16, 256, 6, 6, 64), GPT-2 small's on GPU (16, 1024, 12, 12, 64).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from aigc_jax.models.transformer import resolve_attention
from aigc_jax.nn.attention import attend
from aigc_jax.nn.dtypes import DTYPES
from benchmarks.common import timed

DEFAULT_SHAPES = {"gpu": (16, 1024, 12, 12, 64), "cpu": (16, 256, 6, 6, 64)}


def implementations(backend: str, dtype: str) -> list[str]:
  """The implementations that run on `backend` in `dtype` (cuDNN: GPU, 16-bit only)."""
  names = ["einsum", "blockwise", "xla"]
  if backend == "gpu" and dtype in ("bfloat16", "float16"):
    names.append("cudnn")
  return names


def attention_flops(B: int, T: int, N: int, H: int) -> int:
  """Forward + backward matmul FLOPs of causal attention, MaxText's convention: the two
  T x T matmuls (2 * 2BNT^2H), counted at half for the causal mask, training = 3x."""
  return 3 * 2 * B * N * T * T * H


def inputs(shape, dtype: str, seed: int = 0) -> tuple[jax.Array, ...]:
  """q [B, T, N, H], k and v [B, T, K, H], and the output cotangent [B, T, N, H]."""
  B, T, N, K, H = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, w = (jax.random.normal(k, (B, T, N, H)) for k in (keys[0], keys[3]))
  k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:3])
  return tuple(x.astype(DTYPES[dtype]) for x in (q, k, v)) + (w,)


def loss_and_grads(implementation: str):
  """jit(q, k, v, w -> (sum(attention * w), d/dq, d/dk, d/dv)), values in float32."""
  def loss(q, k, v, w):
    return jnp.sum(attend(q, k, v, None, implementation).astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _measure(name: str, args, reference, flops: int, steps: int) -> dict:
  fn = loss_and_grads(name)
  value, grads = fn(*args)
  error = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
              for g, r in zip(grads, reference[1], strict=True))
  error = max(error, abs(float(value) - float(reference[0])) / abs(float(reference[0])))
  median, best, _ = timed(lambda: fn(*args), steps)
  return {"implementation": name, "median_ms": median * 1e3, "min_ms": best * 1e3,
          "tflop_per_s": flops / median / 1e12, "max_relative_error": error}


def run(shape, dtype: str, steps: int) -> dict:
  """Each implementation's largest deviation from float32 einsum attention (output and
  gradients, relative to the reference's largest magnitude) and its step time; or the
  error it raised."""
  B, T, N, K, H = shape
  q, k, v, w = inputs(shape, dtype)
  reference = loss_and_grads("einsum")(*(x.astype(jnp.float32) for x in (q, k, v)), w)
  flops = attention_flops(B, T, N, H)
  rows = []
  for name in implementations(jax.default_backend(), dtype):
    try:
      rows.append(_measure(name, (q, k, v, w), reference, flops, steps))
    except Exception as e:  # one failing kernel (a cuDNN version, say) must not hide the rest
      rows.append({"implementation": name, "error": f"{type(e).__name__}: {e}"[:400]})
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "shape_BTNKH": list(shape), "dtype": dtype, "gflop": flops / 1e9,
          "auto": resolve_attention("auto"), "rows": rows}


def markdown(result: dict) -> str:
  lines = [f"Causal attention fwd + bwd, {result['device']}, shape (B, T, N, K, H) = "
           f"{tuple(result['shape_BTNKH'])}, {result['dtype']}, {result['gflop']:.3g} GFLOP; "
           f"`auto` = {result['auto']}", "",
           "| implementation | median ms | min ms | TFLOP/s | max relative error |",
           "|---|---|---|---|---|"]
  for r in result["rows"]:
    if "error" in r:
      lines.append(f"| {r['implementation']} | failed: {r['error']} | | | |")
      continue
    lines.append(f"| {r['implementation']} | {r['median_ms']:,.2f} | {r['min_ms']:,.2f} | "
                 f"{r['tflop_per_s']:.4g} | {r['max_relative_error']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="", help="B,T,N,K,H (default: the backend's)")
  p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                 help="default: bfloat16 on GPU, float32 elsewhere")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--out", default="", help="also write the result as JSON here")
  a = p.parse_args(argv)
  backend = jax.default_backend()
  if a.shape:
    try:
      shape = tuple(int(s) for s in a.shape.split(","))
    except ValueError:
      shape = ()
    if len(shape) != 5 or min(shape) < 1:
      p.error(f"--shape takes five positive integers B,T,N,K,H, got {a.shape!r}")
    if shape[2] % shape[3]:
      p.error(f"--shape: the query heads N={shape[2]} must be a multiple of the KV heads "
              f"K={shape[3]}")
  else:
    shape = DEFAULT_SHAPES.get(backend, DEFAULT_SHAPES["gpu"])
  dtype = a.dtype or ("bfloat16" if backend == "gpu" else "float32")
  result = run(shape, dtype, a.steps)
  print(markdown(result))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
