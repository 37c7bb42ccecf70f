"""Timing an eager PyTorch training step, shared by the PyTorch reference benchmarks."""

from __future__ import annotations

import math
import time

import numpy as np


def time_eager(step, steps: int, warmup: int) -> dict:
  """Median and min seconds of `steps` calls of step() (which returns the loss tensor)
  after `warmup` untimed calls; eager PyTorch runs synchronously on CPU."""
  import torch

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  if not math.isfinite(loss.item()):
    raise FloatingPointError(f"the PyTorch reference step's loss is {loss.item()}")
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)),
          "threads": torch.get_num_threads(), "torch": torch.__version__}
