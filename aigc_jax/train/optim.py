"""Optax optimizers built from the `optim` config section."""

from __future__ import annotations

import jax
import optax

from aigc_jax.config import require_finite_range

# The range of every optimizer setting any family's `optim` section holds (lo, hi, and
# keyword arguments of `config.require_finite_range`). The GAN's g_lr and d_lr are its
# generator's and discriminator's learning rates.
OPTIM_RANGES = {
    "lr": (0, None, dict(lo_open=True)),
    "g_lr": (0, None, dict(lo_open=True)),
    "d_lr": (0, None, dict(lo_open=True)),
    "b1": (0, 1, dict(hi_open=True)),
    "b2": (0, 1, dict(hi_open=True)),
    # At least float32's smallest normal number: XLA flushes subnormals to zero, and a
    # zero eps divides zero by zero for a parameter with no gradient yet.
    "eps": (1.2e-38, None, {}),
    "weight_decay": (0, None, {}),
    "grad_clip": (0, None, {}),  # 0: no clipping
    "warmup_steps": (0, None, dict(integer=True)),
    "min_lr_ratio": (0, 1, {}),
}


def validate_optim(cfg, section: str = "optim") -> None:
  """One UserError naming the field and its range for the first setting of `cfg[section]`
  outside it (NaN and infinities included); settings not in `OPTIM_RANGES` (a family's
  own) are left to the family."""
  for key in cfg[section].keys():
    if key in OPTIM_RANGES:
      lo, hi, kw = OPTIM_RANGES[key]
      require_finite_range(cfg, f"{section}.{key}", lo, hi, **kw)


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(optim_cfg.lr), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=float(optim_cfg.lr) * float(optim_cfg.min_lr_ratio))


def _decay_mask(params):
  # Weight decay on matrices only; norm scales (vectors) are left alone.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW with the warmup-cosine schedule."""
  schedule = lr_schedule(optim_cfg, total_steps)
  chain = []
  if optim_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
  # float(): a config from JSON may hold an int where a float is meant (JAX would read a
  # large one as an int32 and overflow).
  chain.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
                           eps=float(optim_cfg.eps),
                           weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask))
  return optax.chain(*chain), schedule
