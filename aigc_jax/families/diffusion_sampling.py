"""Sampling for the diffusion family: the compiled trajectory (Euler, Heun or DDIM over
the objective's noise levels, guidance, one jit per setting), fixed-noise sample grids
with one class per row, the denoising strip, and `aigc-jax sample`'s options.

A mixin of `aigc_jax.families.diffusion.Family`, which provides `config`, `net_cfg`,
`objective`, `graphdef`, `null_label` and `_network`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.data import images as image_data
from aigc_jax.errors import UserError
from aigc_jax.families import image_sampling
from aigc_jax.models import diffusion_samplers as samplers
from aigc_jax.nn.partitioning import constrain
from aigc_jax.train.state import TrainState


class DiffusionSampling:
  """Sample grids, trajectories and the CLI's sampler options of a diffusion family."""

  # --- sampling ---------------------------------------------------------------------
  SAMPLE_CHUNK = 500  # images per compiled sampler call, so memory stays bounded

  def sigmas(self, steps: int) -> np.ndarray:
    """The noise levels of a `steps`-step trajectory [steps + 1] (last 0): the
    objective's `sampling_sigmas` with sample.rho."""
    return self.objective.sampling_sigmas(steps, float(self.config.sample.rho))

  def _sample_fn(self, sampler: str, steps: int, eta: float, guidance: float,
                 trajectory: bool):
    """The jitted sampler for these settings, compiled once per family and settings."""
    key = (sampler, steps, eta, guidance, trajectory)
    cache = self.__dict__.setdefault("_sample_fns", {})
    if key not in cache:
      cache[key] = self._build_sample_fn(*key)
    return cache[key]

  def _build_sample_fn(self, sampler: str, steps: int, eta: float, guidance: float,
                       trajectory: bool):
    sigmas = self.sigmas(steps)

    def run(params, x_T, labels, key):
      model = nnx.merge(self.graphdef, params)
      denoise = functools.partial(self.objective.denoise, self._network(model))
      denoise = samplers.guided(denoise, labels, guidance, self.null_label)
      x_T = constrain(x_T, ("act_batch", None, None, None))
      x0, path = samplers.sample(denoise, x_T, sigmas, sampler, key, eta, trajectory)
      to_u8 = lambda x: jnp.round((x + 1) * 127.5).clip(0, 255).astype(jnp.uint8)
      return to_u8(x0), None if path is None else to_u8(path)

    return jax.jit(run)

  def sample_options(self, steps=None, sampler=None, eta=None, guidance=None) -> dict:
    """The sampler settings: the given ones, else the config's `sample` section."""
    s = self.config.sample
    return dict(sampler=s.sampler if sampler is None else sampler,
                steps=int(s.steps if steps is None else steps),
                eta=float(s.eta if eta is None else eta),
                guidance=float(s.guidance if guidance is None else guidance))

  def start_noise(self, num: int, seed: int) -> np.ndarray:
    """The unit-variance noise [num, H, W, C] a trajectory for `seed` starts from (times
    the objective's prior std); the seed's other key draws DDIM's noise."""
    k_start = jax.random.split(jax.random.PRNGKey(seed))[0]
    return np.asarray(jax.random.normal(k_start, (num, *self.net_cfg.image_shape)))

  def sample_images(self, params, num: int, seed: int, labels: np.ndarray | None = None,
                    trajectory: bool = False, **options) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 [num, H, W, C], the trajectory's denoised estimates uint8 [steps, num, H, W,
    C] or None) from `params` (the EMA weights) and fixed noise for `seed`; `labels` [num]
    for a conditional model (None: classes in turn, 0, 1, ...); `options`: see
    `sample_options`."""
    o = self.sample_options(**options)
    classes = self.net_cfg.num_classes
    if classes and labels is None:
      labels = np.arange(num) % classes
    k_steps = jax.random.split(jax.random.PRNGKey(seed))[1]
    prior = self.objective.prior_std(float(self.sigmas(o["steps"])[0]))
    x_T = self.start_noise(num, seed) * prior
    fn = self._sample_fn(o["sampler"], o["steps"], o["eta"], o["guidance"], trajectory)
    chunk = min(num, self.SAMPLE_CHUNK)
    images, paths = [], []
    for start in range(0, num, chunk):
      x = x_T[start:start + chunk]
      n = len(x)
      if n < chunk:  # pad, so one compilation serves every chunk
        x = np.concatenate([x, np.zeros((chunk - n, *x.shape[1:]), x.dtype)])
      y = None
      if classes:
        y = np.zeros(chunk, np.int32)
        y[:n] = labels[start:start + n]
      out, path = fn(params, x, y, jax.random.fold_in(k_steps, start))
      images.append(np.asarray(out)[:n])
      if trajectory:
        paths.append(np.asarray(path)[:, :n])
    return np.concatenate(images), (np.concatenate(paths, axis=1) if trajectory else None)

  def grid_labels(self, num: int) -> tuple[np.ndarray | None, int | None]:
    """(labels [num], columns) of a sample grid with one class per row: `num` // classes
    images of each class, in class order (an unconditional model: None, a square)."""
    classes = self.net_cfg.num_classes
    if not classes:
      return None, None
    if num < classes:
      return np.arange(num, dtype=np.int32), None
    per_row = num // classes
    labels = np.repeat(np.arange(classes), per_row)  # the remainder: classes in turn
    labels = np.concatenate([labels, np.arange(max(0, num - len(labels))) % classes])
    return labels[:num].astype(np.int32), per_row

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    """From the same fixed noise at every evaluation: a grid (a conditional model: one row
    per class) and a denoising strip (noise -> image) of 8 images."""
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    labels, cols = self.grid_labels(self.config.sample.num)
    images, _ = self.sample_images(state.extra["ema"], self.config.sample.num,
                                   self.config.seed, labels)
    paths = [image_data.write_grid(images, os.path.join(out_dir, f"step_{step:07d}.png"),
                                   cols=cols)]
    return paths + [self._write_trajectory(state.extra["ema"], os.path.join(
        out_dir, f"trajectory_step_{step:07d}.png"), self.config.seed)]

  def _write_trajectory(self, params, path: str, seed: int, **options) -> str:
    """8 rows: the starting noise, then the denoised estimate after each step."""
    images, estimates = self.sample_images(params, 8, seed, trajectory=True, **options)
    noise = self.start_noise(8, seed)  # unit variance: the start over its prior std
    noise_u8 = np.round((np.clip(noise, -1, 1) + 1) * 127.5).astype(np.uint8)
    strip = np.concatenate([noise_u8[None], estimates], axis=0)  # [steps + 1, 8, H, W, C]
    rows = np.swapaxes(strip, 0, 1).reshape(-1, *images.shape[1:])
    return image_data.write_grid(rows, path, cols=strip.shape[0])

  # --- aigc-jax sample --------------------------------------------------------------
  CLI_SAMPLE_OPTIONS = (*image_sampling.CLI_SAMPLE_OPTIONS, "steps", "guidance", "label",
                        "sampler", "eta")

  def check_sample_options(self, options: dict) -> dict:
    """The CLI's sampler options, checked (one UserError naming the flag)."""
    classes = self.net_cfg.num_classes
    label = options.get("label")
    if label is not None:
      if not classes:
        raise UserError("--class needs a class-conditional model; this run's "
                        "model.num_classes is 0")
      if not 0 <= label < classes:
        raise UserError(f"--class must be a class id in [0, {classes}), got {label}")
    guidance = options.get("guidance")
    if guidance is not None:
      if not classes:
        raise UserError("--guidance needs a class-conditional model; this run's "
                        "model.num_classes is 0: drop --guidance")
      if not (np.isfinite(guidance) and guidance >= 0):
        raise UserError(f"--guidance must be a finite number >= 0, got {guidance}")
      if guidance != 1.0 and self.config.loss.label_dropout == 0:
        raise UserError("--guidance needs a model trained with label dropout (this run's "
                        "loss.label_dropout is 0: its 'no label' prediction is untrained)")
    steps = options.get("steps")
    if steps is not None and steps < 1:
      raise UserError(f"--steps must be at least 1 (the number of sampling steps), got {steps}")
    sampler = options.get("sampler")
    if sampler is not None and sampler not in samplers.SAMPLERS:
      raise UserError(f"--sampler must be one of {samplers.SAMPLERS}, got {sampler!r}")
    eta = options.get("eta")
    if eta is not None:
      if (sampler or self.config.sample.sampler) != "ddim":
        raise UserError("--eta is DDIM's: add --sampler ddim")
      if not (np.isfinite(eta) and 0 <= eta <= 1):
        raise UserError(f"--eta must be in [0, 1], got {eta}")
    return self.sample_options(steps=steps, sampler=sampler, eta=eta, guidance=guidance)

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: a grid of `num` images as a PNG (--out, or WORKDIR/samples/); a
    conditional model draws one class per row, or only --class."""
    sampler_options = self.check_sample_options(options)
    num = image_sampling.sample_count(options, self.config.sample.num)
    seed, out = image_sampling.sample_seed(options), options.get("out")
    label = options.get("label")
    labels, cols = self.grid_labels(num)
    if label is not None:
      labels, cols = np.full(num, label, np.int32), None
    tag = f"{num}_seed{seed}" + ("" if label is None else f"_class{label}")
    path = image_sampling.sample_path(out, workdir, f"sample_{tag}.png")
    images, _ = self.sample_images(state.extra["ema"], num, seed, labels, **sampler_options)
    image_sampling.write_sample_grid(images, path, is_out=out is not None, cols=cols)
    o = sampler_options
    nfe = samplers.number_of_evaluations(o["sampler"], o["steps"])
    return (f"wrote {num} samples to {path} ({o['sampler']}, {o['steps']} steps, NFE {nfe}, "
            f"guidance {o['guidance']:g})")
