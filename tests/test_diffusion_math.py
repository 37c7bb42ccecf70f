"""Diffusion objectives and samplers against closed forms: the forward process, EDM's
preconditioning, oracle networks, and samplers on Gaussian data whose ideal denoiser and
exact ODE solution are known."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from aigc_jax.models import diffusion
from aigc_jax.models import diffusion_samplers as samplers

DDPM = diffusion.Ddpm(timesteps=1000)
EDM = diffusion.Edm()
FLOW = diffusion.Flow()


def test_cosine_schedule_is_a_decreasing_alpha_bar_with_clipped_betas():
  a = diffusion.cosine_alpha_bars(1000)
  assert a.shape == (1000,) and np.all(np.diff(a) < 0)
  assert 0.9999 < a[0] < 1 and a[-1] < 1e-4
  betas = 1 - a / np.concatenate([[1.0], a[:-1]])
  assert betas.max() <= 0.999 + 1e-12 and betas.min() > 0
  # Nichol & Dhariwal: alpha_bar(t) = f(t) / f(0), f = cos^2(((t / T) + s) / (1 + s) pi / 2).
  f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  assert math.isclose(a[499], f(500) / f(0), rel_tol=1e-9)


def test_forward_noising_matches_its_closed_form():
  """x_t | x0 ~ N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I), by 200,000 draws."""
  x0 = jnp.linspace(-1, 1, 8).reshape(1, 2, 4, 1)
  n = 200_000
  for t in (0, 300, 999):
    noise = jax.random.normal(jax.random.PRNGKey(t), (n, 2, 4, 1))
    x_t = DDPM.noised(jnp.broadcast_to(x0, noise.shape), jnp.full((n,), t), noise)
    a = DDPM.alpha_bars[t]
    np.testing.assert_allclose(x_t.mean(0), math.sqrt(a) * x0[0], atol=4 * math.sqrt(
        (1 - a) / n) + 1e-6)
    np.testing.assert_allclose(x_t.var(0), np.full((2, 4, 1), 1 - a), rtol=0.02, atol=1e-7)
    # In the denoiser's coordinates the same draw is x0 + sigma_t * noise.
    np.testing.assert_allclose(x_t / math.sqrt(a), x0 + DDPM.sigmas[t] * noise, rtol=1e-4,
                               atol=2e-4 * max(1.0, DDPM.sigmas[t]))


def test_edm_preconditioning_reproduces_the_papers_formulas():
  for sigma in (0.002, 0.5, 2.0, 80.0):
    c_skip, c_out, c_in, c_noise = (float(v) for v in EDM.preconditioning(jnp.float32(sigma)))
    sd = 0.5
    assert math.isclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2), rel_tol=1e-5)
    assert math.isclose(c_out, sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), rel_tol=1e-5)
    assert math.isclose(c_in, 1 / math.sqrt(sigma ** 2 + sd ** 2), rel_tol=1e-5)
    assert math.isclose(c_noise, math.log(sigma) / 4, rel_tol=1e-5, abs_tol=1e-6)
    # The loss weight makes the network's own target unit-weighted: lambda c_out^2 = 1.
    assert math.isclose(float(EDM.loss_weight(jnp.float32(sigma))) * c_out ** 2, 1.0,
                        rel_tol=1e-4)
  # At sigma = sigma_data the hand-computed values: 1/2, sqrt(2)/4, sqrt(2), ln(0.5)/4.
  np.testing.assert_allclose(EDM.preconditioning(jnp.float32(0.5)),
                             [0.5, math.sqrt(2) / 4, math.sqrt(2), math.log(0.5) / 4], rtol=1e-6)


def _images(key, n=6):
  return jax.random.uniform(key, (n, 4, 4, 1), minval=-1, maxval=1)


def test_an_oracle_network_gives_the_denoiser_the_true_image():
  x0 = _images(jax.random.PRNGKey(0))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  sigma_B = jnp.asarray(DDPM.sigmas[[0, 10, 200, 500, 800, 999]], jnp.float32)
  x = x0 + sigma_B[:, None, None, None] * noise

  def ddpm_oracle(x_in, t_B, labels):  # predicts the true noise from its own inputs
    np.testing.assert_allclose(t_B, [0, 10, 200, 500, 800, 999], atol=1e-2)
    return noise

  np.testing.assert_allclose(DDPM.denoise(ddpm_oracle, x, sigma_B), x0, atol=2e-3)

  sigma_B = jnp.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
  x = x0 + sigma_B[:, None, None, None] * noise

  def edm_oracle(x_in, c_noise_B, labels):  # F = (x0 - c_skip x) / c_out, from F's inputs
    c_skip, c_out, c_in, _ = EDM.preconditioning(sigma_B[:, None, None, None])
    return (x0 - c_skip * x_in / c_in) / c_out

  np.testing.assert_allclose(EDM.denoise(edm_oracle, x, sigma_B), x0, atol=1e-4)

  t_B = sigma_B / (1 + sigma_B)  # x is the path's x_t = (1 - t) x0 + t n, scaled by 1 + sigma

  def flow_oracle(x_t, time_B, labels):  # the path's velocity n - x0, from F's inputs
    np.testing.assert_allclose(time_B, diffusion.FLOW_TIME_SCALE * t_B, rtol=1e-6)
    np.testing.assert_allclose(x_t, FLOW.path(x0, t_B, noise), atol=1e-6)
    return noise - x0

  np.testing.assert_allclose(FLOW.denoise(flow_oracle, x, sigma_B), x0, atol=1e-4)


def test_the_losses_vanish_for_an_oracle_and_not_for_a_wrong_network():
  x0 = _images(jax.random.PRNGKey(2))
  key = jax.random.PRNGKey(3)
  # Recover the loss's own draw of noise: the oracle solves x_t for it.
  def ddpm_oracle(x_t, t_B, labels):
    a = jnp.asarray(DDPM.alpha_bars, jnp.float32)[t_B.astype(jnp.int32)][:, None, None, None]
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
  assert float(DDPM.loss(ddpm_oracle, x0, None, key).max()) < 1e-4
  assert float(DDPM.loss(lambda x, t, y: jnp.zeros_like(x), x0, None, key).mean()) > 0.5

  def flow_oracle(x_t, time_B, labels):  # x_t = x0 + t (n - x0): the velocity from x_t
    t = (time_B / diffusion.FLOW_TIME_SCALE)[:, None, None, None]
    return (x_t - x0) / t
  assert float(FLOW.loss(flow_oracle, x0, None, key).max()) < 1e-4
  assert float(FLOW.loss(lambda x, t, y: jnp.zeros_like(x), x0, None, key).mean()) > 0.5


def test_flow_training_times_are_logit_normal():
  """The loss draws t = sigmoid(m + s z): its logits have the configured mean and std."""
  times = []
  def record(x_t, time_B, labels):
    times.append(time_B / diffusion.FLOW_TIME_SCALE)
    return jnp.zeros_like(x_t)
  flow = diffusion.Flow(logit_mean=0.5, logit_std=0.8)
  flow.loss(record, jnp.zeros((20_000, 1, 1, 1)), None, jax.random.PRNGKey(0))
  logits = np.log(np.asarray(times[0]) / (1 - np.asarray(times[0])))
  assert abs(logits.mean() - 0.5) < 0.02 and abs(logits.std() - 0.8) < 0.02


# --- samplers on Gaussian data: D(x; s) = mu + v / (v + s^2) (x - mu) is the ideal denoiser,
# and the probability-flow ODE maps x(sigma_max) to mu + (x - mu) sqrt(v / (v + sigma_max^2)).
MU, VAR = 0.3, 0.25


def _gaussian_denoiser(x, sigma_B):
  return MU + VAR / (VAR + sigma_B[:, None, None, None] ** 2) * (x - MU)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim"])
def test_more_steps_never_make_the_oracle_sampler_worse(sampler):
  x_T = jnp.array([80.0, -80.0, 40.0]).reshape(3, 1, 1, 1)
  exact = MU + (x_T - MU) * math.sqrt(VAR / (VAR + 80.0 ** 2))
  errors = []
  # Heun's correction on a 2-step grid (80 -> 0.002 in one step) overshoots by ~40: a
  # second-order step needs steps small enough for its slope estimate; from 4 on it holds.
  steps = (4, 8, 16, 32, 64) if sampler == "heun" else (1, 2, 4, 8, 16, 32, 64)
  for n in steps:
    sigmas = samplers.karras_sigmas(n, 0.002, 80.0)
    out, _ = samplers.sample(_gaussian_denoiser, x_T, sigmas, sampler)
    errors.append(float(jnp.abs(out - exact).max()))
  assert all(later <= earlier * (1 + 1e-6)
             for earlier, later in zip(errors, errors[1:], strict=False)), errors
  # The global error's order: halving the step size halves Euler's error, quarters Heun's.
  order = math.log2(errors[-2] / errors[-1])
  assert (1.8 < order < 2.5) if sampler == "heun" else (0.8 < order < 1.2), errors
  assert errors[-1] < (2e-3 if sampler == "heun" else 3e-2), errors
  if sampler == "heun":  # closer than Euler at (about) the same NFE: 32 steps, 63 NFE vs 64
    euler, _ = samplers.sample(_gaussian_denoiser, x_T, samplers.karras_sigmas(64, 0.002, 80.0),
                               "euler")
    assert errors[-2] < 0.5 * float(jnp.abs(euler - exact).max())


def test_ddim_eta_one_draws_the_data_distribution_and_eta_zero_is_euler():
  n = 20_000
  x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 1, 1, 1)) * math.sqrt(VAR + 80.0 ** 2)
  std_errors = []
  for steps in (100, 400):  # a first-order sampler: 4x the steps, ~1/4 of the bias
    sigmas = samplers.karras_sigmas(steps, 0.002, 80.0)
    out, _ = samplers.sample(_gaussian_denoiser, x_T, sigmas, "ddim", jax.random.PRNGKey(1),
                             eta=1.0)
    assert abs(float(out.mean()) - MU) < 0.01  # sampling error of the mean: 0.0035
    std_errors.append(abs(float(out.std()) - math.sqrt(VAR)))
  assert std_errors[1] < 0.01 and std_errors[1] < std_errors[0] / 2.5, std_errors
  again, _ = samplers.sample(_gaussian_denoiser, x_T, sigmas, "ddim", jax.random.PRNGKey(2),
                             eta=1.0)
  assert float(jnp.abs(again - out).max()) > 0.1  # fresh noise with another key
  deterministic, _ = samplers.sample(_gaussian_denoiser, x_T, sigmas, "ddim", eta=0.0)
  euler, _ = samplers.sample(_gaussian_denoiser, x_T, sigmas, "euler")
  np.testing.assert_allclose(deterministic, euler, rtol=1e-6)
  with pytest.raises(ValueError, match="pass a key"):
    samplers.sample(_gaussian_denoiser, x_T, sigmas, "ddim", eta=0.5)


@pytest.mark.parametrize("sampler,steps", [("euler", 5), ("heun", 5), ("ddim", 7)])
def test_the_trajectory_costs_the_stated_number_of_network_evaluations(sampler, steps):
  calls = []

  def counting(x, sigma_B):
    jax.debug.callback(lambda: calls.append(1))
    return _gaussian_denoiser(x, sigma_B)

  x_T = jnp.full((2, 1, 1, 1), 5.0)
  out, path = jax.jit(lambda x: samplers.sample(
      counting, x, samplers.karras_sigmas(steps, 0.002, 80.0), sampler, trajectory=True))(x_T)
  jax.block_until_ready(out)
  assert len(calls) == samplers.number_of_evaluations(sampler, steps)
  assert path.shape == (steps, 2, 1, 1, 1)
  np.testing.assert_allclose(path[-1], out)  # the last estimate is the sample


def test_sigma_grids():
  k = samplers.karras_sigmas(18, 0.002, 80.0)
  assert len(k) == 19 and k[-1] == 0 and np.all(np.diff(k) < 0)
  np.testing.assert_allclose(k[[0, 17]], [80.0, 0.002], rtol=1e-9)
  t = samplers.table_sigmas(DDPM.sigmas, 10)
  assert len(t) == 11 and t[-1] == 0 and np.all(np.diff(t) < 0)
  np.testing.assert_allclose(t[[0, 9]], DDPM.sigmas[[999, 0]])
  np.testing.assert_allclose(samplers.table_sigmas(DDPM.sigmas, 1000)[:-1], DDPM.sigmas[::-1])


def test_classifier_free_guidance_mixes_the_two_denoisers():
  def denoise(x, sigma_B, labels_B):  # the label moves the estimate by its value
    return x + labels_B.astype(jnp.float32)[:, None, None, None]

  x = jnp.zeros((2, 1, 1, 1))
  sigma = jnp.ones((2,))
  labels = jnp.array([1, 2])
  null = 0  # the null label's shift is 0: D_u = x
  for scale, expected in ((1.0, [1, 2]), (0.0, [0, 0]), (3.0, [3, 6])):
    out = samplers.guided(denoise, labels, scale, null)(x, sigma)
    np.testing.assert_allclose(out[:, 0, 0, 0], expected)


def test_make_objective_reads_the_loss_section():
  cfg = ConfigDict(dict(name="edm", timesteps=1000, vlb_draws=4, sigma_data=0.25, p_mean=-1.0,
                        p_std=1.0, sigma_min=0.01, sigma_max=50.0))
  assert diffusion.make_objective(cfg) == diffusion.Edm(0.25, -1.0, 1.0, 0.01, 50.0)
  cfg.name = "ddpm"
  assert diffusion.make_objective(cfg) == diffusion.Ddpm(1000, vlb_draws=4)
  cfg.update(name="flow", logit_mean=0.5, logit_std=0.7)
  assert diffusion.make_objective(cfg) == diffusion.Flow(0.5, 0.7, 0.01, 50.0)
  for name, settings in diffusion.OBJECTIVE_SETTINGS.items():  # each reads its own fields
    fields = {f.name for f in dataclasses.fields(type(diffusion.make_objective(
        ConfigDict({**cfg.to_dict(), "name": name}))))}
    assert fields == set(settings), name


def test_an_oracle_pays_only_the_prior_and_the_decoders_rounding_in_the_bound():
  """With the true noise every KL term is 0, so the bound is L_T plus the decoder's
  -log mass of each pixel's 8-bit bin under N(x0, beta~_2): a closed form (scipy). A
  blind network pays far more."""
  from scipy.stats import norm
  ddpm = diffusion.Ddpm(timesteps=100, vlb_draws=7)
  x0 = jnp.round((_images(jax.random.PRNGKey(4), 64) + 1) * 127.5) / 127.5 - 1  # 8-bit
  x0 = x0.at[0, 0, 0, 0].set(-1.0).at[0, 0, 1, 0].set(1.0)  # the two edge bins too
  dims = 16 * math.log(2)

  def oracle(x_t, t_B, labels):  # solves x_t = sqrt(a) x0 + sqrt(1 - a) n for n
    a = jnp.asarray(ddpm.alpha_bars, jnp.float32)[t_B.astype(jnp.int32)][:, None, None, None]
    return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

  a = np.asarray(ddpm.alpha_bars)
  a_prev = np.concatenate([[1.0], a[:-1]])
  beta = 1 - a / a_prev
  sigma = math.sqrt(beta[1] * (1 - a_prev[1]) / (1 - a[1]))  # the decoder's std
  half_bin = norm.cdf(1 / 255 / sigma)
  x = np.asarray(x0, np.float64)
  nll = np.where(np.abs(x) > 0.999, -np.log(half_bin), -np.log(2 * half_bin - 1))
  prior = 0.5 * (a[-1] * x ** 2 + (1 - a[-1]) - 1 - np.log(1 - a[-1]))
  expected = (nll + prior).sum(axis=(1, 2, 3)) / dims
  exact = np.asarray(ddpm.vlb(oracle, x0, None, jax.random.PRNGKey(5))) / dims
  np.testing.assert_allclose(exact, expected, rtol=1e-4)
  assert expected[0] < expected[1:].mean()  # an edge bin holds more mass
  blind = ddpm.vlb(lambda x, t, y: jnp.zeros_like(x), x0, None, jax.random.PRNGKey(5)) / dims
  assert float(blind.mean()) > float(expected.mean()) + 1.0


def test_stratified_draws_of_the_bound_keep_its_mean_and_cut_its_spread():
  """A network whose predicted noise is off by a constant: each step's term is then the
  same for any noise draw, so the estimate's spread comes from which steps are drawn.
  1 or 10 stratified steps give the same mean (unbiased) and 10 spread far less."""
  x0 = jnp.round((_images(jax.random.PRNGKey(6), 1) + 1) * 127.5) / 127.5 - 1
  dims = 16 * math.log(2)

  def estimates(draws, n):
    ddpm = diffusion.Ddpm(timesteps=100, vlb_draws=draws)
    def off(x_t, t_B, labels):
      a = jnp.asarray(ddpm.alpha_bars, jnp.float32)[t_B.astype(jnp.int32)][:, None, None, None]
      return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a) + 0.3
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    return np.asarray(jax.vmap(lambda k: ddpm.vlb(off, x0, None, k)[0])(keys)) / dims

  one, ten = estimates(1, 4000), estimates(10, 400)
  stderr = math.hypot(one.std() / math.sqrt(len(one)), ten.std() / math.sqrt(len(ten)))
  assert abs(one.mean() - ten.mean()) < 4 * stderr, (one.mean(), ten.mean(), stderr)
  assert ten.std() < 0.3 * one.std(), (one.std(), ten.std())


@pytest.mark.parametrize("objective", [DDPM, EDM, FLOW], ids=["ddpm", "edm", "flow"])
@pytest.mark.parametrize("sampler, steps", [("heun", 18), ("euler", 100)])
def test_each_objectives_own_grid_samples_gaussian_data_from_an_exact_network(objective,
                                                                            sampler, steps):
  """Networks that are exact for N(MU, VAR) data, seen through each objective's own
  wrapping (DDPM: the noise from x_t and the step; EDM: F from c_in x and c_noise; flow:
  the velocity from x_t and t), and
  the objective's own grid (first-order Euler needs more steps than Heun): the samples
  have the data's mean and std, also with the network's output rounded to bfloat16."""
  def ddpm_net(x_vp, t_B, labels):
    sigma = jnp.exp(jnp.interp(t_B, jnp.arange(1000.0), jnp.log(jnp.asarray(DDPM.sigmas,
                                                                            jnp.float32))))
    x = x_vp * jnp.sqrt(1 + sigma ** 2)[:, None, None, None]
    return (x - _gaussian_denoiser(x, sigma)) / sigma[:, None, None, None]

  def edm_net(x_in, c_noise_B, labels):
    sigma = jnp.exp(4 * c_noise_B / diffusion.EDM_NOISE_SCALE)
    c_skip, c_out, c_in, _ = EDM.preconditioning(sigma[:, None, None, None])
    x = x_in / c_in
    return (_gaussian_denoiser(x, sigma) - c_skip * x) / c_out

  def flow_net(x_t, time_B, labels):  # the velocity (x_t - D) / t
    t = time_B / diffusion.FLOW_TIME_SCALE
    sigma = t / (1 - t)
    x = x_t * (1 + sigma)[:, None, None, None]
    return (x_t - _gaussian_denoiser(x, sigma)) / t[:, None, None, None]

  net = {DDPM: ddpm_net, EDM: edm_net, FLOW: flow_net}[objective]
  sigmas = objective.sampling_sigmas(steps)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (4000, 1, 1, 1)) * objective.prior_std(
      float(sigmas[0]))
  for dtype in (jnp.float32, jnp.bfloat16):
    rounded = lambda x, t, y, n=net, d=dtype: n(x, t, y).astype(d).astype(jnp.float32)
    out, _ = samplers.sample(lambda x, s, r=rounded: objective.denoise(r, x, s), x_T, sigmas,
                             sampler)
    assert abs(float(out.mean()) - MU) < 0.05, (dtype, float(out.mean()))
    assert abs(float(out.std()) - math.sqrt(VAR)) < 0.1 * math.sqrt(VAR), (dtype, float(
        out.std()))
