"""Diffusion objectives as denoisers in one noise parameterisation, so that every sampler
works with every objective.

Both objectives are seen the way Karras et al. (2022, "EDM") see them: data x0 plus
Gaussian noise of standard deviation sigma, x = x0 + sigma * n, and a denoiser
D(x; sigma) ~ E[x0 | x]. The network F (a U-Net: F(x_in_BHWC, noise_B, labels_B)) is
wrapped differently by each:

  DDPM (Ho et al. 2020; cosine schedule of Nichol & Dhariwal 2021): T discrete steps with
    alpha_bar_t; the network sees the variance-preserving x_t = sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) n = x / sqrt(1 + sigma^2) with sigma_t^2 = (1 - alpha_bar_t) /
    alpha_bar_t, and the step index t (continuous between the table's entries), and
    predicts n: D = x - sigma * F. Loss: ||F - n||^2 at uniform t ("L_simple").
  EDM (Karras et al. 2022): D = c_skip x + c_out F(c_in x, c_noise) with the paper's
    preconditioning; log sigma ~ N(p_mean, p_std^2); loss weight lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, i.e. the network's own target has
    unit variance.
  Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023): the straight path
    x_t = (1 - t) x0 + t n, t in [0, 1], is x / (1 + sigma) with t = sigma / (1 + sigma);
    the network sees x_t and t and predicts the path's velocity v = n - x0, so D = x_t -
    t * F. Loss: ||F - (n - x0)||^2 at logit-normal t (Esser et al. 2024, "SD3").

`Network = Callable[[x_in_BHWC, noise_B, labels_B | None], out_BHWC]`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Network = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
OBJECTIVES = ("ddpm", "edm", "flow")
# The U-Net embeds its noise input with DDPM's timestep frequencies (1 .. 1/10,000 per
# unit), so EDM's c_noise = ln(sigma) / 4 is scaled to a timestep-like range.
EDM_NOISE_SCALE = 1000.0
# Flow matching's t in [0, 1] is scaled to the same timestep-like range.
FLOW_TIME_SCALE = 1000.0
# The highest noise level a DDPM trajectory starts from (EDM's sigma_max): far above the
# data's scale, so x there is noise, but not the schedule's ~2e4 (see Ddpm.sampling_sigmas).
DDPM_SAMPLING_SIGMA_MAX = 80.0


def _per_image(v_B: jax.Array) -> jax.Array:
  return v_B[:, None, None, None]


def cosine_alpha_bars(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """alpha_bar_t for t = 1..T (index t - 1) of the cosine schedule, float64 [T]:
  f(t) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), each step's
  beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped at max_beta."""
  f = lambda t: np.cos((t / timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(timesteps + 1, dtype=np.float64)
  betas = np.minimum(1 - f(t[1:]) / f(t[:-1]), max_beta)
  return np.cumprod(1 - betas)


@dataclasses.dataclass(frozen=True)
class Ddpm:
  """Noise prediction on T discrete steps with the cosine schedule."""

  timesteps: int = 1000
  vlb_draws: int = 1  # steps per image of the bound's estimate (stratified)

  @property
  def alpha_bars(self) -> np.ndarray:
    """float64 [T]: alpha_bar at t = 1..T."""
    return cosine_alpha_bars(self.timesteps)

  @property
  def sigmas(self) -> np.ndarray:
    """float64 [T], increasing: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    a = self.alpha_bars
    return np.sqrt((1 - a) / a)

  @property
  def sigma_min(self) -> float:
    return float(self.sigmas[0])

  @property
  def sigma_max(self) -> float:
    return float(self.sigmas[-1])

  def prior_std(self, sigma: float) -> float:
    """The std of x at noise level sigma for unit-variance-or-less data: x_T ~ N(0, 1) in
    the network's coordinates is N(0, 1 + sigma^2) here."""
    return math.sqrt(1.0 + sigma ** 2)

  def sampling_sigmas(self, steps: int, rho: float = 7.0) -> np.ndarray:
    """[steps + 1] descending noise levels, the last 0: EDM's rho spacing from sigma_min
    up to min(sigma_max, DDPM_SAMPLING_SIGMA_MAX). The cosine schedule's last level
    (~2e4, from beta capped at 0.999) is ~30x the one before it: a first step that long
    throws a 2nd-order sampler off, and multiplies any error of the predicted noise by
    2e4; the levels between the table's entries are served by `timestep`."""
    from aigc_jax.models.diffusion_samplers import karras_sigmas
    return karras_sigmas(steps, self.sigma_min, min(self.sigma_max, DDPM_SAMPLING_SIGMA_MAX),
                         rho)

  def timestep(self, sigma_B: jax.Array) -> jax.Array:
    """The (continuous) step index 0..T-1 of noise levels sigma_B, by interpolation of
    log sigma in the schedule's table."""
    log_sigmas = jnp.asarray(np.log(self.sigmas), jnp.float32)
    return jnp.interp(jnp.log(sigma_B), log_sigmas,
                      jnp.arange(self.timesteps, dtype=jnp.float32))

  def denoise(self, network: Network, x_BHWC, sigma_B, labels_B=None) -> jax.Array:
    """D(x; sigma) = x - sigma * F(x / sqrt(1 + sigma^2), t(sigma))."""
    sigma = _per_image(sigma_B)
    eps = network(x_BHWC / jnp.sqrt(1 + sigma ** 2), self.timestep(sigma_B), labels_B)
    return x_BHWC - sigma * eps

  def noised(self, x0_BHWC, t_B, noise_BHWC) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise at step indices t_B (int,
    0..T-1): a draw from q(x_t | x0) for standard normal noise."""
    alpha_bar = _per_image(jnp.asarray(self.alpha_bars, jnp.float32)[t_B])
    return jnp.sqrt(alpha_bar) * x0_BHWC + jnp.sqrt(1 - alpha_bar) * noise_BHWC

  def loss(self, network: Network, x0_BHWC, labels_B, key) -> jax.Array:
    """L_simple per image [B]: the mean squared error of the predicted noise at a uniform
    step t (mean over pixels)."""
    k_t, k_n = jax.random.split(key)
    B = x0_BHWC.shape[0]
    t_B = jax.random.randint(k_t, (B,), 0, self.timesteps)
    noise = jax.random.normal(k_n, x0_BHWC.shape, x0_BHWC.dtype)
    eps = network(self.noised(x0_BHWC, t_B, noise), t_B.astype(jnp.float32), labels_B)
    return jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))

  def vlb(self, network: Network, x0_BHWC, labels_B, key) -> jax.Array:
    """An unbiased estimate of the variational bound -log p(x0) <= L_T + sum_t L_{t-1} +
    L_0 in nats per image [B], for 8-bit images x0 in [-1, 1]: L_T in closed form, the
    first and last steps' terms exactly (the decoder's and the clipped last beta's: the
    two largest, ~1 bit/dim each on Fashion-MNIST, far above their neighbours), and the
    T - 2 steps between from `vlb_draws` steps, one drawn uniformly from each of as many
    equal strata (Ho et al. 2020, eq. 5, draws one step for all; stratifying and the
    exact ends cut a variance that the terms' spread over t dominates). Reverse
    variances: the posterior's (beta~_t), beta~_2 at t = 1, as improved DDPM's fixed
    small variances; L_0 is the discretized Gaussian decoder of 256 levels."""
    T = self.timesteps
    k_t, k_n, k_ends = jax.random.split(key, 3)
    B = x0_BHWC.shape[0]
    a_T = float(self.alpha_bars[-1])  # L_T: KL(N(sqrt(a_T) x0, 1 - a_T) || N(0, 1)) per pixel
    prior = 0.5 * (a_T * x0_BHWC ** 2 + (1 - a_T) - 1 - math.log(1 - a_T))
    ends_B = sum(self._vlb_term(network, x0_BHWC, labels_B, jnp.full((B,), t, jnp.int32), k)
                 for t, k in zip((0, T - 1), jax.random.split(k_ends), strict=True))
    inner = T - 2  # steps 1 .. T - 2
    if inner == 0:
      return prior.sum(axis=(1, 2, 3)) + ends_B
    K = min(self.vlb_draws, inner)
    # Stratum k covers [k inner / K, (k + 1) inner / K) (+ 1): every step equally likely.
    u_B = jax.random.uniform(k_t, (B,))
    t_KB = jnp.floor((jnp.arange(K)[:, None] + u_B[None]) * (inner / K)).astype(jnp.int32)
    t_KB = 1 + jnp.minimum(t_KB, inner - 1)
    terms_KB = jax.lax.map(
        lambda tk: self._vlb_term(network, x0_BHWC, labels_B, tk[0], tk[1]),
        (t_KB, jax.random.split(k_n, K)))
    return prior.sum(axis=(1, 2, 3)) + ends_B + inner * terms_KB.mean(axis=0)

  def _vlb_term(self, network: Network, x0_BHWC, labels_B, t_B, key) -> jax.Array:
    """The bound's term of step t_B per image [B] (nats): KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) at x_t ~ q(x_t | x0), the decoder's -log p(x0 | x_1) at t = 0."""
    from aigc_jax.models.vae_losses import discretized_gaussian_log_prob
    a_bar = np.asarray(self.alpha_bars)
    a_prev = np.concatenate([[1.0], a_bar[:-1]])
    beta = 1 - a_bar / a_prev
    post_var = beta * (1 - a_prev) / (1 - a_bar)  # beta~_t; 0 at t = 1
    var = np.concatenate([[post_var[1]], post_var[1:]])  # the reverse model's variance
    noise = jax.random.normal(key, x0_BHWC.shape, x0_BHWC.dtype)
    x_t = self.noised(x0_BHWC, t_B, noise)
    eps = network(x_t, t_B.astype(jnp.float32), labels_B)
    take = lambda table: _per_image(jnp.asarray(table, jnp.float32)[t_B])
    x0_hat = (x_t - jnp.sqrt(1 - take(a_bar)) * eps) / jnp.sqrt(take(a_bar))
    # The posterior mean of x_{t-1} given x_t and x0, with the true x0 and with x0_hat.
    coef_x0 = take(np.sqrt(a_prev) * beta / (1 - a_bar))
    coef_xt = take(np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_bar))
    true_mean, model_mean = coef_x0 * x0_BHWC + coef_xt * x_t, coef_x0 * x0_hat + coef_xt * x_t
    q_var, p_var = take(np.maximum(post_var, 1e-20)), take(var)
    kl = 0.5 * (jnp.log(p_var / q_var) + (q_var + (true_mean - model_mean) ** 2) / p_var - 1)
    decoder_B = -discretized_gaussian_log_prob(model_mean, 0.5 * jnp.log(p_var), x0_BHWC)
    return jnp.where(t_B == 0, decoder_B, kl.sum(axis=(1, 2, 3)))


@dataclasses.dataclass(frozen=True)
class Edm:
  """Karras et al. (2022): preconditioning, log-normal noise levels, loss weighting."""

  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  def preconditioning(self, sigma):
    """(c_skip, c_out, c_in, c_noise) at sigma (any shape; the paper's Table 1)."""
    sd2 = self.sigma_data ** 2
    total = sigma ** 2 + sd2
    c_skip = sd2 / total
    c_out = sigma * self.sigma_data / jnp.sqrt(total)
    c_in = 1 / jnp.sqrt(total)
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise

  def loss_weight(self, sigma):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = 1 / c_out^2."""
    return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

  def prior_std(self, sigma: float) -> float:
    return float(sigma)

  def sampling_sigmas(self, steps: int, rho: float = 7.0) -> np.ndarray:
    """[steps + 1] descending noise levels, the last 0 (the paper's rho spacing)."""
    from aigc_jax.models.diffusion_samplers import karras_sigmas
    return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)

  def denoise(self, network: Network, x_BHWC, sigma_B, labels_B=None) -> jax.Array:
    c_skip, c_out, c_in, c_noise = self.preconditioning(sigma_B)
    out = network(_per_image(c_in) * x_BHWC, EDM_NOISE_SCALE * c_noise, labels_B)
    return _per_image(c_skip) * x_BHWC + _per_image(c_out) * out

  def loss(self, network: Network, x0_BHWC, labels_B, key) -> jax.Array:
    """lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 per image [B] (mean over pixels),
    log sigma ~ N(p_mean, p_std^2)."""
    k_s, k_n = jax.random.split(key)
    B = x0_BHWC.shape[0]
    sigma_B = jnp.exp(self.p_mean + self.p_std * jax.random.normal(k_s, (B,)))
    noise = jax.random.normal(k_n, x0_BHWC.shape, x0_BHWC.dtype)
    denoised = self.denoise(network, x0_BHWC + _per_image(sigma_B) * noise, sigma_B, labels_B)
    return self.loss_weight(sigma_B) * jnp.mean((denoised - x0_BHWC) ** 2, axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class Flow:
  """Flow matching on the straight path from data (t = 0) to noise (t = 1), velocity
  prediction, logit-normal training times; sampled on EDM's grid of sigma = t / (1 - t)."""

  logit_mean: float = 0.0
  logit_std: float = 1.0
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  def prior_std(self, sigma: float) -> float:
    """Here x = (1 + sigma) x_t = x0 + sigma n: at sigma_max the start is noise of std
    sqrt(1 + sigma^2), as DDPM's (the data's own share of the variance is at most 1)."""
    return math.sqrt(1.0 + sigma ** 2)

  def sampling_sigmas(self, steps: int, rho: float = 7.0) -> np.ndarray:
    """[steps + 1] descending noise levels, the last 0 (EDM's rho spacing)."""
    from aigc_jax.models.diffusion_samplers import karras_sigmas
    return karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)

  def path(self, x0_BHWC, t_B, noise_BHWC) -> jax.Array:
    """x_t = (1 - t) x0 + t noise at times t_B in [0, 1]."""
    t = _per_image(t_B)
    return (1 - t) * x0_BHWC + t * noise_BHWC

  def denoise(self, network: Network, x_BHWC, sigma_B, labels_B=None) -> jax.Array:
    """D(x; sigma) = x_t - t F(x_t, t) with t = sigma / (1 + sigma), x_t = x / (1 + sigma)."""
    t_B = sigma_B / (1 + sigma_B)
    x_t = x_BHWC / _per_image(1 + sigma_B)
    return x_t - _per_image(t_B) * network(x_t, FLOW_TIME_SCALE * t_B, labels_B)

  def loss(self, network: Network, x0_BHWC, labels_B, key) -> jax.Array:
    """||F(x_t, t) - (noise - x0)||^2 per image [B] (mean over pixels), logit t ~
    N(logit_mean, logit_std^2)."""
    k_t, k_n = jax.random.split(key)
    B = x0_BHWC.shape[0]
    t_B = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(k_t, (B,)))
    noise = jax.random.normal(k_n, x0_BHWC.shape, x0_BHWC.dtype)
    velocity = network(self.path(x0_BHWC, t_B, noise), FLOW_TIME_SCALE * t_B, labels_B)
    return jnp.mean((velocity - (noise - x0_BHWC)) ** 2, axis=(1, 2, 3))


Objective = Ddpm | Edm | Flow

# The `loss` settings each objective reads (the others are errors when set).
OBJECTIVE_SETTINGS = {
    "ddpm": ("timesteps", "vlb_draws"),
    "edm": ("sigma_data", "p_mean", "p_std", "sigma_min", "sigma_max"),
    "flow": ("logit_mean", "logit_std", "sigma_min", "sigma_max"),
}


def make_objective(loss_cfg) -> Objective:
  """The objective a run config's `loss` section names (`loss.name`: ddpm | edm | flow)."""
  if loss_cfg.name == "ddpm":
    return Ddpm(timesteps=int(loss_cfg.timesteps), vlb_draws=int(loss_cfg.vlb_draws))
  if loss_cfg.name == "edm":
    return Edm(sigma_data=float(loss_cfg.sigma_data), p_mean=float(loss_cfg.p_mean),
               p_std=float(loss_cfg.p_std), sigma_min=float(loss_cfg.sigma_min),
               sigma_max=float(loss_cfg.sigma_max))
  if loss_cfg.name == "flow":
    return Flow(logit_mean=float(loss_cfg.logit_mean), logit_std=float(loss_cfg.logit_std),
                sigma_min=float(loss_cfg.sigma_min), sigma_max=float(loss_cfg.sigma_max))
  raise ValueError(f"unknown objective {loss_cfg.name!r}; choose one of {OBJECTIVES}")
