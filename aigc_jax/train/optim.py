"""Optax optimizers built from the `optim` config section."""

from __future__ import annotations

import jax
import optax


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def _decay_mask(params):
  # Weight decay on matrices only; norm scales (vectors) are left alone.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping then AdamW with the warmup-cosine schedule."""
  schedule = lr_schedule(optim_cfg, total_steps)
  chain = []
  if optim_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*chain), schedule
