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

import jax
import numpy as np

from aigc_jax.families.gan import Family, default_config
from benchmarks.lm_step import measure_step


def bench_dcgan(size: int, channels: int, width: int, z_dim: int, batch: int,
                steps: int, depth: int = 0) -> dict:
  c = default_config()
  c.model.update(image_size=size, channels=channels, width=width, z_dim=z_dim, depth=depth)
  c.train.update(batch_size=batch)
  family = Family(c, None)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  m = measure_step(family, {"images": images.astype(np.float32),
                            "labels": np.zeros(batch, np.int32)}, "g_loss", steps)
  return {"size": size, "channels": channels, "width": width, "depth": depth, "z_dim": z_dim,
          "batch": batch, **m, "steps_per_s": 1 / m["step_median_s"],
          "images_per_s": batch / m["step_median_s"]}


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
