"""Run configs: checking them against a family's defaults, saving and loading them.

A run config is an `ml_collections.ConfigDict` from a Python file's `get_config()`. It is
checked once at start-up; every error names the field and the fix.
"""

from __future__ import annotations

import json
import os
import sys

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
  from aigc_jax.files import write_text
  return write_text(os.path.join(workdir, "config.json"), cfg.to_json(indent=2, sort_keys=True))


def load_config(workdir: str, family=None) -> ml_collections.ConfigDict:
  """The config a run saved in its workdir; settings added to its family since the run
  was saved take their defaults (which keep the old behaviour). `family`: the family
  module (None: found from the saved config's `family`).

  A `config.json` that is missing or unreadable (truncated, hand-edited into invalid
  JSON) is replaced by the copy saved with the newest intact checkpoint, with a warning."""
  path = os.path.join(workdir, "config.json")
  saved, problem = _read_json(path)
  if problem is not None:
    copy = _checkpoint_config(workdir)
    if copy is None:
      if problem == "is missing":
        raise UserError(f"no config.json in {workdir!r}: is it the workdir of a training run? "
                        "(aigc-jax train --config ... --workdir DIR writes it)")
      raise UserError(f"{path} {problem}, and no checkpoint holds a copy of the run's config: "
                      "restore config.json from a backup; or, to train, delete it (the run "
                      "has nothing to resume) or use a new --workdir")
    saved, step = copy
    print(f"warning: {path} {problem}; using the copy of the config saved with the "
          f"checkpoint of step {step} (a training run writes config.json again)",
          file=sys.stderr)
  return complete_config(saved, family)


def complete_config(saved: dict, family=None) -> ml_collections.ConfigDict:
  """A saved config (a dict) with the settings its family added since, at their
  defaults. `family`: the family module (None: the one `saved['family']` names)."""
  if isinstance(saved, dict) and isinstance(saved.get("family"), str):
    from aigc_jax.train.family import load_family
    module = load_family(saved["family"] if family is None else family)
    saved = _with_missing_keys(saved, module.default_config().to_dict())
    if hasattr(module, "clear_unread_settings"):  # e.g. settings refused since it was saved
      saved = module.clear_unread_settings(saved)
  return ml_collections.ConfigDict(saved)


def _read_json(path: str) -> tuple[dict | None, str | None]:
  """(the JSON object in `path`, None), or (None, what is wrong with it)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    return None, "is missing"
  except OSError as e:
    return None, f"cannot be read ({e.strerror})"
  try:
    value = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    return None, f"is not valid JSON ({str(e).splitlines()[0]})"
  if not isinstance(value, dict) or not isinstance(value.get("family"), str):
    return None, "is not a run config (no 'family' key)"
  return value, None


def _checkpoint_config(workdir: str) -> tuple[dict, int] | None:
  """(config, step) saved with the newest intact checkpoint of the run, or None."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  from aigc_jax.train.checkpoint import Checkpointer
  return Checkpointer(directory, read_only=True).saved_config()


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
  """Calls get_config() of a Python config file (`load_config_file`); `overrides` maps
  dotted keys to values."""
  cfg = load_config_file(path, flag="config file")
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    section = cfg
    for p in parents:
      section = section[p]
    if leaf not in section:
      raise UserError(f"unknown config key '{dotted}'{did_you_mean(leaf, section.keys())}")
    section[leaf] = value
  return cfg


def _user_line(e: BaseException, path: str) -> int | None:
  """The line of the config file `path` where `e` was raised (or, for an error in a
  module it imports, the line that led there); None if not in that file."""
  path = os.path.realpath(path)
  if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == path:
    return e.lineno
  line, tb = None, e.__traceback__
  while tb is not None:
    if os.path.realpath(tb.tb_frame.f_code.co_filename) == path:
      line = tb.tb_lineno
    tb = tb.tb_next
  return line


def _describe(e: BaseException, path: str) -> str:
  """'NameError at line 2: name 'x' is not defined', on one line."""
  line = _user_line(e, path)
  message = " ".join((e.msg if isinstance(e, SyntaxError) else str(e)).split())
  return (type(e).__name__ + (f" at line {line}" if line else "")
          + (f": {message}" if message else ""))


def load_config_file(argument: str, flag: str = "--config") -> ml_collections.ConfigDict:
  """`FILE[:ARG]` (ml_collections' syntax): get_config([ARG]) of the Python file FILE as
  an ml_collections.ConfigDict (a plain dict is converted); else UserError naming FILE
  (given by `flag`), the problem and the fix: the file is missing, raises on import,
  defines no get_config, or get_config raises or returns something else."""
  import importlib.machinery
  import importlib.util

  path, arg = argument, []
  if ":" in argument and not os.path.exists(argument):
    path, *arg = argument.split(":", 1)
  where = f"cannot load {flag} {path}"
  try:
    with open(path, "rb"):  # a missing file, not an OSError raised by the file's own code
      pass
  except OSError as e:
    raise UserError(f"{where} ({e.strerror or e}): pass a readable config file, e.g. "
                    "--config configs/lm_tiny.py") from e
  # The module name ml_collections gives config files, so pickles and logs look the same.
  loader = importlib.machinery.SourceFileLoader("config_config", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  sys.modules[loader.name] = module
  try:
    loader.exec_module(module)
  except Exception as e:  # anything the user's file raises is the file's problem
    raise UserError(f"{where}: {_describe(e, path)}: fix the file") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UserError(f"{where}: it defines no get_config(): add `def get_config():` "
                    "returning an ml_collections.ConfigDict")
  try:
    config = get_config(*arg)
  except Exception as e:
    raise UserError(f"{where}: get_config() raised {_describe(e, path)}: fix "
                    "get_config()") from e
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    got = "None (no return statement?)" if config is None else type(config).__name__
    raise UserError(f"{where}: get_config() returned {got}, not a config: return an "
                    "ml_collections.ConfigDict")
  return config
