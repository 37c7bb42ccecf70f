"""DCGAN train-step benchmark cases: our compiled adversarial step (one D and one G
update) beside the same architecture in eager PyTorch on CPU. Run them through
`python -m benchmarks.run --families gan`. Real images are not needed: the step's cost
does not depend on them."""

from __future__ import annotations

import functools

import numpy as np

from aigc_jax.families.gan import Family, default_config
from benchmarks.common import measure_step, model_flops, step_row

# name: (image size, channels, width, z_dim, depth, batch)
CASES = {
    "tiny": (8, 1, 8, 8, 0, 4),
    "28px": (28, 1, 64, 64, 0, 64),
    "64px": (64, 3, 64, 128, 0, 128),
}


def family_and_batch(case: str, dtype: str) -> tuple[Family, dict]:
  """The case's GAN family (no data) and a batch of uniform noise images."""
  size, channels, width, z_dim, depth, batch = CASES[case]
  c = default_config()
  c.model.update(image_size=size, channels=channels, width=width, z_dim=z_dim, depth=depth,
                 dtype=dtype)
  c.train.update(batch_size=batch)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  return Family(c, None), {"images": images.astype(np.float32),
                           "labels": np.zeros(batch, np.int32)}


def bench(case: str, steps: int, dtype: str = "float32", torch: bool = False,
          mesh: dict | None = None) -> dict:
  size, channels, width, z_dim, depth, batch = CASES[case]
  family, host_batch = family_and_batch(case, dtype)
  measured = measure_step(family, host_batch, "g_loss", steps, mesh=mesh)
  torch_fn = None
  if torch:
    from benchmarks.torch_dcgan import time_step
    torch_fn = functools.partial(time_step, size, channels, z_dim, width, batch, steps,
                                 depth=depth)
  return step_row("gan", case, f"{size}x{size}x{channels} width {width} depth {depth}",
                  dtype, batch, measured, model_flops(measured), torch_fn)
