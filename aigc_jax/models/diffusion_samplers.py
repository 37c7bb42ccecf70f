"""Samplers for denoisers D(x; sigma) (`aigc_jax.models.diffusion`), each a whole
trajectory in one `lax.scan`, so that `jax.jit` compiles a sampler once per number of
steps.

Noise levels run down a grid sigma_0 > ... > sigma_{N-1} > sigma_N = 0:
  euler   Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
          (= DDIM with eta 0); N network evaluations (NFE).
  heun    Karras et al.'s 2nd-order Heun steps, Euler for the last one; NFE 2N - 1.
  ddim    DDIM with stochasticity eta (Song et al. 2021) in these coordinates: each step
          moves to sigma_down and adds fresh noise sigma_up, sigma_up^2 + sigma_down^2 =
          sigma_next^2; eta 0 is Euler, eta 1 is DDPM's ancestral sampler; NFE N.
Grids: `karras_sigmas` (EDM's rho = 7 spacing) or `table_sigmas` (a DDPM model's own
levels at evenly spaced steps, as DDIM respaces them).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("euler", "heun", "ddim")
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x_BHWC, sigma_B) -> x0_BHWC


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> np.ndarray:
  """[num_steps + 1] descending levels, the last 0: (sigma_max^(1/rho) + i / (N - 1) *
  (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N (one step: sigma_max alone)."""
  i = np.arange(num_steps) / max(num_steps - 1, 1)
  inv = 1.0 / rho
  levels = (sigma_max ** inv + i * (sigma_min ** inv - sigma_max ** inv)) ** rho
  return np.append(levels, 0.0)


def table_sigmas(table: np.ndarray, num_steps: int) -> np.ndarray:
  """[num_steps + 1] descending levels, the last 0: a DDPM schedule's levels `table`
  (increasing, [T]) at num_steps evenly spaced steps from T - 1 down to 0."""
  steps = np.round(np.linspace(len(table) - 1, 0, num_steps)).astype(int)
  return np.append(np.asarray(table)[steps], 0.0)


def number_of_evaluations(sampler: str, num_steps: int) -> int:
  """Network evaluations of a trajectory (NFE), counting a guided pair as one."""
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


def guided(denoise: Callable, labels_B: jax.Array | None, scale: float,
           null_label: int) -> Denoiser:
  """Classifier-free guidance: D_u + scale * (D_c - D_u), D_c with labels_B and D_u with
  the null label, in one call on a doubled batch (scale 1: D_c alone, one call).
  `denoise(x_BHWC, sigma_B, labels_B)`."""
  if labels_B is None or scale == 1.0:
    return lambda x, sigma: denoise(x, sigma, labels_B)

  def denoise_guided(x_BHWC, sigma_B):
    B = x_BHWC.shape[0]
    both = denoise(jnp.concatenate([x_BHWC, x_BHWC]), jnp.concatenate([sigma_B, sigma_B]),
                   jnp.concatenate([labels_B, jnp.full_like(labels_B, null_label)]))
    conditional, unconditional = both[:B], both[B:]
    return unconditional + scale * (conditional - unconditional)

  return denoise_guided


def sample(denoise: Denoiser, x_BHWC: jax.Array, sigmas: jax.Array, sampler: str,
           key: jax.Array | None = None, eta: float = 0.0,
           trajectory: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Runs `sampler` from x at sigmas[0] (x ~ N(0, prior_std(sigmas[0])^2)) down the grid
  `sigmas` [N + 1] (descending, last 0). Returns (x0 [B, H, W, C], the denoised estimate
  after each step [N, B, H, W, C] if `trajectory`, else None). `key`: ddim with eta > 0."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  stochastic = sampler == "ddim" and eta > 0
  if stochastic and key is None:
    raise ValueError("ddim with eta > 0 draws fresh noise: pass a key")
  sigmas = jnp.asarray(sigmas, jnp.float32)
  B = x_BHWC.shape[0]
  at = lambda s: jnp.full((B,), s, jnp.float32)

  def euler(x, sigma, sigma_next, denoised):
    return x + (sigma_next - sigma) * (x - denoised) / sigma

  def step(x, i):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = denoise(x, at(sigma))
    if sampler == "heun":
      x_next = euler(x, sigma, sigma_next, denoised)
      d = (x - denoised) / sigma
      d_next = (x_next - denoise(x_next, at(sigma_next))) / sigma_next
      x_next = x + (sigma_next - sigma) * (d + d_next) / 2
    elif stochastic:
      sigma_up = jnp.minimum(sigma_next, eta * sigma_next
                             * jnp.sqrt(jnp.maximum(sigma ** 2 - sigma_next ** 2, 0)) / sigma)
      sigma_down = jnp.sqrt(sigma_next ** 2 - sigma_up ** 2)
      noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      x_next = denoised + sigma_down * (x - denoised) / sigma + sigma_up * noise
    else:
      x_next = euler(x, sigma, sigma_next, denoised)
    return x_next, (denoised if trajectory else None)

  N = sigmas.shape[0] - 1
  # Heun's last step goes to sigma = 0, where its correction would divide by zero: Euler.
  loop_steps = N - 1 if sampler == "heun" else N
  x, path = jax.lax.scan(step, x_BHWC, jnp.arange(loop_steps))
  if loop_steps < N:
    denoised = denoise(x, at(sigmas[N - 1]))
    x = denoised  # Euler to sigma 0 lands on the denoised estimate
    if trajectory:
      path = jnp.concatenate([path, denoised[None]])
  return x, path
