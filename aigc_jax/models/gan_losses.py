"""GAN objectives on discriminator logits, and gradient penalties.

Each objective gives (d_loss, g_loss) terms: the discriminator minimises d_loss over
(real_B, fake_B) logits, the generator minimises g_loss over fake_B logits.

The penalties take the critic as an `nnx.Module` in whatever mode it is in (training mode
included, spectral norm included), or as a pure function of the images.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError

from aigc_jax.errors import UserError, did_you_mean

Critic = nnx.Module | Callable[[jax.Array], jax.Array]

OBJECTIVES = ("nonsaturating", "hinge", "wgan")


def check_objective(name: str) -> None:
  """Raises UserError unless `name` is one of OBJECTIVES."""
  if name not in OBJECTIVES:
    raise UserError(f"unknown GAN loss {name!r}{did_you_mean(name, OBJECTIVES)}: use one of "
                    f"{OBJECTIVES}")


def d_loss(name: str, real_B: jax.Array, fake_B: jax.Array, label_smoothing: float = 0.0):
  """The discriminator's loss. label_smoothing (non-saturating only) is one-sided: real
  targets become 1 - label_smoothing."""
  check_objective(name)
  if name == "nonsaturating":
    target = 1.0 - label_smoothing
    real = target * jax.nn.softplus(-real_B) + (1 - target) * jax.nn.softplus(real_B)
    return jnp.mean(real) + jnp.mean(jax.nn.softplus(fake_B))
  if name == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_B)) + jnp.mean(jax.nn.relu(1.0 + fake_B))
  return jnp.mean(fake_B) - jnp.mean(real_B)


def g_loss(name: str, fake_B: jax.Array):
  """The generator's loss (non-saturating: -log D(G(z)))."""
  check_objective(name)
  if name == "nonsaturating":
    return jnp.mean(jax.nn.softplus(-fake_B))
  return -jnp.mean(fake_B)


def critic_fn(critic: Critic) -> Callable[[jax.Array], jax.Array]:
  """The critic as a pure function of images [B, H, W, C] -> logits [B], to differentiate
  with respect to its input inside `jax.grad`. A module runs as a copy of itself merged
  inside the function, in its own mode: in training mode it normalises as in training,
  but what it would write (BatchNorm running averages, the spectral norm's u) stays in the
  copy, so the module is not mutated from inside the transform. Gradients still flow to
  its parameters."""
  if not isinstance(critic, nnx.Module):
    return critic
  batch_stats = [path for path, m in nnx.iter_graph(critic)
                 if isinstance(m, nnx.BatchNorm) and not m.use_running_average]
  if batch_stats:
    # Batch statistics couple the examples: the input gradient of one example would
    # depend on the others, and the penalty would not be the per-example norm it claims.
    raise UserError(f"the critic normalises with batch statistics (BatchNorm at "
                    f"{'.'.join(map(str, batch_stats[0])) or 'the top'} in training mode), so "
                    "its per-example input gradients are not defined: use a critic without "
                    "BatchNorm (layer or spectral norm) or pass critic.eval()")
  graphdef, state = nnx.split(critic)
  return lambda images_BHWC: nnx.merge(graphdef, state, copy=True)(images_BHWC)


def _input_grads(critic: Critic, x_BHWC: jax.Array) -> jax.Array:
  """d sum(D(x)) / dx [B, H, W, C] (per example, as examples are independent in D)."""
  critic = critic_fn(critic)
  try:
    return jax.grad(lambda x: jnp.sum(critic(x)))(x_BHWC)
  except TraceContextError as e:
    raise UserError("the critic wrote its state (a module in training mode: BatchNorm "
                    "statistics, the spectral norm's u) from inside the penalty's jax.grad: "
                    "pass the module itself, e.g. gradient_penalty(d, ...), which reads its "
                    "statistics without writing them") from e


def gradient_penalty(critic: Critic, real_BHWC: jax.Array, fake_BHWC: jax.Array,
                     key: jax.Array) -> jax.Array:
  """WGAN-GP (Gulrajani et al. 2017): mean over the batch of (||grad_x D(x)|| - 1)^2 at
  random interpolates x = e * real + (1 - e) * fake, e ~ U[0, 1] per example. The critic
  (see `critic_fn`) must treat examples independently."""
  eps_B111 = jax.random.uniform(key, (real_BHWC.shape[0], 1, 1, 1), real_BHWC.dtype)
  grads = _input_grads(critic, eps_B111 * real_BHWC + (1 - eps_B111) * fake_BHWC)
  norms_B = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1) + 1e-12)
  return jnp.mean((norms_B - 1.0) ** 2)


def r1_penalty(critic: Critic, real_BHWC: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018): mean over real examples of ||grad_x D(x)||^2. The critic
  is taken as in `gradient_penalty`."""
  grads = _input_grads(critic, real_BHWC)
  return jnp.mean(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1))
