"""The GAN as a family on the shared loop: config, image data, init, one compiled
adversarial step (n_critic discriminator updates, then one generator update, with an EMA
of the generator), a held-out evaluation and sample grids."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from aigc_jax.config import require, require_positive
from aigc_jax.data import images as image_data
from aigc_jax.evaluation import image_quality
from aigc_jax.families import image_sampling
from aigc_jax.models import gan_losses
from aigc_jax.models.gan import GanConfig, build_gan
from aigc_jax.nn.partitioning import constrain, param_names
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.ema import update_ema
from aigc_jax.train.optim import validate_optim
from aigc_jax.train.state import TrainState


def default_config() -> ml_collections.ConfigDict:
  """Every key a GAN run config may set, with its default (a DCGAN on Fashion-MNIST)."""
  c = ml_collections.ConfigDict()
  c.family = "gan"
  c.seed = 0
  c.model = dict(arch="dcgan", image_size=28, channels=1, z_dim=64, width=64, depth=0,
                 g_norm="batch", d_norm="none",
                 g_activation="relu",  # relu | leaky_relu
                 d_kernel=4,  # D's strided convolutions: 4x4 (or 5x5, as TF's DCGAN)
                 d_dropout=0.0,  # dropout after each of D's activations (TF's DCGAN: 0.3)
                 kernel_init="lecun_normal",  # lecun_normal | glorot_uniform (Keras, PyTorch)
                 dtype="float32")  # compute dtype: float32 | bfloat16 | float16
  c.data = image_data.image_data_config()
  c.loss = dict(name="nonsaturating",  # nonsaturating | hinge | wgan
                n_critic=1, gp_weight=0.0, r1_gamma=0.0, label_smoothing=0.0,
                ema_decay=0.999)
  c.train = dict(steps=2000, batch_size=64, log_every=50, eval_every=500, eval_batches=8,
                 checkpoint_every=500, keep_checkpoints=3,
                 **guard.DEFAULTS)
  c.optim = dict(g_lr=2e-4, d_lr=2e-4, b1=0.5, b2=0.999)
  c.sample = dict(num=64)  # images in each sample grid
  # fid_classifier at every evaluation: `samples` generated images (0: off) against the
  # test set, in the features of a classifier trained for `classifier_epochs`, cached in
  # the workdir.
  c.fid = dict(samples=10000, classifier_epochs=2)
  c.mesh = mesh_lib.default_mesh_config()
  return c


def validate(c) -> None:
  GanConfig(**dict(c.model))  # names the bad model field
  gan_losses.check_objective(c.loss.name)
  validate_optim(c)
  require_positive(c, "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                   "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                   "sample.num", "fid.classifier_epochs")
  require(c.fid.samples >= 0, "fid.samples", "must be >= 0 (0: no FID)")
  require(c.fid.samples != 1, "fid.samples", "must be 0 (off) or at least 2")
  require(c.loss.n_critic >= 1, "loss.n_critic", f"must be at least 1, got {c.loss.n_critic}")
  image_data.validate_image_data_config(c)
  require(0 <= c.loss.ema_decay < 1, "loss.ema_decay", "must be in [0, 1)")
  require(0 <= c.loss.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
  require(c.loss.gp_weight >= 0 and c.loss.r1_gamma >= 0, "loss.gp_weight",
          "and loss.r1_gamma must be >= 0")
  require(c.loss.gp_weight == 0 or c.model.d_norm != "batch", "loss.gp_weight",
          "needs a discriminator without batch statistics")


def _split_module(module):
  graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def _merge_module(graphdef, params, stats, train: bool):
  """The module from its pure state, in training or evaluation mode. The graphdef holds
  the mode the module was split in (training), so the mode is set after merging."""
  module = nnx.merge(graphdef, params, stats)
  if train:
    module.train()
  else:
    module.eval()
  return module


def _noise(key: jax.Array, batch: int, z_dim: int) -> jax.Array:
  """z [B, Z] ~ N(0, 1), split over the batch axes like the real images: otherwise every
  device would generate the whole batch of fakes (the same numbers either way)."""
  return constrain(jax.random.normal(key, (batch, z_dim)), ("act_batch", None))


class Family:
  name = "gan"
  plot_keys = ("d_loss", "g_loss", "fid_classifier")

  def __init__(self, config, workdir: str | None):
    self.config, self.workdir = config, workdir
    self.gan_cfg = GanConfig(**dict(config.model))
    abstract_g, abstract_d = nnx.eval_shape(lambda: build_gan(self.gan_cfg, nnx.Rngs(0)))
    self.g_graphdef = nnx.split(abstract_g, nnx.Param, nnx.BatchStat)[0]
    self.d_graphdef = nnx.split(abstract_d, nnx.Param, nnx.BatchStat)[0]
    self._param_names = {"g": param_names(abstract_g), "d": param_names(abstract_d)}
    # float(): a JSON config may hold an int, which JAX would take as int32.
    adam = lambda lr: optax.adam(float(lr), b1=float(config.optim.b1), b2=float(config.optim.b2))
    self.tx_g, self.tx_d = adam(config.optim.g_lr), adam(config.optim.d_lr)
    self.items_per_step = {"images": config.train.batch_size}

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def dataset(self) -> image_data.ImageDataset:
    return image_data.load_image_dataset(self.config.data, self.gan_cfg.image_shape)

  @functools.cached_property
  def train_data(self) -> image_data.ImageBatches:
    return image_data.ImageBatches(self.dataset.train_images, self.dataset.train_labels,
                                   self.config.train.batch_size, self.config.seed,
                                   self.config.data.order)

  def eval_batches(self):
    if not hasattr(self, "_eval_batches"):
      test = image_data.ImageBatches(self.dataset.test_images, self.dataset.test_labels,
                                     self.config.train.batch_size, self.config.seed + 1)
      self._eval_batches = [test.batch(i) for i in range(self.config.train.eval_batches)]
    return self._eval_batches

  # --- model ------------------------------------------------------------------------
  def param_names(self) -> dict:
    """The parameters' logical axis names: {"g": ..., "d": ...} like the parameters."""
    return self._param_names

  def init_state(self, rng: jax.Array) -> TrainState:
    k_model, k_train = jax.random.split(rng)
    g, d = build_gan(self.gan_cfg, nnx.Rngs(params=k_model))
    _, g_params, g_stats = _split_module(g)
    _, d_params, d_stats = _split_module(d)
    params = {"g": g_params, "d": d_params}
    opt_state = {"g": self.tx_g.init(g_params), "d": self.tx_d.init(d_params)}
    extra = {"g_stats": g_stats, "d_stats": d_stats, "ema": g_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=k_train, extra=extra)

  def _generate(self, g_params, g_stats, z_BZ, train: bool):
    g = _merge_module(self.g_graphdef, g_params, g_stats, train)
    images = g(z_BZ)
    return images, nnx.to_pure_dict(nnx.state(g, nnx.BatchStat))

  def _dropout_key(self, rng: jax.Array, i: int) -> jax.Array | None:
    """D's dropout key for update `i` of a step (None without `model.d_dropout`); apart
    from the noise's keys, so a run without dropout draws what it always drew."""
    return jax.random.fold_in(rng, 1_000 + i) if self.gan_cfg.d_dropout > 0 else None

  def _discriminate(self, d_params, d_stats, images, train: bool, dropout_key=None):
    d = _merge_module(self.d_graphdef, d_params, d_stats, train)
    logits = d(images, dropout_key)
    return logits, nnx.to_pure_dict(nnx.state(d, nnx.BatchStat))

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """n_critic discriminator updates on fresh fakes, then one generator update."""
    lc, Z = self.config.loss, self.gan_cfg.z_dim
    real = batch["images"]
    B = real.shape[0]
    rng = jax.random.fold_in(state.rng, state.step)
    g_params, g_stats = state.params["g"], state.extra["g_stats"]

    def d_update(carry, i):
      d_params, d_opt, d_stats = carry
      k_z, k_gp = jax.random.split(jax.random.fold_in(rng, i))
      fake, _ = self._generate(g_params, g_stats, _noise(k_z, B, Z), True)
      fake = jax.lax.stop_gradient(fake)

      def loss_fn(d_params):
        d = _merge_module(self.d_graphdef, d_params, d_stats, train=True)
        k_drop = self._dropout_key(rng, i)
        k_real, k_fake = (None, None) if k_drop is None else jax.random.split(k_drop)
        real_logits, fake_logits = d(real, k_real), d(fake, k_fake)
        loss = gan_losses.d_loss(lc.name, real_logits, fake_logits, lc.label_smoothing)
        penalty = jnp.float32(0.0)
        if lc.gp_weight > 0:  # the penalties read D's statistics, never write them
          penalty = gan_losses.gradient_penalty(d, real, fake, k_gp)
          loss = loss + lc.gp_weight * penalty
        if lc.r1_gamma > 0:
          loss = loss + 0.5 * lc.r1_gamma * gan_losses.r1_penalty(d, real)
        stats = nnx.to_pure_dict(nnx.state(d, nnx.BatchStat))
        return loss, (stats, real_logits.mean(), fake_logits.mean(), penalty)

      (loss, (stats, d_real, d_fake, penalty)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(d_params)
      updates, d_opt = self.tx_d.update(grads, d_opt, d_params)
      metrics = {"d_loss": loss, "d_real": d_real, "d_fake": d_fake, "gp": penalty}
      return (optax.apply_updates(d_params, updates), d_opt, stats), metrics

    # A Python loop, not lax.scan: XLA:CPU runs these convolutions ~7x slower inside a
    # while loop (measured at 28x28, batch 64), and n_critic is small.
    d_carry = (state.params["d"], state.opt_state["d"], state.extra["d_stats"])
    for i in range(lc.n_critic):
      d_carry, d_metrics = d_update(d_carry, i)
    d_params, d_opt, d_stats = d_carry

    z = _noise(jax.random.fold_in(rng, lc.n_critic), B, Z)

    def g_loss_fn(g_params):
      fake, new_g_stats = self._generate(g_params, g_stats, z, True)
      # D as in its own update (dropout on, as TF's DCGAN does), its state read only.
      logits, _ = self._discriminate(d_params, d_stats, fake, False,
                                     self._dropout_key(rng, lc.n_critic))
      return gan_losses.g_loss(lc.name, logits), new_g_stats

    (g_loss, new_g_stats), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_params)
    updates, g_opt = self.tx_g.update(g_grads, state.opt_state["g"], g_params)
    g_params = optax.apply_updates(g_params, updates)
    ema = update_ema(state.extra["ema"], g_params, lc.ema_decay, state.step)
    new_state = state.replace(
        step=state.step + 1, params={"g": g_params, "d": d_params},
        opt_state={"g": g_opt, "d": d_opt},
        extra={"g_stats": new_g_stats, "d_stats": d_stats, "ema": ema})
    metrics = {**d_metrics, "g_loss": g_loss}  # D's metrics from its last update
    return new_state, metrics

  # Noise vectors from which the EMA generator's BatchNorm statistics are measured.
  EMA_STATS_SAMPLES = 1024

  def ema_stats(self, ema_params, g_stats):
    """The BatchNorm statistics that belong to the EMA weights: the batch mean and
    variance of the EMA generator's own activations over EMA_STATS_SAMPLES fixed noise
    vectors. The running averages in the state follow the raw generator's weights (they
    are averaged over its training batches), which the EMA weights' activations do not
    match. Pure and cheap (one forward pass): computed wherever the EMA generator runs."""
    if not jax.tree.leaves(g_stats):  # no BatchNorm (g_norm='none')
      return g_stats
    g = _merge_module(self.g_graphdef, ema_params, g_stats, train=True)
    for _, module in nnx.iter_graph(g):
      if isinstance(module, nnx.BatchNorm):
        module.momentum = 0.0  # the running statistics become this batch's
    z = jax.random.normal(jax.random.PRNGKey(self.config.seed + 5),
                          (self.EMA_STATS_SAMPLES, self.gan_cfg.z_dim))
    g(constrain(z, ("act_batch", None)))
    return nnx.to_pure_dict(nnx.state(g, nnx.BatchStat))

  def eval_step(self, state: TrainState, batch) -> dict:
    """The discriminator's loss on held-out real images against fakes of the EMA
    generator (summed over examples)."""
    real = batch["images"]
    B = real.shape[0]
    z = jax.random.normal(jax.random.PRNGKey(self.config.seed + 7), (B, self.gan_cfg.z_dim))
    stats = self.ema_stats(state.extra["ema"], state.extra["g_stats"])
    fake, _ = self._generate(state.extra["ema"], stats, z, False)
    d_params, d_stats = state.params["d"], state.extra["d_stats"]
    real_logits, _ = self._discriminate(d_params, d_stats, real, False)
    fake_logits, _ = self._discriminate(d_params, d_stats, fake, False)
    name = self.config.loss.name
    return {"d_loss_sum": gan_losses.d_loss(name, real_logits, fake_logits) * B,
            "g_loss_sum": gan_losses.g_loss(name, fake_logits) * B, "count": jnp.float32(B)}

  def summarize_eval(self, sums: dict) -> dict:
    return {"val_d_loss": sums["d_loss_sum"] / sums["count"],
            "val_g_loss": sums["g_loss_sum"] / sums["count"]}

  @functools.cached_property
  def fid_evaluator(self):
    from aigc_jax.evaluation.classifier_fid import load_or_train
    cache = None if self.workdir is None else os.path.join(self.workdir, "fid_classifier")
    return load_or_train(self.dataset, cache, num_samples=self.config.fid.samples,
                         epochs=self.config.fid.classifier_epochs, seed=self.config.seed)

  def sample_metrics(self, state: TrainState) -> dict:
    """The EMA generator's samples (fixed noise) judged by `image_quality.sample_quality`:
    fid_classifier with its floor, the classes they fall in, their texture."""
    if self.config.fid.samples == 0:
      return {}
    images = self.sample_images(state, self.fid_evaluator.num_samples,
                                seed=self.config.seed + 11)
    return image_quality.sample_quality(self.fid_evaluator, images, self.dataset,
                                        self._data_texture)

  @functools.cached_property
  def _data_texture(self) -> dict[int, float]:
    return image_quality.data_texture(self.dataset)

  # --- samples ----------------------------------------------------------------------
  SAMPLE_CHUNK = 500  # images per compiled generator call, so memory stays bounded

  def sample_images(self, state: TrainState, num: int, seed: int) -> np.ndarray:
    """uint8 [num, H, W, C] from the EMA generator with its own BatchNorm statistics
    (`ema_stats`; the same images for a seed, however many are drawn at a time)."""
    stats = self._ema_stats_fn(state.extra["ema"], state.extra["g_stats"])
    z = jax.random.normal(jax.random.PRNGKey(seed), (num, self.gan_cfg.z_dim))
    chunk = min(num, self.SAMPLE_CHUNK)
    out = []
    for start in range(0, num, chunk):
      z_chunk = z[start:start + chunk]
      n = z_chunk.shape[0]
      if n < chunk:  # pad, so one compilation serves every chunk
        z_chunk = jnp.concatenate([z_chunk, jnp.zeros((chunk - n, z.shape[1]))])
      out.append(np.asarray(self._sample_fn(state.extra["ema"], stats, z_chunk))[:n])
    return np.concatenate(out)

  @functools.cached_property
  def _ema_stats_fn(self):
    return jax.jit(self.ema_stats)

  @functools.cached_property
  def _sample_fn(self):
    # One jitted function per family, so every evaluation reuses its compilation.
    def sample(params, stats, z):
      images = self._generate(params, stats, z, False)[0]
      return jnp.round((images + 1) * 127.5).clip(0, 255).astype(jnp.uint8)
    return jax.jit(sample)

  CLI_SAMPLE_OPTIONS = image_sampling.CLI_SAMPLE_OPTIONS

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: a grid of `num` images from the EMA generator, as a PNG (--out,
    or WORKDIR/samples/sample_NUM_seedSEED.png)."""
    num = image_sampling.sample_count(options, self.config.sample.num)
    seed, out = image_sampling.sample_seed(options), options.get("out")
    path = image_sampling.sample_path(out, workdir, f"sample_{num}_seed{seed}.png")
    image_sampling.write_sample_grid(self.sample_images(state, num, seed), path,
                                     is_out=out is not None)
    return f"wrote {num} samples to {path}"

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    """A grid from the same fixed noise at every evaluation, so progress can be watched."""
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    images = self.sample_images(state, self.config.sample.num, seed=self.config.seed)
    return [image_data.write_grid(images, os.path.join(out_dir, f"step_{step:07d}.png"))]

