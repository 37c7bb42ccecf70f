"""What a model family provides to the shared training loop."""

from __future__ import annotations

from typing import Any, Protocol

import jax

from aigc_jax.train.state import TrainState

Batch = Any  # a pytree of host numpy arrays with a leading batch axis


class BatchSource(Protocol):
  """Seeded random-access batches; the position is a small JSON-able dict."""

  next_index: int

  def __next__(self) -> Batch: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class Family(Protocol):
  name: str
  train_data: BatchSource
  items_per_step: dict[str, int]  # e.g. {"tokens": B * T}: throughput units per step
  plot_keys: tuple[str, ...]

  def init_state(self, rng: jax.Array) -> TrainState:
    """Pure; the loop runs it under `jax.jit` with the state's shardings."""

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """Pure; compiled once, state donated."""

  def eval_batches(self) -> list[Batch]: ...

  def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Pure; returns sums that the loop adds up over all eval batches."""

  def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]: ...

  def sample_metrics(self, state: TrainState) -> dict[str, float]:
    """Metrics of generated samples (e.g. FID) added to every evaluation; {} if none."""

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    """Writes samples (text, images) under workdir/samples; returns the paths."""

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: makes samples from the CLI's options (None: config defaults);
    returns what to print."""
