"""The GAN family on the shared loop: the adversarial step, errors, and the CLI."""

import json

import jax
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.families.gan import Family
from aigc_jax.train.loop import prepare_config
from tests.conftest import GAN_CONFIG, run_cli


@pytest.fixture
def gan_config():
  return config_from_file(GAN_CONFIG)


def changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                       strict=True))


@pytest.mark.parametrize("loss, extra, d_norm", [
    ("nonsaturating", {}, "none"), ("hinge", {"n_critic": 2}, "none"),
    ("wgan", {"n_critic": 3, "gp_weight": 10.0}, "layer"),
    ("wgan", {"n_critic": 2, "gp_weight": 10.0, "r1_gamma": 1.0}, "spectral")])
def test_one_step_updates_both_players_and_the_ema(gan_config, loss, extra, d_norm):
  gan_config.loss.update(name=loss, **extra)
  gan_config.model.d_norm = d_norm
  family = Family(gan_config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  traces = []

  def counted(state, batch):
    traces.append(1)
    return family.train_step(state, batch)

  step = jax.jit(counted)
  new, metrics = step(state, next(family.train_data))
  assert changed(state.params["g"], new.params["g"]) and changed(state.params["d"],
                                                                 new.params["d"])
  assert changed(state.extra["ema"], new.extra["ema"])
  assert changed(state.extra["g_stats"], new.extra["g_stats"])  # BatchNorm statistics
  # The spectral norm's u: D's training-mode calls update it (the penalties only read it).
  assert changed(state.extra["d_stats"], new.extra["d_stats"]) == (d_norm == "spectral")
  assert int(new.step) == 1 and np.isfinite(float(metrics["d_loss"]))
  if loss == "wgan":
    assert float(metrics["gp"]) > 0
  for _ in range(3):
    new, metrics = step(new, next(family.train_data))
  assert len(traces) == 1  # compiled once


def test_discriminator_learns_to_tell_real_from_fake(gan_config):
  """With G frozen (lr ~ 0), D's logits for real images rise above those for fakes."""
  gan_config.optim.update(g_lr=1e-12, d_lr=1e-3)
  family = Family(gan_config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(1))
  step = jax.jit(family.train_step)
  for _ in range(40):
    state, metrics = step(state, next(family.train_data))
  assert float(metrics["d_real"]) > float(metrics["d_fake"]) + 1.0
  assert float(metrics["d_loss"]) < 2 * np.log(2)  # better than chance


@pytest.mark.parametrize("key, value, message", [
    ("loss.name", "hinj", "did you mean 'hinge'"),
    ("loss.n_critic", 0, "'loss.n_critic' must be at least 1"),
    ("model.d_norm", "batch", "'model.d_norm' must be one of"),
    ("model.image_size", 30, "'model.image_size'=30 is not supported"),
    ("data.name", "cifar", "'data.name' must be one of"),
    ("data.name", "tfds", "'data.tfds_name' must name a prepared tfds image dataset"),
    ("fid.samples", 1, "'fid.samples' must be 0"),
])
def test_bad_configs(gan_config, key, value, message):
  section, leaf = key.split(".")
  gan_config[section][leaf] = value
  with pytest.raises(UserError, match=message):
    prepare_config(gan_config)


def test_images_of_the_wrong_shape_for_the_model(gan_config):
  gan_config.model.image_size = 28
  with pytest.raises(UserError, match=r"shape \(8, 8, 1\).*model.image_size=8"):
    next(Family(gan_config, None).train_data)


@pytest.mark.sharded
def test_cli_train_sample_eval(tmp_path):
  workdir = str(tmp_path / "gan")
  trained = run_cli("train", "--config", GAN_CONFIG, "--workdir", workdir)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert (tmp_path / "gan" / "samples" / "step_0000020.png").exists()
  assert (tmp_path / "gan" / "plots" / "loss.png").exists()
  sample = run_cli("sample", "--workdir", workdir, "--num", "9", "--seed", "4")
  assert sample.returncode == 0, sample.stderr[-3000:]
  from PIL import Image
  grid = Image.open(tmp_path / "gan" / "samples" / "sample_9_seed4.png")
  assert grid.size[0] >= 3 * 8
  evaluation = run_cli("eval", "--workdir", workdir)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
  summary = json.loads(trained.stdout)
  assert metrics["step"] == 20
  for key in ("val_d_loss", "fid_classifier", "fid_floor", "classifier_test_accuracy"):
    assert summary[key] == metrics[key], key  # eval of the checkpoint == the run's last eval
  assert metrics["fid_floor"] < metrics["fid_classifier"]
  assert (tmp_path / "gan" / "fid_classifier").is_dir()  # the classifier is cached


def test_ema_decay_warms_up_then_holds():
  from aigc_jax.train.ema import ema_decay
  decays = [float(ema_decay(0.999, jax.numpy.int32(s))) for s in (0, 10, 100, 100000)]
  assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(11 / 20)
  assert decays[2] == pytest.approx(101 / 110) and decays[3] == pytest.approx(0.999)


def test_the_ema_generator_normalises_with_its_own_batchnorm_statistics(gan_config):
  """The EMA weights' statistics (`ema_stats`) are the batch statistics of the EMA
  generator's own activations: in evaluation mode it reproduces its training-mode output
  on those noise vectors. The raw generator's running statistics (what evaluation used
  before) do not: they belong to other weights."""
  family = Family(gan_config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  train_step = jax.jit(family.train_step)
  for i in range(30):  # raw running statistics of a generator that has trained
    state, _ = train_step(state, family.train_data.batch(i))
  # An average of the weights that differs from the raw ones, as an EMA does.
  ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.extra["ema"], state.params["g"])
  stats = jax.jit(family.ema_stats)(ema, state.extra["g_stats"])
  z = jax.random.normal(jax.random.PRNGKey(gan_config.seed + 5),
                        (family.EMA_STATS_SAMPLES, gan_config.model.z_dim))
  with_batch_stats, _ = family._generate(ema, stats, z, True)
  with_own_stats, _ = family._generate(ema, stats, z, False)
  with_raw_stats, _ = family._generate(ema, state.extra["g_stats"], z, False)
  error = lambda a: float(np.abs(np.asarray(a) - np.asarray(with_batch_stats)).max())
  assert error(with_own_stats) < 2e-5
  assert error(with_raw_stats) > 0.01 and error(with_raw_stats) > 300 * error(with_own_stats)
  # Samples use them: the grid equals the EMA generator normalised by its own statistics.
  state = state.replace(extra={**state.extra, "ema": ema})
  images = family.sample_images(state, 8, seed=3)
  z8 = jax.random.normal(jax.random.PRNGKey(3), (8, gan_config.model.z_dim))
  expected = family._generate(ema, stats, z8, False)[0]
  np.testing.assert_array_equal(images, np.round((np.asarray(expected) + 1) * 127.5)
                                .clip(0, 255).astype(np.uint8))


def test_recipe_options_dropout_kernel_activation_and_epoch_order(gan_config):
  """The classic DCGAN's choices as options: D dropout (a pure function of the step's
  key: the same step twice is bit-identical, and it changes D's outputs), 5x5 kernels in
  D, LeakyReLU in G, and shuffled epochs (every training image once per epoch)."""
  from aigc_jax.data.images import ImageBatches
  gan_config.model.update(d_dropout=0.3, d_kernel=5, g_activation="leaky_relu")
  gan_config.data.order = "epochs"
  prepare_config(gan_config)
  family = Family(gan_config, None)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  assert state.params["d"]["convs"][0]["kernel"].shape[:2] == (5, 5)
  step = jax.jit(family.train_step)
  batch = family.train_data.batch(0)
  (a, metrics), (b, _) = step(state, batch), step(state, batch)
  assert not changed(a.params, b.params) and np.isfinite(float(metrics["d_loss"]))
  images = batch["images"]
  plain, _ = family._discriminate(state.params["d"], state.extra["d_stats"], images, False)
  dropped, _ = family._discriminate(state.params["d"], state.extra["d_stats"], images, False,
                                    jax.random.PRNGKey(1))
  assert not np.allclose(plain, dropped)
  # Epochs: batch rows are a fresh permutation of every index each epoch.
  size, per_batch = 40, 8
  order = ImageBatches(family.dataset.train_images[:size], np.arange(size), per_batch,
                       seed=3, order="epochs")
  epochs = [np.concatenate([order.batch(e * 5 + i)["labels"] for i in range(5)])
            for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(size))
  assert list(epochs[0]) != list(epochs[1])


def test_kernel_init_option_sets_every_kernels_scale(gan_config):
  """model.kernel_init='glorot_uniform' (Keras' and PyTorch-DCGAN's scale) reaches every
  kernel: the projection's spread follows 2 / (fan_in + fan_out), not flax's 1 / fan_in."""
  from flax import nnx

  from aigc_jax.models.gan import GanConfig, build_gan
  spread = {}
  for name in ("lecun_normal", "glorot_uniform"):
    gan_config.model.kernel_init = name
    prepare_config(gan_config)
    g, d = build_gan(GanConfig(**dict(gan_config.model)), nnx.Rngs(0))
    kernel = np.asarray(g.project.kernel[...])
    spread[name] = float(kernel.std())
    fan_in, fan_out = kernel.shape
  assert np.isclose(spread["lecun_normal"], 1 / np.sqrt(fan_in), rtol=0.05)
  assert np.isclose(spread["glorot_uniform"], np.sqrt(2 / (fan_in + fan_out)), rtol=0.05)
