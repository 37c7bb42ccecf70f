"""The U-Net of aigc_jax.models.unet in eager PyTorch (same levels, widths, ADM scale-shift
residual blocks, self-attention, nearest-neighbour up-sampling, label embedding) trained
with EDM's preconditioned loss, gradient clipping, AdamW and an EMA of the weights: the
reference for step-time comparisons. Needs `torch` (the `bench` extra)."""

from __future__ import annotations

import copy
import math

from benchmarks.torch_timing import time_eager


def build(cfg):
  """The U-Net for a `UNetConfig`-like `cfg` (a run config's `model` section)."""
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  width, mults, groups = cfg.width, tuple(cfg.channel_mults), None
  chans = [width * m for m in mults]
  groups = min(cfg.groups, min(chans))
  emb_dim, features = 4 * width, 2 * max(1, width // 2)

  class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
      super().__init__()
      self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
      self.emb = nn.Linear(emb_dim, 2 * c_out)
      self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
      self.drop = nn.Dropout(cfg.dropout)
      self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
      h = self.conv1(F.silu(self.norm1(x)))
      scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
      h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
      return self.skip(x) + h

  class Attention(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.heads = max(1, c // cfg.head_dim)
      self.norm = nn.GroupNorm(groups, c)
      self.qkv, self.out = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
      B, C, H, W = x.shape
      h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
      q, k, v = (t.reshape(B, H * W, self.heads, -1).transpose(1, 2)
                 for t in self.qkv(h).chunk(3, dim=-1))
      a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
      return x + self.out(a).transpose(1, 2).reshape(B, C, H, W)

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.time = nn.Sequential(nn.Linear(features, emb_dim), nn.SiLU(),
                                nn.Linear(emb_dim, emb_dim))
      self.label = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
      self.conv_in = nn.Conv2d(cfg.channels, width, 3, padding=1)
      attn = lambda i, c: Attention(c) if i in cfg.attention_levels else nn.Identity()
      skips, c = [width], width
      self.down = nn.ModuleList()
      for i, c_out in enumerate(chans):
        for _ in range(cfg.blocks_per_level):
          self.down.append(nn.ModuleList([ResBlock(c, c_out), attn(i, c_out)]))
          c = c_out
          skips.append(c)
        if i < len(chans) - 1:
          self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
          skips.append(c)
      self.mid = nn.ModuleList([ResBlock(c, c), Attention(c), ResBlock(c, c)])
      self.up = nn.ModuleList()
      for i in reversed(range(len(chans))):
        for _ in range(cfg.blocks_per_level + 1):
          self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), chans[i]),
                                        attn(i, chans[i])]))
          c = chans[i]
        if i:
          self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                       nn.Conv2d(c, c, 3, padding=1)))
      self.out = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(),
                               nn.Conv2d(c, cfg.channels, 3, padding=1))

    def forward(self, x, noise, labels):
      half = features // 2
      freqs = torch.exp(-math.log(10_000.0) * torch.arange(half) / max(half - 1, 1))
      angles = noise[:, None] * freqs[None]
      emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
      if self.label is not None:
        emb = emb + self.label(labels)
      emb = F.silu(emb)
      h = self.conv_in(x)
      skips = [h]
      for layer in self.down:
        if isinstance(layer, nn.ModuleList):
          h = layer[1](layer[0](h, emb))
        else:
          h = layer(h)
        skips.append(h)
      h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
      for layer in self.up:
        if isinstance(layer, nn.ModuleList):
          h = layer[1](layer[0](torch.cat([h, skips.pop()], dim=1), emb))
        else:
          h = layer(h)
      return self.out(h)

  return UNet()


def time_step(config, batch=64, steps=20, warmup=3) -> dict:
  """Median seconds of one eager float32 training step of the run config's U-Net: EDM's
  loss (log-normal sigma, preconditioning, weighting) with label dropout, backward,
  gradient clipping, AdamW, and the EMA update."""
  import torch

  torch.manual_seed(0)
  m, loss_cfg, optim = config.model, config.loss, config.optim
  net = build(m)
  ema = copy.deepcopy(net).requires_grad_(False)
  opt = torch.optim.AdamW(net.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                          eps=optim.eps, weight_decay=optim.weight_decay)
  images = torch.rand(batch, m.channels, m.image_size, m.image_size) * 2 - 1
  labels = torch.arange(batch) % max(m.num_classes, 1)
  sd = loss_cfg.sigma_data

  def step():
    sigma = torch.exp(loss_cfg.p_mean + loss_cfg.p_std * torch.randn(batch))
    s = sigma[:, None, None, None]
    y = labels
    if m.num_classes:
      y = torch.where(torch.rand(batch) < loss_cfg.label_dropout, m.num_classes, labels)
    noisy = images + s * torch.randn_like(images)
    total = s ** 2 + sd ** 2
    out = net(noisy / total.sqrt(), 250 * torch.log(sigma), y)
    denoised = sd ** 2 / total * noisy + s * sd / total.sqrt() * out
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    loss = (weight * ((denoised - images) ** 2).mean((1, 2, 3))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), optim.grad_clip)
    opt.step()
    with torch.no_grad():
      for e, p in zip(ema.parameters(), net.parameters(), strict=True):
        e.lerp_(p, 1 - loss_cfg.ema_decay)
    return loss

  return time_eager(step, steps, warmup)


if __name__ == "__main__":
  from aigc_jax.config import load_config_file
  print(time_step(load_config_file("configs/diffusion_fashion_mnist.py")))
