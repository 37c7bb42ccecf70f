"""Model families on the shared training loop. A family module provides
`default_config()`, `validate(config)` and a `Family` class (see `aigc_jax.train.family`)."""

from __future__ import annotations

import importlib

from aigc_jax.errors import UserError, did_you_mean

_MODULES = {"lm": "aigc_jax.families.lm", "gan": "aigc_jax.families.gan",
            "vae": "aigc_jax.families.vae", "finetune": "aigc_jax.families.finetune"}


def get_family_module(name: str):
  if name not in _MODULES:
    raise UserError(f"unknown family {name!r}{did_you_mean(name, _MODULES)}: "
                    f"choose one of {sorted(_MODULES)}")
  return importlib.import_module(_MODULES[name])


def family_names() -> list[str]:
  return sorted(_MODULES)
