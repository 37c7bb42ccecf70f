"""Conv VAE train-step benchmark cases: our compiled ELBO step (Bernoulli likelihood,
dynamic binarization) beside the same model in eager PyTorch on CPU. Run them through
`python -m benchmarks.run --families vae`."""

from __future__ import annotations

import functools

import numpy as np

from aigc_jax.families.vae import Family, default_config
from benchmarks.common import measure_step, model_flops, step_row

# name: (image size, channels, latent_dim, width, hidden, batch)
CASES = {
    "tiny": (8, 1, 4, 8, 16, 4),
    "28px": (28, 1, 20, 32, 512, 128),  # configs/vae_fashion_mnist.py
    "32px": (32, 3, 128, 64, 1024, 256),
}


def family_and_batch(case: str, dtype: str) -> tuple[Family, dict]:
  """The case's VAE family (no data) and a batch of uniform noise images."""
  size, channels, latent, width, hidden, batch = CASES[case]
  c = default_config()
  c.model.update(image_size=size, channels=channels, latent_dim=latent, width=width,
                 hidden=hidden, dtype=dtype)
  c.train.update(batch_size=batch)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  return Family(c, None), {"images": images.astype(np.float32)}


def bench(case: str, steps: int, dtype: str = "float32", torch: bool = False,
          mesh: dict | None = None) -> dict:
  size, channels, latent, width, hidden, batch = CASES[case]
  family, host_batch = family_and_batch(case, dtype)
  measured = measure_step(family, host_batch, "loss", steps, mesh=mesh)
  torch_fn = None
  if torch:
    from benchmarks.torch_vae import time_step
    torch_fn = functools.partial(time_step, size, channels, latent, width, hidden, batch,
                                 steps)
  return step_row("vae", case, f"{size}x{size}x{channels} latent {latent} width {width}",
                  dtype, batch, measured, model_flops(measured), torch_fn)
