"""LM train-step benchmark: our compiled step beside an eager PyTorch GPT of the same shape.

  python -m benchmarks.lm_step [--shapes nanogpt,w384] [--steps 40] [--out results.json]

For each shape: compile time, median/min step time (each step synchronised with
block_until_ready), tokens/s, analytic model FLOPs (MaxText's convention) with XLA's
cost_analysis() beside it, achieved FLOP/s against the same run's best measured matmul,
peak memory; then the PyTorch step when torch is installed. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.families.lm import Family, default_config
from aigc_jax.train import mesh as mesh_lib

# name: (layers, heads, width, SwiGLU width, context, batch); the SwiGLU widths keep the
# FLOPs of nanoGPT's 4x GELU MLP (2/3 of 4 x width).
SHAPES = {
    "nanogpt": (4, 4, 128, 344, 64, 12),
    "w384": (6, 6, 384, 1024, 256, 16),
}
DATASHEET_PEAK_TFLOPS = {"h100": 989, "h200": 989, "a100": 312, "v4": 275, "v5e": 197,
                         "v5 lite": 197, "v5p": 459, "v6e": 918, "v6 lite": 918}


def timed(fn, steps: int, warmup: int = 5):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(np.min(times)), float(np.std(times))


def peak_flops() -> tuple[float, str]:
  """Datasheet peak for a known accelerator, else the best matmul measured now."""
  kind = jax.devices()[0].device_kind.lower()
  for key, tflops in DATASHEET_PEAK_TFLOPS.items():
    if key in kind:
      return tflops * 1e12 * jax.device_count(), f"datasheet ({kind})"
  best = 0.0
  for n in (512, 1024, 2048):
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    _, t_min, _ = timed(functools.partial(matmul, a), 10)
    best = max(best, 2 * n ** 3 / t_min)
  return best, "measured float32 matmul"


def measure_step(family, host_batch, metric: str, steps: int) -> dict:
  """Compiles `family.train_step` as the training loop does (replicated state, donated,
  batch sharded over all devices) and times it: lowering and compile seconds, median /
  min / spread of `steps` synchronised steps, XLA's FLOPs, and memory."""
  mesh = mesh_lib.make_mesh(-1)
  rep = mesh_lib.replicated(mesh)
  state = jax.jit(family.init_state, out_shardings=rep)(jax.random.PRNGKey(0))
  batch = mesh_lib.put_batch(host_batch, mesh)
  shardings = jax.tree.map(lambda _: rep, state)
  jitted = jax.jit(family.train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, rep), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics[metric]

  median, best, spread = timed(one_step, steps)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "step_median_s": median,
          "step_min_s": best, "step_std_s": spread,
          "xla_flops_per_step": float((cost or {}).get("flops", -1)),
          "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "peak_device_bytes": stats.get("peak_bytes_in_use"),
          "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def bench_shape(name: str, steps: int, dtype: str) -> dict:
  layers, heads, width, mlp, context, batch = SHAPES[name]
  c = default_config()
  c.model.update(num_layers=layers, num_heads=heads, num_kv_heads=heads, embed_dim=width,
                 mlp_dim=mlp, dtype=dtype)
  c.data.update(seq_len=context, limit_files=60)
  c.train.update(batch_size=batch)
  family = Family(c, None)
  batch_arrays = next(family.train_data)
  m = measure_step(family, batch_arrays, "loss", steps)
  tokens = batch * context
  flops = family.model_cfg.flops_per_token(context) * tokens
  return {
      "shape": name, "layers": layers, "heads": heads, "width": width, "context": context,
      "batch": batch, "dtype": dtype, "params": family.model_cfg.num_params(), **m,
      "tokens_per_s": tokens / m["step_median_s"], "model_flops_per_step": flops,
      "achieved_flops_per_s": flops / m["step_median_s"],
  }


def bench_torch(name: str, steps: int) -> dict | None:
  try:
    from benchmarks.torch_gpt import time_step
  except ImportError:
    return None
  layers, heads, width, _, context, batch = SHAPES[name]
  try:
    return time_step(layers=layers, heads=heads, width=width, context=context, batch=batch,
                     steps=steps)
  except ImportError:
    return None


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="nanogpt,w384")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  peak, peak_source = peak_flops()
  rows = []
  for name in args.shapes.split(","):
    steps = args.steps if name == "nanogpt" else max(5, args.steps // 8)
    row = bench_shape(name, steps, args.dtype)
    row["mfu"] = row["achieved_flops_per_s"] / peak
    row["peak_flops_per_s"], row["peak_source"] = peak, peak_source
    torch_row = None if args.no_torch else bench_torch(name, steps)
    if torch_row:
      row["torch_step_median_s"] = torch_row["median_s"]
      row["speedup_vs_torch"] = torch_row["median_s"] / row["step_median_s"]
      row["torch_version"] = torch_row["torch"]
    rows.append(row)
  cpu = platform.processor() or platform.machine()
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({cpu})"
  print(f"\n### LM train step, {device}, JAX {jax.__version__}\n")
  print("| shape | params | compile s | step ms (median / min) | tokens/s | model GFLOP/step "
        "| XLA GFLOP/step | achieved GFLOP/s | MFU | PyTorch ms | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['shape']} (L{r['layers']} H{r['heads']} D{r['width']} T{r['context']} "
          f"B{r['batch']}) | {r['params'] / 1e6:.2f}M | {r['compile_s']:.1f} | "
          f"{r['step_median_s'] * 1e3:.1f} / {r['step_min_s'] * 1e3:.1f} | "
          f"{r['tokens_per_s']:,.0f} | {r['model_flops_per_step'] / 1e9:.2f} | "
          f"{r['xla_flops_per_step'] / 1e9:.2f} | {r['achieved_flops_per_s'] / 1e9:.1f} | "
          f"{r['mfu']:.1%} | {r.get('torch_step_median_s', float('nan')) * 1e3:.1f} | "
          f"{r.get('speedup_vs_torch', float('nan')):.2f}x |")
  print(f"\nPeak: {peak / 1e9:.1f} GFLOP/s ({peak_source}).")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
