"""What a model family provides to the shared training loop, and how the loop finds one.

A family is a module (ours in `aigc_jax.families`, or any importable module of another
package) with three names:

  default_config() -> ml_collections.ConfigDict   every key a run config may set; its
                                                  `family` key names the family
  validate(config) -> None                        raises UserError naming a bad field
  Family(config, workdir)                         an object following `Family` below

A config's `family` is a dotted module path (`my_package.my_family`) or a registered
name: an entry point in the group `aigc_jax.families` (ours: `lm`, `gan`, `vae`,
`finetune`, declared in pyproject.toml; another package registers its own names the same
way). A family outside this package trains with our loop, CLI and checkpoints unchanged.
Code may also hand the loop the module itself
(`train_and_evaluate(config, workdir, family=module)`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import jax

from aigc_jax.errors import UserError, did_you_mean
from aigc_jax.train.state import TrainState

Batch = Any  # a pytree of host numpy arrays with a leading batch axis
ENTRY_POINT_GROUP = "aigc_jax.families"
# A registered name with no installed metadata (a source checkout on PYTHONPATH) is looked
# up as a module of this package.
BUILTIN_PACKAGE = "aigc_jax.families"
MODULE_NAMES = ("default_config", "validate", "Family")


@runtime_checkable
class BatchSource(Protocol):
  """Seeded batches whose position is a small JSON-able dict, so a resumed run sees the
  batches an uninterrupted one would."""

  next_index: int

  def __next__(self) -> Batch:
    """The next batch: a pytree of host arrays with a leading batch axis."""

  def get_state(self) -> dict:
    """The position (JSON-able) that `set_state` restores."""

  def set_state(self, state: dict) -> None:
    """Moves to a position `get_state` returned."""


@runtime_checkable
class Family(Protocol):
  """A family bound to one run config. Optional extras the loop and CLI use when present:
  `load_weights(state) -> state` (pretrained weights after init, as data) and
  `export(state, out, dtype) -> str` (`aigc-jax export`)."""

  name: str
  train_data: BatchSource
  items_per_step: dict[str, int]  # e.g. {"tokens": B * T}: throughput units per step
  plot_keys: tuple[str, ...]  # metrics shown in the progress bar and plotted

  def init_state(self, rng: jax.Array) -> TrainState:
    """Pure; the loop runs it under `jax.jit` with the state's shardings."""

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """Pure; compiled once, state donated. Metrics are scalars."""

  def eval_batches(self) -> list[Batch]:
    """The held-out batches, the same at every evaluation."""

  def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Pure; returns sums that the loop adds up over all eval batches."""

  def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
    """The added-up sums (host floats) -> the reported metrics (e.g. means)."""

  def sample_metrics(self, state: TrainState) -> dict[str, float]:
    """Metrics of generated samples (e.g. FID) added to every evaluation; {} if none."""

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    """Writes samples (text, images) under workdir/samples; returns the paths."""

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: makes samples from the CLI's options (None: config defaults);
    returns what to print."""


def registered_families() -> dict[str, str]:
  """{name: module path} of the families registered as entry points."""
  points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
  return {point.name: point.value for point in points}


def family_module_path(family: str) -> str:
  """The module a config's `family` names, without importing it: a registered name's
  entry point, else a module of `aigc_jax.families`, else a top-level module; a dotted
  path as it is. Raises UserError for anything else."""
  if (not isinstance(family, str) or not family or family.startswith(".")
      or family.endswith(".") or ".." in family):
    raise UserError(f"config 'family' must be a family name or a dotted module path, got "
                    f"{family!r}")
  if "." in family:
    return family
  registered = registered_families()
  if family in registered:
    return registered[family]
  for path in (f"{BUILTIN_PACKAGE}.{family}", family):  # a source checkout; a plain module
    if importlib.util.find_spec(path) is not None:
      return path
  names = sorted(registered)
  raise UserError(f"unknown family {family!r}{did_you_mean(family, names)}: choose one of "
                  f"{names} or give a dotted module path (my_package.my_family)")


def load_family(family: str | ModuleType) -> ModuleType:
  """The family module for a config's `family` value (see `family_module_path`) or the
  module itself, checked to provide the family's names; raises UserError naming the
  problem."""
  if isinstance(family, ModuleType):
    module = family
  else:
    path = family_module_path(family)
    try:
      module = importlib.import_module(path)
    except ModuleNotFoundError as e:
      if e.name is None or not (path == e.name or path.startswith(e.name + ".")):
        raise  # the module exists but one of its own imports failed: a bug, not a path
      raise UserError(f"config 'family' {family!r}: no module {e.name!r} can be imported; "
                      "check the dotted path and that its package is on PYTHONPATH") from e
  missing = [name for name in MODULE_NAMES if not callable(getattr(module, name, None))]
  if missing:
    raise UserError(f"module {module.__name__!r} is not a model family: it lacks "
                    f"{', '.join(missing)} (see aigc_jax.train.family)")
  return module
