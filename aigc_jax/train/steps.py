"""Pure train-step builders shared by model families."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aigc_jax.train.partition import join
from aigc_jax.train.state import TrainState

# loss_fn(model, batch, rng, step) -> (scalar loss, dict of scalar metrics); `step` (int32
# scalar) lets a loss follow a schedule (e.g. a VAE's KL warm-up). A loss that is a mean
# over a batch-dependent count (tokens under a mask) reports that count as the metric
# LOSS_WEIGHT, so that micro-batches are weighted by it: the accumulated loss is then the
# mean over the whole batch, as without accumulation.
LOSS_WEIGHT = "loss_weight"
# optax.tree.norm replaced optax.global_norm (deprecated) in newer optax releases.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm

LossFn = Callable[[nnx.Module, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def split_microbatches(batch, num_micro: int):
  """[B, ...] -> [A, B/A, ...]; micro-batch i takes rows i, i+A, ... so that, with the batch
  sharded over devices, every micro-batch stays spread over all of them."""
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1),
      batch)


def make_supervised_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                         tx: optax.GradientTransformation, schedule: optax.Schedule,
                         grad_accum_steps: int = 1):
  """(state, batch) -> (state, metrics): one optimizer update from the mean gradient of
  `grad_accum_steps` micro-batches (a `lax.scan`, so memory is that of one micro-batch).

  Per-step randomness is `fold_in(state.rng, state.step)`: deterministic, and the same
  whether or not the run was resumed. Gradients are taken of `state.params` only;
  `state.frozen` joins them in the model as constants of the differentiation.
  """

  def loss_of_params(params, frozen, batch, rng, step):
    return loss_fn(nnx.merge(graphdef, join(params, frozen)), batch, rng, step)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, state.frozen, batch, rng, state.step)
    else:
      micro = split_microbatches(batch, grad_accum_steps)

      def accumulate(carry, inputs):
        i, mb = inputs
        (loss, aux), grads = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i),
                                     state.step)
        weight = aux.get(LOSS_WEIGHT, jnp.float32(1))
        weighted = jax.tree.map(lambda x: weight * x, (loss, grads))
        return jax.tree.map(jnp.add, carry, (*weighted, aux, weight)), None

      zero = jax.eval_shape(grad_fn, state.params, state.frozen,
                            jax.tree.map(lambda x: x[0], micro), rng, state.step)
      zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
      zero = (zero[0][0], zero[1], zero[0][1], jnp.float32(0))
      (loss, grads, aux, weight), _ = jax.lax.scan(
          accumulate, zero, (jnp.arange(grad_accum_steps), micro))
      weight = jnp.where(weight > 0, weight, 1.0)  # nothing counted: zero loss and grads
      loss, grads = jax.tree.map(lambda x: x / weight, (loss, grads))
      aux = {k: v if k == LOSS_WEIGHT else v / grad_accum_steps for k, v in aux.items()}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": _tree_norm(grads),
               "lr": jnp.asarray(schedule(state.step), jnp.float32), **aux}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step
