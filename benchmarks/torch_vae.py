"""The conv VAE of aigc_jax.models.vae in eager PyTorch (same layers and widths, GELU,
Bernoulli likelihood with dynamic binarization, analytic KL, Adam), as the reference for
step-time comparisons. Needs `torch` (the `bench` extra)."""

from __future__ import annotations

from benchmarks.torch_timing import time_eager


def build(image_size: int, channels: int, latent_dim: int, width: int, hidden: int):
  import torch.nn as nn

  from aigc_jax.models.gan import upsampling_plan

  base, k = upsampling_plan(image_size)
  enc_widths = [channels] + [width * 2 ** i for i in range(k)]
  encoder = []
  for i in range(k):
    encoder += [nn.Conv2d(enc_widths[i], enc_widths[i + 1], 4, 2, 1), nn.GELU()]
  encoder += [nn.Flatten(), nn.Linear(base * base * enc_widths[-1], hidden), nn.GELU(),
              nn.Linear(hidden, 2 * latent_dim)]
  dec_widths = [width * 2 ** (k - 1 - i) for i in range(k)] + [channels]
  decoder = [nn.Linear(latent_dim, hidden), nn.GELU(),
             nn.Linear(hidden, base * base * dec_widths[0]),
             nn.Unflatten(1, (dec_widths[0], base, base))]
  for i in range(k):
    decoder += [nn.GELU(), nn.ConvTranspose2d(dec_widths[i], dec_widths[i + 1], 4, 2, 1)]
  return nn.Sequential(*encoder), nn.Sequential(*decoder)


def time_step(image_size=28, channels=1, latent_dim=20, width=32, hidden=512, batch=128,
              steps=20, warmup=5) -> dict:
  """Median seconds of one eager float32 ELBO step (binarize, encode, reparameterize,
  decode, Bernoulli log-likelihood + KL, backward, Adam)."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  encoder, decoder = build(image_size, channels, latent_dim, width, hidden)
  opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
  images = torch.rand(batch, channels, image_size, image_size)

  def step():
    x = torch.bernoulli(images)
    mean, logvar = encoder(x * 2 - 1).chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    log_px = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum((1, 2, 3))
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(1)
    loss = (kl - log_px).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return time_eager(step, steps, warmup)


if __name__ == "__main__":
  print(time_step())
