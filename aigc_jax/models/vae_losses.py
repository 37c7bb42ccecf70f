"""VAE objectives: the diagonal-Gaussian posterior's analytic KL, pixel likelihoods, the
ELBO (beta weight, free bits) and the importance-weighted bound (IWAE).

The objectives of a model (`elbo`, `iwae_log_weights_of`) take a `VAE` module and images
[B, H, W, C] in [0, 1], as the module does: {0, 1} for the Bernoulli likelihood, 8-bit
levels / 255 for the logistic and Gaussian ones. The pixel likelihoods underneath take
their targets: {0, 1} (Bernoulli) or levels in [-1, 1] (`likelihood_targets` maps one to
the other). Log-probabilities are summed over pixels: nats per image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError, did_you_mean

LIKELIHOODS = ("bernoulli", "logistic", "gaussian")
_HALF_BIN = 1.0 / 255.0  # half the width of one 8-bit level on [-1, 1]


def check_likelihood(name: str) -> None:
  """Raises UserError unless `name` is one of LIKELIHOODS."""
  if name not in LIKELIHOODS:
    raise UserError(f"unknown VAE likelihood {name!r}{did_you_mean(name, LIKELIHOODS)}: use "
                    f"one of {LIKELIHOODS}")


def gaussian_kl_BZ(mean_BZ: jax.Array, logvar_BZ: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per latent dimension [B, Z]."""
  return 0.5 * (jnp.exp(logvar_BZ) + mean_BZ ** 2 - 1.0 - logvar_BZ)


def gaussian_log_prob_BZ(z_BZ, mean_BZ, logvar_BZ) -> jax.Array:
  """log N(z; mean, exp(logvar)) per dimension [B, Z] (nats)."""
  return -0.5 * (math.log(2 * math.pi) + logvar_BZ + (z_BZ - mean_BZ) ** 2 * jnp.exp(-logvar_BZ))


def _is_key_batch(key) -> bool:
  """[B] typed keys or [B, 2] raw uint32 keys: one key per row of a batch."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 1
  return key.ndim == 2


def standard_normal(key, shape: tuple[int, ...]) -> jax.Array:
  """N(0, 1) noise of shape [..., B, Z] from one key, or from one key per row ([B] typed or
  [B, 2] raw keys), so that a row's noise does not depend on the rest of its batch."""
  if not _is_key_batch(key):
    return jax.random.normal(key, shape)
  *lead, B, Z = shape
  per_row = jax.vmap(lambda k: jax.random.normal(k, (*lead, Z)))(key)  # [B, ..., Z]
  return jnp.moveaxis(per_row, 0, -2)


def reparameterize(key, mean_BZ, logvar_BZ, num: int | None = None) -> jax.Array:
  """z = mean + sigma * eps: [B, Z], or [num, B, Z] samples; `key` is one key or one per
  row ([B] keys)."""
  if num is not None:
    mean_BZ, logvar_BZ = mean_BZ[None], logvar_BZ[None]  # [1, B, Z]: explicit broadcast
    return mean_BZ + jnp.exp(0.5 * logvar_BZ) * standard_normal(
        key, (num, *mean_BZ.shape[1:]))
  return mean_BZ + jnp.exp(0.5 * logvar_BZ) * standard_normal(key, mean_BZ.shape)


def _sum_pixels(x: jax.Array) -> jax.Array:
  return x.reshape(*x.shape[:-3], -1).sum(-1)


def bernoulli_log_prob(logits: jax.Array, x01: jax.Array) -> jax.Array:
  """log p(x | logits) for x in {0, 1}, summed over [..., H, W, C]."""
  return _sum_pixels(x01 * jax.nn.log_sigmoid(logits) + (1 - x01) * jax.nn.log_sigmoid(-logits))


def discretized_logistic_log_prob(mean, log_scale, x) -> jax.Array:
  """log P(x) of 8-bit levels x in [-1, 1] under a logistic(mean, exp(log_scale)) binned
  to 256 levels (PixelCNN++), summed over [..., H, W, C]."""
  inv_s = jnp.exp(-log_scale)
  centre = inv_s * (x - mean)
  plus, minus = centre + inv_s * _HALF_BIN, centre - inv_s * _HALF_BIN
  log_cdf_plus = jax.nn.log_sigmoid(plus)  # the x = -1 bin: (-inf, -1 + half bin]
  log_sf_minus = jax.nn.log_sigmoid(-minus)  # the x = +1 bin: [1 - half bin, inf)
  mass = jax.nn.sigmoid(plus) - jax.nn.sigmoid(minus)
  # Where the bin's mass underflows float32: the density at the centre times the bin width.
  log_density = centre - log_scale - 2 * jax.nn.softplus(centre) + math.log(2 * _HALF_BIN)
  mid = jnp.where(mass > 1e-5, jnp.log(jnp.maximum(mass, 1e-12)), log_density)
  logp = jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_sf_minus, mid))
  return _sum_pixels(logp)


def discretized_gaussian_log_prob(mean, log_scale, x) -> jax.Array:
  """log P(x) of 8-bit levels x in [-1, 1] under N(mean, exp(log_scale)^2) binned to 256
  levels, summed over [..., H, W, C]."""
  inv_s = jnp.exp(-log_scale) / math.sqrt(2.0)
  plus, minus = inv_s * (x - mean + _HALF_BIN), inv_s * (x - mean - _HALF_BIN)
  log_cdf_plus = jax.scipy.special.log_ndtr(plus * math.sqrt(2.0))
  log_sf_minus = jax.scipy.special.log_ndtr(-minus * math.sqrt(2.0))
  mass = 0.5 * (jax.scipy.special.erf(plus) - jax.scipy.special.erf(minus))
  centre = (x - mean) * jnp.exp(-log_scale)
  mid_small = (-0.5 * centre ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
               + math.log(2 * _HALF_BIN))
  mid = jnp.where(mass > 1e-5, jnp.log(jnp.maximum(mass, 1e-12)), mid_small)
  logp = jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_sf_minus, mid))
  return _sum_pixels(logp)


def log_likelihood(name: str, decoded, x) -> jax.Array:
  """log p(x | z) [...] from the decoder's output: logits (bernoulli) or (mean, log_scale)."""
  if name == "bernoulli":
    return bernoulli_log_prob(decoded, x)
  mean, log_scale = decoded
  if name == "logistic":
    return discretized_logistic_log_prob(mean, log_scale, x)
  return discretized_gaussian_log_prob(mean, log_scale, x)


def elbo_terms(log_px_B, kl_BZ, *, beta=1.0, free_bits: float = 0.0):
  """(training loss [B], ELBO [B]): the loss is -(log p(x|z) - beta * KL) with each latent
  dimension's KL floored at `free_bits` nats (averaged over the batch, as Kingma et al.
  2016); the ELBO is the plain bound, always reported."""
  elbo_B = log_px_B - kl_BZ.sum(-1)
  if free_bits > 0:
    kl_Z = kl_BZ.mean(0)
    kl_train = jnp.maximum(kl_Z, free_bits).sum() + (kl_BZ.sum(-1) - kl_Z.sum())
  else:
    kl_train = kl_BZ.sum(-1)
  return -(log_px_B - beta * kl_train), elbo_B


def iwae_log_weights(log_px_KB, z_KBZ, mean_BZ, logvar_BZ) -> jax.Array:
  """log w = log p(x|z) + log p(z) - log q(z|x) for K samples: [K, B]."""
  log_pz = gaussian_log_prob_BZ(z_KBZ, 0.0, jnp.zeros_like(z_KBZ)).sum(-1)
  log_qz = gaussian_log_prob_BZ(z_KBZ, mean_BZ[None], logvar_BZ[None]).sum(-1)
  return log_px_KB + log_pz - log_qz


# --- the objectives of a VAE module (aigc_jax.models.vae.VAE) ------------------------------

def likelihood_targets(likelihood: str, x01: jax.Array) -> jax.Array:
  """Images in [0, 1] -> the pixel likelihood's targets: as given for bernoulli ({0, 1}),
  else the 8-bit levels on [-1, 1]."""
  return x01 if likelihood == "bernoulli" else x01 * 2.0 - 1.0


class Elbo(NamedTuple):
  """The terms of `elbo`: per-image loss and bound [B], KL per latent [B, Z], posterior means."""
  loss_B: jax.Array  # the training loss per image (beta, free bits)
  elbo_B: jax.Array  # the plain bound log p(x|z) - KL per image, nats
  kl_BZ: jax.Array  # KL(q(z|x) || p(z)) per latent dimension
  mean_BZ: jax.Array  # the posterior means


def elbo(vae, x_BHWC: jax.Array, rngs, *, beta=1.0, free_bits: float = 0.0) -> Elbo:
  """The single-sample ELBO of a `VAE` module on images [B, H, W, C] in [0, 1] (analytic
  KL); `rngs` is what `vae(x, rngs)` takes: a key, [B] keys (one per image), an
  `nnx.RngStream` or an `nnx.Rngs`."""
  decoded, mean_BZ, logvar_BZ = vae(x_BHWC, rngs)
  name = vae.cfg.likelihood
  log_px_B = log_likelihood(name, decoded, likelihood_targets(name, x_BHWC))
  kl_BZ = gaussian_kl_BZ(mean_BZ, logvar_BZ)
  loss_B, elbo_B = elbo_terms(log_px_B, kl_BZ, beta=beta, free_bits=free_bits)
  return Elbo(loss_B, elbo_B, kl_BZ, mean_BZ)


def iwae_log_weights_of(vae, x_BHWC: jax.Array, key, k: int) -> jax.Array:
  """log importance weights [k, B] of a `VAE` module on images [B, H, W, C] in [0, 1], k
  posterior samples per image; -log p(x) >= -(logsumexp over k - log k)."""
  mean_BZ, logvar_BZ = vae.encode(x_BHWC)
  z_KBZ = reparameterize(key, mean_BZ, logvar_BZ, num=k)
  name = vae.cfg.likelihood
  x_KBHWC = jnp.broadcast_to(likelihood_targets(name, x_BHWC)[None], (k, *x_BHWC.shape))
  log_px_KB = log_likelihood(name, vae.decode(z_KBZ), x_KBHWC)
  return iwae_log_weights(log_px_KB, z_KBZ, mean_BZ, logvar_BZ)
