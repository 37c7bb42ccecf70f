"""High-frequency energy of images: the checkerboard texture that strided transposed
convolutions leave shows up as spectral power at the frequencies of its period, which
FID barely sees.

`periodic_energy(images, period)` is the share of an image's spectral power (its mean
removed) at the frequencies of a pattern with that period along both axes (the lattice
of multiples of 1/period cycles per pixel), averaged over images and channels. Period 2 is
the Nyquist frequency (`nyquist_energy`: a pattern that alternates every pixel, left by
the last 2x up-convolution); period 4 holds it and the quarter frequencies (the texture
of the up-convolution before it, doubled in size). On real Fashion-MNIST images period 2
holds 0.08% of the power, and a +-8 grey-level checkerboard over them makes it 9.6x that
(+-16: 35x); period 4 holds 0.9%, and a +-8 board of 2x2 squares makes it 1.8x. The
ratio generated / real is the figure to watch (1: as the data).
"""

from __future__ import annotations

import numpy as np


def periodic_energy(images: np.ndarray, period: int, chunk: int = 2048) -> float:
  """images [N, H, W, C] (uint8 or float) -> the mean share of each image's AC power
  (per channel) at the frequencies (k/period, l/period) cycles per pixel (H and W
  divisible by `period`; 0.0 if the images are flat)."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  if period < 2:
    raise ValueError(f"period must be at least 2 pixels, got {period}")
  N, H, W, _ = images.shape
  if H % period or W % period:
    raise ValueError(f"a period of {period} pixels needs sides divisible by it, got {H}x{W}")
  on_lattice = np.zeros((H, W), bool)  # the frequencies of a pattern of that period
  on_lattice[::H // period, ::W // period] = True
  on_lattice[0, 0] = False  # the mean (removed anyway)
  shares = []
  for start in range(0, N, chunk):
    x = images[start:start + chunk].astype(np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)  # no DC: the share is of the texture
    power = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2  # [n, H, W, C]
    total = power.sum(axis=(1, 2))
    periodic = power[:, on_lattice].sum(axis=1)
    shares.append(np.where(total > 0, periodic / np.maximum(total, 1e-30), 0.0))
  return float(np.concatenate(shares).mean())


def nyquist_energy(images: np.ndarray, chunk: int = 2048) -> float:
  """images [N, H, W, C] -> the mean share of AC power at the Nyquist frequencies (H and W
  even): `periodic_energy(images, 2)`."""
  if np.ndim(images) == 4 and (np.shape(images)[1] % 2 or np.shape(images)[2] % 2):
    raise ValueError(f"the Nyquist frequency needs even sides, got "
                     f"{np.shape(images)[1]}x{np.shape(images)[2]}")
  return periodic_energy(images, 2, chunk)
