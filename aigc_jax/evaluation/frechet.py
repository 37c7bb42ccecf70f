"""The Fréchet distance between two Gaussians fitted to feature sets (the formula of FID).

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), where
tr((S1 S2)^1/2) = sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (a symmetric
PSD matrix, so no complex-valued matrix square root is needed).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianStats:
  """Mean [D] and covariance [D, D] of a feature set, and its size."""

  mean: np.ndarray
  cov: np.ndarray
  count: int


def feature_stats(features_ND: np.ndarray) -> GaussianStats:
  """Mean and unbiased covariance of features [N, D] (float64)."""
  f = np.asarray(features_ND, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
  return GaussianStats(f.mean(0), np.cov(f, rowvar=False), f.shape[0])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
  """Squared Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov); >= 0,
  symmetric, 0 for identical statistics."""
  if a.mean.shape != b.mean.shape:
    raise ValueError(f"feature sizes differ: {a.mean.shape} vs {b.mean.shape}")
  root_a = _sqrt_psd(a.cov)
  inner = root_a @ b.cov @ root_a
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  d2 = np.sum((a.mean - b.mean) ** 2) + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt
  return float(max(d2, 0.0))
