"""A model family that lives outside aigc_jax, built only from its public API: an MLP
classifier of scikit-learn's 8x8 handwritten digits (1,797 real images that ship inside
the scikit-learn wheel). tests/test_outside_family.py trains it with our loop and CLI.

Its config names it by dotted path: `family = "tests.outside_family"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from aigc_jax import TrainState, make_supervised_step
from aigc_jax.config import require_positive
from aigc_jax.data.batching import ExampleBatches
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib

NUM_TEST = 288  # held-out digits: 9 batches of 32


class DigitsMLP(nnx.Module):
  """pixels [B, 64] in [0, 1] -> logits [B, 10]."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x_BF: jax.Array) -> jax.Array:
    return self.out(jax.nn.relu(self.hidden(x_BF)))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = __name__
  c.seed = 0
  c.model = dict(hidden=32)
  # The keys the shared loop reads, plus the guard's.
  c.train = dict(steps=60, batch_size=32, log_every=10, eval_every=30, checkpoint_every=30,
                 keep_checkpoints=2, **guard.DEFAULTS)
  c.optim = dict(lr=1e-2)
  c.mesh = mesh_lib.default_mesh_config()
  return c


def validate(c) -> None:
  require_positive(c, "model.hidden", "optim.lr", "train.steps", "train.batch_size")


def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  digits = load_digits()
  return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32)


def _loss(model, batch, rng, step):
  del rng, step
  logits = model(batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, {"accuracy": (logits.argmax(-1) == batch["y"]).mean()}


class Family:
  name = "digits_mlp"
  plot_keys = ("loss",)

  def __init__(self, config, workdir):
    self.config = config
    x, y = _digits()
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:NUM_TEST], order[NUM_TEST:]
    B = config.train.batch_size
    self.train_data = ExampleBatches({"x": x[train], "y": y[train]}, B, config.seed)
    self._test = [{"x": x[test[i:i + B]], "y": y[test[i:i + B]]}
                  for i in range(0, NUM_TEST - B + 1, B)]
    self.items_per_step = {"examples": B}
    abstract = nnx.eval_shape(lambda: DigitsMLP(config.model.hidden, rngs=nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract)[0]
    # A constant schedule: the learning rate is a Python float (the guard makes it an array).
    schedule = optax.constant_schedule(config.optim.lr)
    self.tx = optax.adam(schedule)
    self.train_step = make_supervised_step(self.graphdef, _loss, self.tx, schedule)

  def init_state(self, rng):
    model = DigitsMLP(self.config.model.hidden, rngs=nnx.Rngs(rng))
    return TrainState.create(nnx.to_pure_dict(nnx.state(model)), self.tx, rng)

  def eval_batches(self):
    return self._test

  def eval_step(self, state, batch):
    logits = nnx.merge(self.graphdef, state.params)(batch["x"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return {"nll": nll.sum(), "correct": (logits.argmax(-1) == batch["y"]).sum(),
            "count": jnp.float32(len(batch["y"]))}

  def summarize_eval(self, sums):
    return {"loss": sums["nll"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}

  def sample_metrics(self, state):
    return {}

  def write_samples(self, state, step, workdir):
    return []

  def cli_sample(self, state, workdir, options):
    batch = self._test[0]
    predicted = nnx.merge(self.graphdef, state.params)(batch["x"]).argmax(-1)
    return " ".join(f"{int(p)}/{int(t)}" for p, t in zip(predicted, batch["y"], strict=True))
