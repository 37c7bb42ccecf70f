"""`aigc-jax sample` for the image families (GAN, VAE): the options they take and where
their PNGs go."""

from __future__ import annotations

import os

import numpy as np

from aigc_jax.data import images as image_data
from aigc_jax.errors import UserError

CLI_SAMPLE_OPTIONS = ("num", "seed", "out")  # the CLI refuses the text-only ones


def sample_count(options: dict, default: int) -> int:
  """--num (None: the run config's sample.num), at least 1."""
  num = options.get("num")
  if num is None:
    if default < 1:
      raise UserError(f"the run's sample.num is {default}: pass --num N (N >= 1)")
    return default
  if num < 1:
    raise UserError(f"--num must be at least 1, got {num}")
  return num


def sample_seed(options: dict) -> int:
  """--seed (None: 0)."""
  return 0 if options.get("seed") is None else options["seed"]


def sample_path(out: str | None, workdir: str, name: str) -> str:
  """The PNG to write: --out, else WORKDIR/samples/NAME (a run the user may only read:
  the error says to pass --out)."""
  if out is not None:
    if not out.lower().endswith(".png"):
      raise UserError(f"--out must name a .png file, got {out!r}: e.g. --out samples.png")
    return out
  out_dir = os.path.join(workdir, "samples")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot write {out_dir} ({e.strerror or e}): pass --out PATH") from e
  return os.path.join(out_dir, name)


def write_sample_grid(images: np.ndarray, path: str, is_out: bool,
                      cols: int | None = None) -> str:
  """image_data.write_grid (atomic) with an OSError as one UserError (`is_out`: `path` is
  the user's --out, else a file in WORKDIR/samples)."""
  directory = os.path.dirname(path) or "."
  try:
    os.makedirs(directory, exist_ok=True)
    return image_data.write_grid(images, path, cols=cols)
  except OSError as e:
    where, fix = (f"--out {path}", "pass a writable --out PATH") if is_out else (
        directory, "pass --out PATH")
    raise UserError(f"cannot write {where} ({e.strerror or e}): {fix}") from e
