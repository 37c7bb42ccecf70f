"""Shared training machinery: state, optimizers, steps, mesh, checkpoints, the loop."""

from aigc_jax.train.checkpoint import Checkpointer
from aigc_jax.train.loop import open_run, train
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_supervised_step

__all__ = ["Checkpointer", "TrainState", "make_supervised_step", "open_run", "train"]
