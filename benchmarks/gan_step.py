"""DCGAN train-step benchmark: our compiled adversarial step beside the same architecture
in eager PyTorch.

  python -m benchmarks.gan_step [--size 28] [--width 64] [--depth 0] [--batch 64] [--steps 20]
                                [--out F]

Compile time, median/min step time (each synchronised with block_until_ready), steps/s,
images/s, XLA's FLOP count and the compiled step's memory; then the PyTorch step when
torch is installed. Real images are not needed: the step's cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import jax
import numpy as np

from aigc_jax.families.gan import Family, default_config
from aigc_jax.train import mesh as mesh_lib
from benchmarks.lm_step import timed


def bench_dcgan(size: int, channels: int, width: int, z_dim: int, batch: int,
                steps: int, depth: int = 0) -> dict:
  c = default_config()
  c.model.update(image_size=size, channels=channels, width=width, z_dim=z_dim, depth=depth)
  c.train.update(batch_size=batch)
  family = Family(c, None)
  mesh = mesh_lib.make_mesh(-1)
  rep = mesh_lib.replicated(mesh)
  state = jax.jit(family.init_state, out_shardings=rep)(jax.random.PRNGKey(0))
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  batch_arrays = mesh_lib.put_batch({"images": images.astype(np.float32),
                                     "labels": np.zeros(batch, np.int32)}, mesh)
  shardings = jax.tree.map(lambda _: rep, state)
  jitted = jax.jit(family.train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, rep), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch_arrays)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch_arrays)
    return metrics["g_loss"]

  median, best, spread = timed(one_step, steps)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return {"size": size, "channels": channels, "width": width, "depth": depth, "z_dim": z_dim,
          "batch": batch,
          "lower_s": t1 - t0, "compile_s": t2 - t1, "step_median_s": median,
          "step_min_s": best, "step_std_s": spread, "steps_per_s": 1 / median,
          "images_per_s": batch / median,
          "xla_flops_per_step": float((cost or {}).get("flops", -1)),
          "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=28)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=0)
  p.add_argument("--z-dim", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  row = bench_dcgan(a.size, a.channels, a.width, a.z_dim, a.batch, a.steps, a.depth)
  if not a.no_torch:
    try:
      from benchmarks.torch_dcgan import time_step
      t = time_step(a.size, a.channels, a.z_dim, a.width, a.batch, a.steps, depth=a.depth)
      row.update(torch_step_median_s=t["median_s"], torch_version=t["torch"],
                 speedup_vs_torch=t["median_s"] / row["step_median_s"])
    except ImportError:
      pass
  device = (f"{jax.devices()[0].device_kind} x{jax.device_count()} "
            f"({platform.processor() or platform.machine()})")
  print(f"\n### DCGAN train step, {device}, JAX {jax.__version__}\n")
  print("| shape | compile s | step ms (median / min) | steps/s | images/s | XLA GFLOP/step "
        "| PyTorch ms | speed-up |")
  print("|---|---|---|---|---|---|---|---|")
  r = row
  print(f"| {r['size']}x{r['size']}x{r['channels']} width {r['width']} depth {r['depth']} "
        f"B{r['batch']} | "
        f"{r['compile_s']:.1f} | {r['step_median_s'] * 1e3:.1f} / {r['step_min_s'] * 1e3:.1f} "
        f"| {r['steps_per_s']:.2f} | {r['images_per_s']:,.0f} | "
        f"{r['xla_flops_per_step'] / 1e9:.2f} | "
        f"{r.get('torch_step_median_s', float('nan')) * 1e3:.1f} | "
        f"{r.get('speedup_vs_torch', float('nan')):.2f}x |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"device": device, "jax": jax.__version__, "rows": [row]}, f, indent=2)
  return row


if __name__ == "__main__":
  main()
