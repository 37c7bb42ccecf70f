"""Diffusion train-step and sampling benchmark cases: our compiled EDM step (one AdamW
update of the U-Net + the EMA) and the compiled sampler (`Family._sample_fn`: the whole
trajectory in one jit) at 50 network evaluations, beside the same U-Net's step in eager
PyTorch on CPU. Run them through `python -m benchmarks.run --families diffusion`."""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np

from aigc_jax.config import load_config_file
from aigc_jax.families.diffusion import Family
from aigc_jax.models import diffusion_samplers as samplers
from benchmarks.common import measure_step, model_flops, step_row, timed
from benchmarks.flops import count_matmul_flops

# name: (config file, train batch, sampling batch)
CASES = {
    "tiny": ("configs/diffusion_tiny.py", 4, 4),
    "28px": ("configs/diffusion_fashion_mnist.py", 64, 64),
    "32px": ("configs/diffusion_cifar10.py", 128, 256),  # the GPU case
}
SAMPLE_SAMPLER, SAMPLE_STEPS = "euler", 50  # 50 NFE


def family_and_batch(case: str, dtype: str) -> tuple[Family, dict]:
  """The case's diffusion family (its config's U-Net; no data) and a batch of uniform
  noise images with labels."""
  path, batch, _ = CASES[case]
  c = load_config_file(path)
  c.model.dtype = dtype
  c.train.batch_size = batch
  size, channels = c.model.image_size, c.model.channels
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  labels = np.arange(batch, dtype=np.int32) % max(c.model.num_classes, 1)
  return Family(c, None), {"images": images.astype(np.float32), "labels": labels}


def measure_sampling(family: Family, num: int, timed_calls: int = 2) -> dict:
  """Images/s of the compiled sampler at SAMPLE_STEPS Euler steps (unguided; a guided
  step costs one network call on a doubled batch) on `num` images, from freshly
  initialised weights (the cost does not depend on them), and its matmul + convolution
  FLOPs per image."""
  params = jax.jit(lambda: family.init_state(jax.random.PRNGKey(0)).extra["ema"])()
  fn = family._sample_fn(SAMPLE_SAMPLER, SAMPLE_STEPS, 0.0, 1.0, False)
  x = family.start_noise(num, 0)
  labels = (np.arange(num, dtype=np.int32) % family.net_cfg.num_classes
            if family.net_cfg.num_classes else None)
  key = jax.random.PRNGKey(1)
  median, best, _ = timed(lambda: fn(params, x, labels, key)[0], timed_calls, warmup=1)
  flops = count_matmul_flops(lambda p, x, y: fn(p, x, y, key)[0], params, x, labels)
  return {"sample_nfe": samplers.number_of_evaluations(SAMPLE_SAMPLER, SAMPLE_STEPS),
          "sample_batch": num, "sample_call_median_s": median, "sample_call_min_s": best,
          "sample_images_per_s": num / median, "sample_flops_per_image": flops / num,
          "sample_flops_per_s": flops / median}


def bench(case: str, steps: int, dtype: str = "float32", torch: bool = False,
          mesh: dict | None = None) -> dict:
  _, batch, sample_batch = CASES[case]
  family, host_batch = family_and_batch(case, dtype)
  measured = measure_step(family, host_batch, "loss", steps, mesh=mesh)
  torch_fn = None
  if torch:
    from benchmarks.torch_unet import time_step
    torch_fn = functools.partial(time_step, family.config, batch, steps)
  u = family.net_cfg
  shape = (f"{u.image_size}x{u.image_size}x{u.channels} width {u.width} "
           f"x{'/'.join(map(str, u.channel_mults))}")
  row = step_row("diffusion", case, shape, dtype, batch, measured, model_flops(measured),
                 torch_fn)
  if mesh is None:  # sampling on the default device(s); meshes compare the step alone
    print(f"[benchmarks] step {row['step_median_s'] * 1e3:.1f} ms (compiled in "
          f"{row['compile_s']:.0f} s); sampling {sample_batch} images at 50 NFE ...",
          file=sys.stderr, flush=True)
    row.update(measure_sampling(family, sample_batch))
  return row
