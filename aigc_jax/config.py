"""Run configs: checking them against a family's defaults, saving and loading them.

A run config is an `ml_collections.ConfigDict` from a Python file's `get_config()`. It is
checked once at start-up; every error names the field and the fix.
"""

from __future__ import annotations

import json
import os

import ml_collections

from aigc_jax.errors import UserError, did_you_mean
from aigc_jax.ranges import _finite, _is_number, describe_range, range_problem  # noqa: F401


def check_against_defaults(cfg, defaults, prefix: str = "") -> None:
  """Unknown keys (with a "did you mean") and values whose type differs from the default's."""
  for key in cfg.keys():
    field = f"{prefix}{key}"
    if key not in defaults:
      raise UserError(f"unknown config key '{field}'{did_you_mean(key, defaults.keys())}; "
                      f"known keys here: {', '.join(sorted(defaults.keys()))}")
    value, default = cfg[key], defaults[key]
    if isinstance(default, (dict, ml_collections.ConfigDict)):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise UserError(f"config '{field}' must be a section of keys, got {value!r}")
      check_against_defaults(value, default, field + ".")
    elif default is not None and value is not None and not _same_kind(value, default):
      raise UserError(f"config '{field}' must be of type {type(default).__name__}, got "
                      f"{value!r} ({type(value).__name__})")


def _same_kind(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (list, tuple)):  # JSON gives back lists
    return isinstance(value, (list, tuple))
  return isinstance(value, type(default))


def require(ok: bool, field: str, problem: str) -> None:
  """Raises UserError("config 'field' problem") unless ok."""
  if not ok:
    raise UserError(f"config '{field}' {problem}")


def require_positive(cfg, *fields: str) -> None:
  """Raises UserError unless every dotted `fields` value of `cfg` is a finite number > 0."""
  for field in fields:
    value = _get(cfg, field)
    require(_is_number(value) and _finite(value) and value > 0, field,
            f"must be positive (and finite), got {value!r}")


def require_finite_range(cfg, field: str, lo=None, hi=None, *, lo_open: bool = False,
                         hi_open: bool = False, integer: bool = False) -> None:
  """Raises UserError("config 'field' must be a finite number in [lo, hi), got nan") unless
  the dotted `field` of `cfg` is a finite number (an integer if `integer`) in the range."""
  problem = range_problem(_get(cfg, field), lo, hi, lo_open=lo_open, hi_open=hi_open,
                          integer=integer)
  require(problem is None, field, problem or "")


def _get(cfg, dotted: str):
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


def save_config(cfg, workdir: str) -> str:
  """Writes `cfg` as workdir/config.json atomically; returns the path."""
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


def load_config(workdir: str, family=None) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir; settings added to its family since the run
  was saved take their defaults (which keep the old behaviour). `family`: the family
  module (None: found from the saved config's `family`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"no config.json in {workdir!r}: is it the workdir of a training run? "
                    "(aigc-jax train --config ... --workdir DIR writes it)")
  with open(path) as f:
    saved = json.load(f)
  if isinstance(saved, dict) and isinstance(saved.get("family"), str):
    from aigc_jax.train.family import load_family
    module = load_family(saved["family"] if family is None else family)
    saved = _with_missing_keys(saved, module.default_config().to_dict())
  return ml_collections.ConfigDict(saved)


def _with_missing_keys(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_missing_keys(out[key], value)
  return out


def differing_fields(old, new, prefix: str = "") -> list[str]:
  """Dotted names of the fields whose values differ between two configs."""
  old, new = dict(old), dict(new)
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, (dict, ml_collections.ConfigDict)) and isinstance(
        b, (dict, ml_collections.ConfigDict)):
      out += differing_fields(a, b, f"{prefix}{key}.")
    elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b or [])):
      out.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return out


def config_from_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Calls get_config() of a Python config file; `overrides` maps dotted keys to values."""
  import importlib.util

  if not os.path.exists(path):
    raise UserError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("aigc_jax_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path!r} defines no get_config()")
  cfg = module.get_config()
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    section = cfg
    for p in parents:
      section = section[p]
    if leaf not in section:
      raise UserError(f"unknown config key '{dotted}'{did_you_mean(leaf, section.keys())}")
    section[leaf] = value
  return cfg
