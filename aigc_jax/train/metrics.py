"""Run metrics: JSON lines (one record per step and split), TensorBoard events, plots."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np


class MetricsWriter:
  """Appends {"step", "split", **metrics} records to `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    """enabled=False: records are formed but not written (a run's other processes)."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._file = self._tb = None
    if not enabled:
      return
    self._file = open(self.path, "a")
    try:
      self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard events are optional; JSONL is the record
      pass

  def write(self, step: int, split: str, metrics: dict) -> dict:
    """Appends {"step", "split", **metrics} to metrics.jsonl (and TensorBoard); returns
    the record."""
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
    return record

  def close(self) -> None:
    """Closes the JSONL file and the TensorBoard writer."""
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer():
  """tensorboardX's SummaryWriter class, imported without importing PyTorch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors, which
  we never pass). That costs ~1.8 s at every start and loads PyTorch's own thread pools
  into a JAX process, so torch is hidden while tensorboardX loads unless the process
  already imported it."""
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return SummaryWriter


def _to_python(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl (a list of dicts; [] without a file)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, keys=("loss",), filename: str = "loss.png") -> str | None:
  """Plots each key per split against step into workdir/plots/filename."""
  records = read_metrics(workdir)
  if not records:
    return None
  # A Figure of its own, not pyplot: the host's matplotlib backend and figures stay as
  # they are.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5 * len(keys), 3.5))
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys, strict=True):
    by_split: dict[str, dict[int, float]] = {}
    for r in records:  # a resumed run may log a step twice: the later record wins
      metric = key if key in r else f"{r['split']}_{key}"
      if metric in r:
        by_split.setdefault(r["split"], {})[r["step"]] = r[metric]
    for split, points in sorted(by_split.items()):
      steps = sorted(points)
      ax.plot(steps, [points[s] for s in steps], marker="o" if split != "train" else None,
              label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if key.startswith("fid") and by_split:
      ax.set_yscale("log")  # FID falls over orders of magnitude
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  out = os.path.join(out_dir, filename)
  fig.savefig(out + ".tmp", dpi=100, format="png")
  os.replace(out + ".tmp", out)  # readers never see half a picture
  return out
