"""The non-finite / loss-spike guard: a bad update is never applied; `abort` stops the run
naming the step and the intact checkpoint, `skip` carries on and counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.train import Checkpointer, guard, train_and_evaluate
from aigc_jax.train.loop import open_run
from aigc_jax.train.state import TrainState


def _toy_step(state, batch):
  """params w += batch["delta"]; loss = batch["loss"] (so tests choose both)."""
  new = state.replace(step=state.step + 1, params={"w": state.params["w"] + batch["delta"]})
  return new, {"loss": batch["loss"], "grad_norm": jnp.abs(batch["delta"]).sum()}


def _toy_state():
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)},
                     opt_state={}, rng=jax.random.PRNGKey(0), extra={})
  return guard.init(state)


def _batch(loss, delta=1.0):
  return {"loss": jnp.float32(loss), "delta": jnp.full(3, delta, jnp.float32)}


def test_non_finite_updates_are_not_applied_and_are_counted():
  step = jax.jit(guard.guard_step(_toy_step))
  state, m = step(_toy_state(), _batch(1.0))
  assert int(m["skipped"]) == 0 and float(state.params["w"][0]) == 1.0
  for bad in (_batch(float("nan")), _batch(1.0, float("inf")), _batch(float("-inf"))):
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(m["skipped_spike"]) == 0
  np.testing.assert_array_equal(state.params["w"], np.ones(3))  # none of them applied
  assert int(state.step) == 4 and int(m["skipped_total"]) == 3
  # the loss statistics saw only the accepted loss
  assert float(state.extra["guard"]["loss_mean"]) == 1.0


def test_loss_spikes_beyond_k_sigma_are_skipped_after_the_window():
  step = jax.jit(guard.guard_step(_toy_step, spike_sigma=3.0, spike_window=10))
  state = _toy_state()
  rng = np.random.default_rng(0)
  state, m = step(state, _batch(50.0))  # a spike before the window fills: kept
  assert int(m["skipped"]) == 0
  for loss in 2.0 + 0.1 * rng.standard_normal(20):
    state, m = step(state, _batch(loss))
    assert int(m["skipped"]) == 0
  w = np.asarray(state.params["w"])
  state, m = step(state, _batch(50.0))
  assert int(m["skipped"]) == 1 and int(m["skipped_spike"]) == 1
  np.testing.assert_array_equal(state.params["w"], w)
  state, m = step(state, _batch(2.05))  # an ordinary loss is applied again
  assert int(m["skipped"]) == 0


def _diverging(tiny_config, policy):
  """The tiny LM with a learning rate that overflows the parameters within a few steps."""
  tiny_config.optim.update(lr=1e36, warmup_steps=0, grad_clip=0.0)
  tiny_config.train.update(steps=12, checkpoint_every=2, eval_every=6, log_every=1,
                           nan_policy=policy)
  return tiny_config


@pytest.mark.sharded
def test_abort_names_the_step_and_leaves_the_checkpoint_intact(tmp_path, tiny_config):
  with pytest.raises(guard.NonFiniteLoss, match=r"step \d+: the loss or gradients are not "
                     r"finite.*(intact|no checkpoint)") as error:
    train_and_evaluate(_diverging(tiny_config, "abort"), str(tmp_path), progress=False)
  steps = Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  assert all(s < error.value.step for s in steps)


@pytest.mark.sharded
def test_skip_finishes_with_finite_parameters_and_counts(tmp_path, tiny_config):
  train_and_evaluate(_diverging(tiny_config, "skip"), str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  last = [r for r in records if r["split"] == "train"][-1]
  assert last["step"] == 12 and last["skipped_total"] >= 1
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 12
  run = open_run(tiny_config, str(tmp_path), for_training=False)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(run.state.params))
