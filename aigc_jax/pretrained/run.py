"""A language model trained by this library as the pretrained model of a fine-tuning run
(`pretrained.format='run'`, `pretrained.path` = the LM run's workdir): its config, its
newest checkpoint's parameters and its own tokenizer (byte, BPE or ABC).

The run is opened read-only (`open_run(for_training=False)`: nothing is written into it),
onto a mesh for reading; its parameters stay device arrays (no copy to the host).
"""

from __future__ import annotations

import dataclasses
import os

from aigc_jax.errors import UserError


def load_run(path: str, **overrides):
  """(Transformer with the run's newest checkpointed parameters, the run's tokenizer).
  `overrides`: TransformerConfig fields for the fine-tuning run (dtype, attention, remat,
  dropout, max_seq_len, ...)."""
  from aigc_jax import config as config_lib
  from aigc_jax.pretrained.llama import build_model
  from aigc_jax.train import open_run

  if not path:
    raise UserError("pretrained.format='run' needs pretrained.path: the workdir of a "
                    "language-model run trained with aigc-jax train")
  workdir = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(workdir):
    raise UserError(f"pretrained.path {path!r} is not a folder: give the workdir of a "
                    "language-model run (aigc-jax train --config configs/... --workdir DIR)")
  config = config_lib.load_config(workdir)
  if config.family != "lm":
    raise UserError(f"pretrained.path {path!r} is a {config.family!r} run: fine-tuning "
                    "starts from a language-model run (family 'lm')")
  run = open_run(config, workdir, for_training=False)
  cfg = run.family.model_cfg
  # The context it was trained with stays the model's own (an export names it).
  cfg = dataclasses.replace(cfg, pretrained_max_seq_len=cfg.max_seq_len)
  model = build_model(cfg, run.state.params, f"the run in {path!r} (step {int(run.state.step)})",
                      **overrides)
  return model, run.family.tokenizer
