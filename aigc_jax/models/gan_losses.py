"""GAN objectives on discriminator logits, and gradient penalties.

Each objective gives (d_loss, g_loss) terms: the discriminator minimises d_loss over
(real_B, fake_B) logits, the generator minimises g_loss over fake_B logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError, did_you_mean

OBJECTIVES = ("nonsaturating", "hinge", "wgan")


def check_objective(name: str) -> None:
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


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real_BHWC: jax.Array,
                     fake_BHWC: jax.Array, key: jax.Array) -> jax.Array:
  """WGAN-GP (Gulrajani et al. 2017): mean over the batch of (||grad_x D(x)|| - 1)^2 at
  random interpolates x = e * real + (1 - e) * fake, e ~ U[0, 1] per example."""
  eps_B111 = jax.random.uniform(key, (real_BHWC.shape[0], 1, 1, 1), real_BHWC.dtype)
  x = eps_B111 * real_BHWC + (1 - eps_B111) * fake_BHWC
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(x)  # examples are independent in D
  norms_B = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1) + 1e-12)
  return jnp.mean((norms_B - 1.0) ** 2)


def r1_penalty(critic: Callable[[jax.Array], jax.Array], real_BHWC: jax.Array) -> jax.Array:
  """R1 (Mescheder et al. 2018): mean over real examples of ||grad_x D(x)||^2."""
  grads = jax.grad(lambda x: jnp.sum(critic(x)))(real_BHWC)
  return jnp.mean(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1))
