"""The classic DCGAN of the TensorFlow tutorial "Deep Convolutional Generative Adversarial
Network" (tensorflow.org/tutorials/generative/dcgan), translated layer for layer to eager
PyTorch, as the quality peer of `benchmarks.gan_quality`. Needs `torch` (the `crosscheck`
or `bench` extra).

The translation keeps Keras' defaults where PyTorch's differ: LeakyReLU slope 0.3,
BatchNormalization momentum 0.99 (PyTorch momentum 0.01) and epsilon 1e-3, Glorot-uniform
kernels and zero biases. 'same' padding: a 5x5 stride-2 convolution pads 2 on each side
(TF pads 1 before and 2 after; the output size, 14 then 7, is the same); a 5x5 stride-2
transposed convolution pads 2 with output_padding 1 (7 -> 14 -> 28, as in TF).

One departure from the tutorial, as the peer measured in the GAN-quality issue: Adam with
lr 2e-4 and betas (0.5, 0.999) for both networks (the tutorial: 1e-4 and Keras' 0.9), and
one step is a D update on a real batch and fresh fakes, then a G update on fresh noise
(the tutorial updates both from one forward pass).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

Z_DIM = 100
LEAKY_SLOPE = 0.3  # Keras' LeakyReLU() default alpha
BN_MOMENTUM = 0.01  # Keras' momentum 0.99: running = 0.99 * running + 0.01 * batch
BN_EPS = 1e-3  # Keras' default
DROPOUT = 0.3
LR, BETAS = 2e-4, (0.5, 0.999)
BATCH_SIZE = 64


def build(z_dim: int = Z_DIM):
  """(G, D): G maps z [B, z_dim] to images [B, 1, 28, 28] in [-1, 1]; D maps images to
  logits [B, 1]. Kernels Glorot-uniform, biases zero (Keras' initializers)."""
  import torch.nn as nn

  def bn(n, dims=2):
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(n, eps=BN_EPS, momentum=BN_MOMENTUM)

  g = nn.Sequential(
      nn.Linear(z_dim, 7 * 7 * 256, bias=False), bn(7 * 7 * 256, dims=1),
      nn.LeakyReLU(LEAKY_SLOPE),
      # Keras reshapes [B, 7*7*256] to [B, 7, 7, 256] (channels last); this is the same
      # layer in channels-first order, so one flat unit still feeds one (y, x, channel).
      nn.Unflatten(1, (256, 7, 7)),
      nn.ConvTranspose2d(256, 128, 5, stride=1, padding=2, bias=False), bn(128),
      nn.LeakyReLU(LEAKY_SLOPE),
      nn.ConvTranspose2d(128, 64, 5, stride=2, padding=2, output_padding=1, bias=False),
      bn(64), nn.LeakyReLU(LEAKY_SLOPE),
      nn.ConvTranspose2d(64, 1, 5, stride=2, padding=2, output_padding=1, bias=False),
      nn.Tanh())
  d = nn.Sequential(
      nn.Conv2d(1, 64, 5, stride=2, padding=2), nn.LeakyReLU(LEAKY_SLOPE), nn.Dropout(DROPOUT),
      nn.Conv2d(64, 128, 5, stride=2, padding=2), nn.LeakyReLU(LEAKY_SLOPE),
      nn.Dropout(DROPOUT),
      nn.Flatten(), nn.Linear(7 * 7 * 128, 1))
  for module in [*g.modules(), *d.modules()]:
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
      nn.init.xavier_uniform_(module.weight)  # fan_in + fan_out as Keras' glorot_uniform
      if module.bias is not None:
        nn.init.zeros_(module.bias)
  return g, d


def param_count(module) -> int:
  """Trainable parameters (BatchNorm's running statistics are buffers, not counted)."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


def to_pixels(images_u8: np.ndarray):
  """uint8 [N, 28, 28, 1] -> float32 tensor [N, 1, 28, 28] in [-1, 1]."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2)
  return x.float().div(127.5).sub(1.0).contiguous()


def to_uint8(images) -> np.ndarray:
  """Tensor [N, 1, H, W] in [-1, 1] -> uint8 [N, H, W, 1] = round((x + 1) * 127.5)."""
  x = images.detach().permute(0, 2, 3, 1).cpu().numpy()
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def generate(g, num: int, seed: int, z_dim: int = Z_DIM, chunk: int = 500) -> np.ndarray:
  """uint8 [num, 28, 28, 1] from G in evaluation mode (BatchNorm's running statistics,
  as Keras' `training=False`), from noise fixed by `seed`; G's mode is restored."""
  import torch
  z = torch.randn(num, z_dim, generator=torch.Generator().manual_seed(seed))
  was_training = g.training
  g.eval()
  try:
    with torch.no_grad():
      return np.concatenate([to_uint8(g(z[i:i + chunk])) for i in range(0, num, chunk)])
  finally:
    g.train(was_training)


def train(images_u8: np.ndarray, steps: int, seed: int, eval_steps: list[int],
          on_eval: Callable | None = None, *, batch_size: int = BATCH_SIZE,
          z_dim: int = Z_DIM, threads: int | None = None) -> dict:
  """Trains the classic DCGAN for `steps` steps on uint8 images [N, 28, 28, 1] (batches of
  `batch_size` from a new permutation each epoch, the last partial batch dropped).

  After step s in `eval_steps` (s counts finished steps, 1..steps) calls on_eval(s, G)
  with G as it trains (use `generate` for evaluation-mode samples); the time it takes is
  not training time. Returns {"eval_steps", "train_seconds" (cumulative training wall time
  at each of them), "d_loss", "g_loss" (per step), "g", "d"}."""
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(seed)
  g, d = build(z_dim)
  g.train()
  d.train()
  opt_g = torch.optim.Adam(g.parameters(), lr=LR, betas=BETAS)
  opt_d = torch.optim.Adam(d.parameters(), lr=LR, betas=BETAS)
  data = to_pixels(images_u8)
  n = len(data)
  batch_size = min(batch_size, n)
  batches_per_epoch = n // batch_size
  shuffle = torch.Generator().manual_seed(seed)
  wanted = sorted({int(s) for s in eval_steps if 1 <= int(s) <= steps})

  d_losses, g_losses, seconds, done = [], [], [], []
  order, position = None, batches_per_epoch
  elapsed, start = 0.0, time.perf_counter()
  for step in range(1, steps + 1):
    if position == batches_per_epoch:  # a new epoch: a new permutation
      order, position = torch.randperm(n, generator=shuffle), 0
    real = data[order[position * batch_size:(position + 1) * batch_size]]
    position += 1

    # D: real batch against fresh fakes (non-saturating BCE with logits; real + fake).
    with torch.no_grad():
      fake = g(torch.randn(batch_size, z_dim))
    real_logits, fake_logits = d(real), d(fake)
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    # G: fresh noise, labelled real.
    fake_logits = d(g(torch.randn(batch_size, z_dim)))
    g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()

    d_losses.append(float(d_loss.detach()))
    g_losses.append(float(g_loss.detach()))
    if len(done) < len(wanted) and step == wanted[len(done)]:
      elapsed += time.perf_counter() - start
      seconds.append(elapsed)
      done.append(step)
      if on_eval is not None:
        on_eval(step, g)
      g.train()
      d.train()
      start = time.perf_counter()
  return {"eval_steps": done, "train_seconds": seconds, "d_loss": d_losses,
          "g_loss": g_losses, "g": g, "d": d}
