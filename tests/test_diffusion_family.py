"""The diffusion family on the shared loop: one compiled step with an EMA, sampling that
improves with training on real digits, deterministic and invertible DDIM, conditioning
and guidance, and one clear error for each bad setting or sampling flag."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.families.diffusion import Family
from aigc_jax.models import diffusion_samplers as samplers
from aigc_jax.train.loop import prepare_config
from tests.conftest import DIFFUSION_CONFIG, DIT_CONFIG, run_cli


@pytest.fixture
def config():
  return config_from_file(DIFFUSION_CONFIG)


def changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                       strict=True))


@pytest.mark.parametrize("objective", ["edm", "ddpm"])
def test_one_step_updates_the_weights_and_the_ema_and_compiles_once(config, objective):
  config.loss.name = objective
  config.model.dropout = 0.1
  family = Family(config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  traces = []

  def counted(state, batch):
    traces.append(1)
    return family.train_step(state, batch)

  step = jax.jit(counted)
  new = state
  for _ in range(2):  # the warm-up's learning rate is 0 at step 0
    new, metrics = step(new, next(family.train_data))
  assert changed(state.params, new.params) and changed(state.extra["ema"], new.extra["ema"])
  assert int(new.step) == 2 and np.isfinite(float(metrics["loss"]))
  for _ in range(3):
    new, metrics = step(new, next(family.train_data))
  assert len(traces) == 1


def train_tiny(objective: str, steps: int = 400, config_file: str = DIFFUSION_CONFIG):
  """The tiny model trained with `objective` for `steps` steps on the digits (EMA 0.99):
  (family, state, sample metrics before, after)."""
  config = config_from_file(config_file, {"train.steps": steps,  # the lr schedule's
                                          "loss.name": objective})
  family = Family(config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  before = family.sample_metrics(state)
  step = jax.jit(family.train_step)
  for _ in range(steps):
    state, _ = step(state, next(family.train_data))
  return family, state, before, family.sample_metrics(state)


@pytest.fixture(scope="module")
def trained():
  """The tiny EDM model after 400 steps, its family and sample metrics before and after."""
  return train_tiny("edm")


def test_a_short_run_on_real_digits_lowers_fid_several_fold(trained):
  _, _, before, after = trained
  assert after["fid_floor"] == before["fid_floor"]
  assert after["fid_classifier"] < 0.25 * before["fid_classifier"], (before, after)
  assert after["fid_classifier"] > after["fid_floor"]
  assert after["nfe"] == 11  # heun, 6 steps
  # Conditioning, 400 steps in: above chance (0.1) unguided, every class drawn.
  assert after["class_accuracy"] > 0.2 and after["class_share_min_ratio"] > 0.3, after


def test_flow_matching_on_real_digits_lowers_fid_several_fold():
  """The same model and sampler (Heun on EDM's grid) trained with flow matching."""
  _, _, before, after = train_tiny("flow")
  assert after["fid_classifier"] < 0.25 * before["fid_classifier"], (before, after)
  assert after["class_accuracy"] > 0.2 and after["class_share_min_ratio"] > 0.3, after


def test_a_dit_on_real_digits_lowers_fid_several_fold_and_follows_the_class():
  """The transformer denoiser (38k parameters, 16 patch tokens) on the same loop."""
  _, _, before, after = train_tiny("edm", 1000, DIT_CONFIG)
  assert after["fid_classifier"] < 0.25 * before["fid_classifier"], (before, after)
  assert after["class_accuracy"] > 0.3 and after["class_share_min_ratio"] > 0.3, after


def test_ddim_without_noise_is_deterministic_and_invertible(trained):
  family, state, _, _ = trained
  params = state.extra["ema"]
  model = family.graphdef
  from flax import nnx
  denoise = lambda x, s: family.objective.denoise(
      family._network(nnx.merge(model, params)), x, s, None if not family.net_cfg.num_classes
      else jnp.full((x.shape[0],), family.null_label))
  x0 = jnp.asarray(family.eval_batches()[0]["images"][:8])
  errors = []
  for steps in (10, 40):
    # DDIM (eta 0) run backwards from the data at sigma_min up to sigma_max, then down.
    grid = samplers.karras_sigmas(steps, 0.002, 80.0)[:-1]  # no 0: both ends finite
    up, _ = samplers.sample(denoise, x0, grid[::-1], "ddim")
    down, _ = samplers.sample(denoise, up, grid, "ddim")
    again, _ = samplers.sample(denoise, up, grid, "ddim")
    np.testing.assert_array_equal(down, again)  # deterministic
    errors.append(float(jnp.abs(down - x0).mean()))
  # Up to discretisation: the round trip lands near the data, closer with more steps.
  assert errors[1] < errors[0] and errors[1] < 0.1, errors


def test_samples_follow_the_seed_and_the_asked_class(trained):
  family, state, _, _ = trained
  a, _ = family.sample_images(state.extra["ema"], 6, seed=3)
  b, _ = family.sample_images(state.extra["ema"], 6, seed=3)
  c, _ = family.sample_images(state.extra["ema"], 6, seed=4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Classifier-free guidance sharpens the conditioning: more of the asked class.
  shares = []
  for guidance in (1.0, 3.0):
    sevens, _ = family.sample_images(state.extra["ema"], 100, seed=0,
                                     labels=np.full(100, 7), guidance=guidance)
    shares.append(np.mean(family.fid_evaluator.predict(sevens) == 7))
  assert shares[1] > 0.5 and shares[1] > shares[0] + 0.15, shares
  # DDPM-style stochastic sampling draws other images from the same start.
  d, _ = family.sample_images(state.extra["ema"], 6, seed=3, sampler="ddim", eta=1.0, steps=20)
  assert d.shape == a.shape and not np.array_equal(a, d)


@pytest.mark.parametrize("key, value, message", [
    ("loss.name", "vp", "'loss.name' must be one of"),
    ("model.image_size", 9, "model.image_size"),
    ("model.channel_mults", (1, 2, 2, 2, 2), "model.image_size"),
    ("loss.timesteps", 500, "'loss.timesteps' is not used by loss.name='edm'"),
    ("sample.eta", 0.5, "'sample.eta' is DDIM's"),
    ("sample.sampler", "dpm", "'sample.sampler' must be one of"),
    ("sample.steps", 0, "'sample.steps' must be positive"),
    ("fid.steps_sweep", (10, 0), "'fid.steps_sweep' must list"),
    ("loss.sigma_max", 0.001, "'loss.sigma_max'"),
    ("loss.timesteps", 1, "'loss.timesteps' must be an integer >= 2"),
    ("loss.logit_mean", 0.5, "'loss.logit_mean' is not used by loss.name='edm'"),
    ("loss.logit_std", 0.0, "'loss.logit_std' must be positive"),
    ("loss.vlb_draws", 0, r"'loss.vlb_draws' must be an integer in \[1, loss.timesteps\]"),
    ("loss.vlb_draws", 4, "'loss.vlb_draws' is not used by loss.name='edm'"),
])
def test_bad_configs(config, key, value, message):
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(UserError, match=message):
    prepare_config(config)


def test_settings_an_unconditional_ddpm_or_flow_model_does_not_read_are_refused(config):
  config.model.num_classes = 0
  config.loss.label_dropout = 0.0  # its default (0.1) is for conditional models
  with pytest.raises(UserError, match="'loss.label_dropout' is not used by an unconditional"):
    prepare_config(config)
  config.loss.label_dropout = 0.1
  config.sample.guidance = 2.0
  with pytest.raises(UserError, match="'sample.guidance' needs a class-conditional model"):
    prepare_config(config)
  config = config_from_file(DIFFUSION_CONFIG, {"loss.label_dropout": 0.0,
                                               "sample.guidance": 2.0})
  with pytest.raises(UserError, match="'sample.guidance' needs loss.label_dropout > 0"):
    prepare_config(config)
  config = config_from_file(DIFFUSION_CONFIG, {"loss.name": "ddpm", "loss.p_mean": -1.0})
  with pytest.raises(UserError, match="'loss.p_mean' is not used by loss.name='ddpm'"):
    prepare_config(config)
  config = config_from_file(DIFFUSION_CONFIG, {"loss.name": "flow", "loss.timesteps": 500})
  with pytest.raises(UserError, match="'loss.timesteps' is not used by loss.name='flow'"):
    prepare_config(config)
  config = config_from_file(DIFFUSION_CONFIG, {"loss.name": "flow", "loss.sigma_max": 500.0,
                                               "loss.logit_std": 1.5})
  prepare_config(config)  # flow reads the sampling range and its own time distribution


def test_settings_the_other_architecture_reads_are_refused(config):
  config.model.patch_size = 4
  with pytest.raises(UserError, match="'model.patch_size' is not used by model.arch='unet'"):
    prepare_config(config)
  dit = config_from_file(DIT_CONFIG, {"model.width": 32})
  with pytest.raises(UserError, match="'model.width' is not used by model.arch='dit'"):
    prepare_config(dit)
  dit = config_from_file(DIT_CONFIG, {"model.arch": "vit"})
  with pytest.raises(UserError, match="'model.arch' must be one of"):
    prepare_config(dit)
  dit = config_from_file(DIT_CONFIG, {"model.patch_size": 3})
  with pytest.raises(UserError, match="not divisible by model.patch_size=3"):
    prepare_config(dit)


def test_a_dataset_with_other_classes_is_refused(config):
  config.model.num_classes = 5
  with pytest.raises(UserError, match="'model.num_classes' is 5 but dataset 'digits' has 10"):
    _ = Family(config, None).dataset


@pytest.mark.sharded
def test_cli_train_sample_eval_and_bad_flags(tmp_path):
  workdir = str(tmp_path / "diffusion")
  trained = run_cli("train", "--config", DIFFUSION_CONFIG, "--workdir", workdir)
  assert trained.returncode == 0, trained.stderr[-3000:]
  samples = tmp_path / "diffusion" / "samples"
  assert (samples / "step_0000020.png").exists()
  assert (samples / "trajectory_step_0000020.png").exists()
  sample = run_cli("sample", "--workdir", workdir, "--num", "9", "--seed", "4", "--steps", "3",
                   "--class", "2", "--guidance", "1.5")
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "heun, 3 steps, NFE 5, guidance 1.5" in sample.stdout
  assert (samples / "sample_9_seed4_class2.png").exists()
  evaluation = run_cli("eval", "--workdir", workdir)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
  summary = json.loads(trained.stdout)
  assert metrics["step"] == 20
  for key in ("val_loss", "fid_floor"):
    assert summary[key] == metrics[key], key  # eval of the checkpoint == the run's last eval
  # The samples come from 11 denoiser calls on the restored state, which may sit on another
  # device layout (8 devices): float rounding may differ, the figures may not.
  assert metrics["fid_classifier"] == pytest.approx(summary["fid_classifier"], rel=1e-3)
  assert abs(metrics["class_accuracy"] - summary["class_accuracy"]) <= 3 / 359
  for flags, message in [
      (["--steps", "0"], "--steps must be at least 1"),
      (["--class", "10"], r"--class must be a class id in \[0, 10\), got 10"),
      (["--sampler", "heun", "--eta", "0.5"], "--eta is DDIM's: add --sampler ddim"),
      (["--sampler", "plms"], "--sampler must be one of"),
      (["--prompt", "hi"], "--prompt does not apply to a diffusion run"),
  ]:
    proc = run_cli("sample", "--workdir", workdir, *flags)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1] or \
        __import__("re").search(message, proc.stderr), (flags, proc.stderr[-500:])


def test_sample_grids_hold_one_class_per_row(config):
  family = Family(config, None)
  labels, cols = family.grid_labels(20)  # the tiny config's sample.num; 10 classes
  assert cols == 2 and labels.reshape(10, 2).tolist() == [[c, c] for c in range(10)]
  labels, cols = family.grid_labels(25)  # the remainder: the classes in turn
  assert len(labels) == 25 and labels[20:].tolist() == [0, 1, 2, 3, 4]
  config.model.num_classes = 0
  config.loss.label_dropout = 0.1
  assert Family(config, None).grid_labels(16) == (None, None)
