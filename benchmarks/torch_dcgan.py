"""The DCGAN of aigc_jax.models.gan in eager PyTorch (same layers, widths, batch norm in G,
non-saturating loss, Adam with beta1 = 0.5), as the reference for step-time comparisons.
Needs `torch` (the `bench` extra)."""

from __future__ import annotations

from benchmarks.torch_timing import time_eager


def build(image_size: int, channels: int, z_dim: int, width: int, depth: int = 0):
  import torch.nn as nn

  from aigc_jax.models.gan import upsampling_plan

  base, k = upsampling_plan(image_size)
  g_widths = [width * 2 ** (k - 1 - i) for i in range(k)] + [channels]
  g_layers = [nn.Linear(z_dim, base * base * g_widths[0]),
              nn.Unflatten(1, (g_widths[0], base, base))]
  for i in range(k):
    g_layers += [nn.BatchNorm2d(g_widths[i], momentum=0.1), nn.ReLU()]
    for _ in range(depth):
      g_layers += [nn.Conv2d(g_widths[i], g_widths[i], 3, 1, 1),
                   nn.BatchNorm2d(g_widths[i], momentum=0.1), nn.ReLU()]
    g_layers.append(nn.ConvTranspose2d(g_widths[i], g_widths[i + 1], 4, 2, 1))
  g_layers.append(nn.Tanh())
  d_widths = [channels] + [width * 2 ** i for i in range(k)]
  d_layers = []
  for i in range(k):
    d_layers += [nn.Conv2d(d_widths[i], d_widths[i + 1], 4, 2, 1), nn.LeakyReLU(0.2)]
    for _ in range(depth):
      d_layers += [nn.Conv2d(d_widths[i + 1], d_widths[i + 1], 3, 1, 1), nn.LeakyReLU(0.2)]
  d_layers += [nn.Flatten(), nn.Linear(base * base * d_widths[-1], 1)]
  return nn.Sequential(*g_layers), nn.Sequential(*d_layers)


def time_step(image_size=28, channels=1, z_dim=64, width=64, batch=64, steps=20,
              warmup=5, depth=0) -> dict:
  """Median seconds of one eager float32 adversarial step: a D update on real and fresh
  fake images, then a G update."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  g, d = build(image_size, channels, z_dim, width, depth)
  opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
  real = torch.rand(batch, channels, image_size, image_size) * 2 - 1

  def step():
    fake = g(torch.randn(batch, z_dim)).detach()
    d_loss = F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    g_loss = F.softplus(-d(g(torch.randn(batch, z_dim)))).mean()
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return g_loss

  return time_eager(step, steps, warmup)


if __name__ == "__main__":
  print(time_step())
