"""Diffusion as a family on the shared loop: a U-Net or DiT denoiser (`model.arch`) trained
with DDPM's, EDM's or flow matching's objective (`loss.name`), one compiled step with an
EMA of the weights, class conditioning with label dropout for classifier-free guidance,
compiled samplers (Euler, Heun, DDIM), and the image families' sample figures
(fid_classifier, class shares, texture).

Batches from the loop hold images in [-1, 1] and their labels; the EMA weights make every
sample and evaluation figure.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from aigc_jax.config import require, require_finite_range, require_positive
from aigc_jax.data import images as image_data
from aigc_jax.errors import UserError
from aigc_jax.evaluation import image_quality
from aigc_jax.families.diffusion_sampling import DiffusionSampling
from aigc_jax.models import diffusion as objectives
from aigc_jax.models import diffusion_samplers as samplers
from aigc_jax.models.dit import DiT, DiTConfig
from aigc_jax.models.unet import UNet, UNetConfig
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.ema import update_ema
from aigc_jax.train.optim import adamw, validate_optim
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_supervised_step


def default_config() -> ml_collections.ConfigDict:
  """Every key a diffusion run config may set, with its default (a class-conditional
  EDM U-Net on Fashion-MNIST)."""
  c = ml_collections.ConfigDict()
  c.family = "diffusion"
  c.seed = 0
  c.model = dict(arch="unet",  # unet | dit
                 image_size=28, channels=1, head_dim=32, dropout=0.1,
                 num_classes=10,  # 0: unconditional
                 attention="einsum", dtype="float32",
                 # unet: widths and depth per level, attention levels, GroupNorm groups
                 width=64, channel_mults=(1, 2, 2), blocks_per_level=2, attention_levels=(2,),
                 groups=32,
                 # dit: patch size, token width, blocks, SwiGLU width
                 patch_size=2, dim=256, depth=6, mlp_dim=1024)
  c.data = image_data.image_data_config()
  c.loss = dict(name="edm",  # edm | ddpm | flow
                timesteps=1000,  # ddpm: steps of the cosine schedule
                vlb_draws=16,  # ddpm: steps per image of the bound's estimate at evaluation
                # edm: data std, log-normal training noise levels
                sigma_data=0.5, p_mean=-1.2, p_std=1.2,
                logit_mean=0.0, logit_std=1.0,  # flow: logit-normal training times
                sigma_min=0.002, sigma_max=80.0,  # edm and flow: the sampling range
                label_dropout=0.1,  # share of training labels replaced by "no label"
                ema_decay=0.999)
  c.train = dict(steps=6000, batch_size=128, log_every=100, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000, keep_checkpoints=3, **guard.DEFAULTS)
  c.optim = dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=200, weight_decay=0.0, b1=0.9,
                 b2=0.999, eps=1e-8, grad_clip=1.0)
  # Samples at every evaluation and from `aigc-jax sample`: sampler and steps (NFE: heun
  # 2 x steps - 1, else steps), DDIM's eta, guidance scale (1: the conditional model
  # alone), rho (the spacing of the noise levels, as EDM's).
  c.sample = dict(num=100, sampler="heun", steps=18, eta=0.0, guidance=1.0, rho=7.0)
  # fid_classifier at every evaluation (shared with the GAN: same classifier and sample
  # count give comparable figures); at the last evaluation also at each of `steps_sweep`
  # sampling steps (FID against NFE).
  c.fid = dict(samples=10000, classifier_epochs=2, steps_sweep=())
  c.mesh = mesh_lib.default_mesh_config()
  return c


# The networks by model.arch: (config class, module class).
ARCHITECTURES = {"unet": (UNetConfig, UNet), "dit": (DiTConfig, DiT)}


def network_config(model_cfg) -> UNetConfig | DiTConfig:
  """The network of a `model` section: the fields its `arch` reads (a field only the
  other architecture reads, set away from its default, is an error)."""
  arch = model_cfg.arch
  require(arch in ARCHITECTURES, "model.arch",
          f"must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
  config_class = ARCHITECTURES[arch][0]
  read = {f.name for f in dataclasses.fields(config_class)}
  defaults = default_config().model
  for name, value in dict(model_cfg).items():
    if name != "arch" and name not in read:
      require(not _differs(value, defaults[name]), f"model.{name}",
              f"is not used by model.arch={arch!r}: drop it")
  return config_class(**{k: v for k, v in dict(model_cfg).items() if k in read})


def _differs(value, default) -> bool:
  if isinstance(default, (list, tuple)):
    return list(value) != list(default)
  return value != default


def _set(c, dotted: str) -> bool:
  """Whether a dotted setting differs from its default."""
  default, value = default_config(), c
  for part in dotted.split("."):
    default, value = default[part], value[part]
  return _differs(value, default)


def validate(c) -> None:
  network_config(c.model)  # names the bad model field
  require(c.loss.name in objectives.OBJECTIVES, "loss.name",
          f"must be one of {objectives.OBJECTIVES}, got {c.loss.name!r}")
  image_data.validate_image_data_config(c)
  validate_optim(c)
  require_positive(c, "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                   "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                   "sample.num", "sample.steps", "fid.classifier_epochs",
                   "loss.sigma_data", "loss.p_std", "loss.logit_std", "loss.sigma_min",
                   "sample.rho")
  require(c.fid.samples >= 0 and c.fid.samples != 1, "fid.samples",
          "must be 0 (off) or at least 2")
  require(all(isinstance(s, int) and s >= 1 for s in c.fid.steps_sweep), "fid.steps_sweep",
          f"must list sampling steps >= 1, got {c.fid.steps_sweep!r}")
  require(c.sample.sampler in samplers.SAMPLERS, "sample.sampler",
          f"must be one of {samplers.SAMPLERS}, got {c.sample.sampler!r}")
  require(isinstance(c.loss.timesteps, int) and c.loss.timesteps >= 2, "loss.timesteps",
          f"must be an integer >= 2, got {c.loss.timesteps!r}")
  require(isinstance(c.loss.vlb_draws, int) and 1 <= c.loss.vlb_draws <= c.loss.timesteps,
          "loss.vlb_draws", f"must be an integer in [1, loss.timesteps], got "
          f"{c.loss.vlb_draws!r}")
  require_finite_range(c, "loss.ema_decay", 0, 1, hi_open=True)
  require_finite_range(c, "loss.label_dropout", 0, 1, hi_open=True)
  require_finite_range(c, "loss.p_mean", -10, 10)
  require_finite_range(c, "loss.logit_mean", -10, 10)
  require_finite_range(c, "loss.sigma_max", c.loss.sigma_min, None, lo_open=True)
  require_finite_range(c, "sample.eta", 0, 1)
  require_finite_range(c, "sample.guidance", 0, None)
  read = objectives.OBJECTIVE_SETTINGS[c.loss.name]
  for name in sorted({f for fields in objectives.OBJECTIVE_SETTINGS.values() for f in fields}):
    require(name in read or not _set(c, f"loss.{name}"), f"loss.{name}",
            f"is not used by loss.name={c.loss.name!r}: drop it")
  require(c.sample.sampler == "ddim" or not _set(c, "sample.eta"), "sample.eta",
          f"is DDIM's: it is not used by sample.sampler={c.sample.sampler!r}")
  if c.model.num_classes == 0:
    require(not _set(c, "loss.label_dropout"), "loss.label_dropout",
            "is not used by an unconditional model (model.num_classes=0): drop it")
    require(c.sample.guidance == 1.0, "sample.guidance",
            "needs a class-conditional model (model.num_classes > 0)")
  require(c.sample.guidance == 1.0 or c.loss.label_dropout > 0, "sample.guidance",
          "needs loss.label_dropout > 0: guidance mixes in the 'no label' prediction, "
          "which only label dropout trains")


class Family(DiffusionSampling):
  name = "diffusion"
  plot_keys = ("loss", "val_loss", "fid_classifier")

  def __init__(self, config, workdir: str | None):
    self.config, self.workdir = config, workdir
    self.net_cfg = network_config(config.model)
    self.network_class = ARCHITECTURES[config.model.arch][1]
    self.objective = objectives.make_objective(config.loss)
    abstract = nnx.eval_shape(lambda: self.network_class(self.net_cfg, rngs=nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract)[0]
    self._param_names = param_names(abstract)
    self.tx, self.schedule = adamw(config.optim, config.train.steps)
    self._step = make_supervised_step(self.graphdef, self._loss, self.tx, self.schedule)
    self.items_per_step = {"images": config.train.batch_size}

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def dataset(self) -> image_data.ImageDataset:
    dataset = image_data.load_image_dataset(self.config.data, self.net_cfg.image_shape)
    classes = self.net_cfg.num_classes
    if classes and dataset.num_classes != classes:
      raise UserError(f"config 'model.num_classes' is {classes} but dataset "
                      f"{dataset.name!r} has {dataset.num_classes} classes: set "
                      f"model.num_classes={dataset.num_classes} (or 0: unconditional)")
    return dataset

  @functools.cached_property
  def train_data(self) -> image_data.ImageBatches:
    return image_data.ImageBatches(self.dataset.train_images, self.dataset.train_labels,
                                   self.config.train.batch_size, self.config.seed,
                                   self.config.data.order)

  def batch_spec(self) -> dict:
    """One global training batch's shapes (for the memory planner), without reading data."""
    B = self.config.train.batch_size
    return {"images": jax.ShapeDtypeStruct((B, *self.net_cfg.image_shape), jnp.float32),
            "labels": jax.ShapeDtypeStruct((B,), jnp.int32)}

  def eval_batches(self):
    """The first train.eval_batches x batch_size test images with their labels and
    positions; each image's noise is drawn from its position."""
    if not hasattr(self, "_eval_batches"):
      self._eval_batches = image_data.indexed_test_batches(
          self.dataset, self.config.train.batch_size, self.config.train.eval_batches,
          with_labels=True)
    return self._eval_batches

  # --- model ------------------------------------------------------------------------
  def param_names(self) -> dict:
    return self._param_names

  def init_state(self, rng: jax.Array) -> TrainState:
    k_model, k_train = jax.random.split(rng)
    params = nnx.to_pure_dict(nnx.state(self.network_class(self.net_cfg,
                                                               rngs=nnx.Rngs(params=k_model))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=k_train, extra={"ema": params})

  @property
  def null_label(self) -> int:
    """The label id meaning "no label" (the network's last label row)."""
    return self.net_cfg.num_classes

  def _network(self, model: UNet | DiT, dropout_key=None):
    return lambda x, noise, labels: model(x, noise, labels, dropout_key)

  def _labels(self, labels_B):
    """The model's labels for a batch's class ids (None: an unconditional model)."""
    return labels_B.astype(jnp.int32) if self.net_cfg.num_classes else None

  def _loss(self, model: UNet | DiT, batch, rng, step):
    k_drop, k_loss, k_dropout = jax.random.split(rng, 3)
    labels = self._labels(batch["labels"])
    if labels is not None and self.config.loss.label_dropout > 0:
      dropped = jax.random.bernoulli(k_drop, self.config.loss.label_dropout, labels.shape)
      labels = jnp.where(dropped, self.null_label, labels)
    dropout_key = k_dropout if self.net_cfg.dropout > 0 else None
    loss_B = self.objective.loss(self._network(model, dropout_key), batch["images"], labels,
                                 k_loss)
    return loss_B.mean(), {}

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One AdamW update of the denoising loss, then the EMA of the weights."""
    new_state, metrics = self._step(state, batch)
    ema = update_ema(state.extra["ema"], new_state.params, self.config.loss.ema_decay,
                     state.step)
    return new_state.replace(extra={**new_state.extra, "ema": ema}), metrics

  def eval_step(self, state: TrainState, batch) -> dict:
    """Sums over held-out images of the EMA weights' loss and, for DDPM, of the
    variational bound's one-step estimate (nats); each image's noise and step are drawn
    from its position, the same at every evaluation, so the figures compare."""
    model = nnx.merge(self.graphdef, state.extra["ema"])
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(self.config.seed + 3),
                                                   batch["index"])
    network = self._network(model)
    labels = self._labels(batch["labels"])
    ddpm = isinstance(self.objective, objectives.Ddpm)

    def per_image(x, y, key):  # one image as a batch of one
      y = None if y is None else y[None]
      loss = self.objective.loss(network, x[None], y, key)[0]
      vlb = self.objective.vlb(network, x[None], y, key)[0] if ddpm else jnp.float32(0)
      return loss, vlb

    loss_B, vlb_B = jax.vmap(per_image, (0, None if labels is None else 0, 0))(
        batch["images"], labels, keys)
    sums = {"loss_sum": loss_B.sum(), "count": jnp.float32(loss_B.shape[0])}
    if ddpm:
      sums.update(vlb_sum=vlb_B.sum(), vlb_sq_sum=(vlb_B ** 2).sum())
    return sums

  def summarize_eval(self, sums: dict) -> dict:
    """val_loss; for DDPM also the variational bound in bits per dimension (comparable
    with the VAE's on 8-bit images) with its standard error over the images."""
    n = sums["count"]
    metrics = {"val_loss": sums["loss_sum"] / n}
    if "vlb_sum" in sums:
      dims = int(np.prod(self.net_cfg.image_shape)) * math.log(2)
      mean = sums["vlb_sum"] / n
      variance = max(sums["vlb_sq_sum"] / n - mean ** 2, 0.0) * n / max(n - 1, 1)
      metrics.update(bits_per_dim=mean / dims, bits_per_dim_stderr=math.sqrt(variance / n) / dims)
    return metrics

  @functools.cached_property
  def fid_evaluator(self):
    from aigc_jax.evaluation.classifier_fid import load_or_train
    cache = None if self.workdir is None else os.path.join(self.workdir, "fid_classifier")
    return load_or_train(self.dataset, cache, num_samples=self.config.fid.samples,
                         epochs=self.config.fid.classifier_epochs, seed=self.config.seed)

  @functools.cached_property
  def _data_texture(self) -> dict[int, float]:
    return image_quality.data_texture(self.dataset)

  def _quality(self, state: TrainState, **options) -> dict:
    num = self.fid_evaluator.num_samples
    images, _ = self.sample_images(state.extra["ema"], num, self.config.seed + 11, **options)
    labels = (np.arange(num) % self.net_cfg.num_classes) if self.net_cfg.num_classes \
        else None
    return image_quality.sample_quality(self.fid_evaluator, images, self.dataset,
                                        self._data_texture, labels)

  def sample_metrics(self, state: TrainState) -> dict:
    """The EMA model's samples (fixed noise; a conditional model draws the classes in
    turn) judged by `image_quality.sample_quality`, with the sampler's NFE; at the last
    step also fid_classifier at each of fid.steps_sweep (`fid_classifier_steps_N`)."""
    if self.config.fid.samples == 0:
      return {}
    o = self.sample_options()
    metrics = {**self._quality(state),
               "nfe": samplers.number_of_evaluations(o["sampler"], o["steps"])}
    if int(state.step) >= self.config.train.steps:
      for steps in self.config.fid.steps_sweep:
        metrics[f"fid_classifier_steps_{steps}"] = self._quality(
            state, steps=steps)["fid_classifier"]
    return metrics
