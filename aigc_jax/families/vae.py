"""The VAE as a family on the shared loop: config, image data (dynamic binarization for the
Bernoulli likelihood), the ELBO step, evaluation (negative ELBO with its standard error,
importance-weighted NLL and the ELBO on the same images, bits per dimension, active units)
and pictures (reconstructions, prior samples, a latent interpolation).

Batches from the loop hold images in [-1, 1] (`ImageBatches`); the model takes [0, 1], so
the step maps them (and binarizes them for the Bernoulli likelihood). Evaluation images are
kept in [0, 1], with their positions in the evaluation set (`index`), from which each
image's posterior noise is folded together with the evaluated step."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from aigc_jax.config import require, require_positive
from aigc_jax.data import images as image_data
from aigc_jax.errors import UserError
from aigc_jax.families import image_sampling
from aigc_jax.models import vae_losses
from aigc_jax.models.vae import VAE, VaeConfig
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.optim import adamw, validate_optim
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_supervised_step

ACTIVE_UNIT_THRESHOLD = 0.01  # Cov_x(E_q[z_i | x]) above this: an active unit (Burda et al.)


def default_config() -> ml_collections.ConfigDict:
  """Every key a VAE run config may set, with its default (a conv VAE on binarized
  Fashion-MNIST)."""
  c = ml_collections.ConfigDict()
  c.family = "vae"
  c.seed = 0
  c.model = dict(arch="conv", image_size=28, channels=1, latent_dim=20, width=32, hidden=512,
                 likelihood="bernoulli",  # bernoulli (binarized) | logistic | gaussian (8-bit)
                 dtype="float32")  # compute dtype: float32 | bfloat16 | float16
  c.data = image_data.image_data_config()
  c.data.binarize = "dynamic"  # bernoulli only: dynamic (a fresh draw each step) | threshold
  c.loss = dict(beta=1.0, kl_warmup_steps=0, free_bits=0.0)
  c.train = dict(steps=3000, batch_size=128, log_every=100, eval_every=1000, eval_batches=8,
                 checkpoint_every=1000, keep_checkpoints=3,
                 **guard.DEFAULTS)
  c.optim = dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.0, b1=0.9,
                 b2=0.999, eps=1e-8, grad_clip=0.0)
  # The importance-weighted NLL at every evaluation on the first `images` evaluation
  # images (at most eval_batches x batch_size), beside the ELBO of the same images: k
  # samples per image during training, final_k once train.steps is reached (the figure to
  # report), drawn `chunk` at a time (memory ~ chunk x 64 decoder passes).
  c.iwae = dict(k=100, final_k=1000, chunk=100, images=512)
  c.sample = dict(num=64)  # prior samples in each grid
  c.mesh = mesh_lib.default_mesh_config()
  return c


def validate(c) -> None:
  VaeConfig(**dict(c.model))  # names the bad model field
  image_data.validate_image_data_config(c)
  validate_optim(c)
  require_positive(c, "train.steps", "train.batch_size", "train.log_every", "train.eval_every",
                   "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                   "iwae.chunk", "sample.num")
  require(c.data.binarize in ("dynamic", "threshold"), "data.binarize",
          f"must be 'dynamic' or 'threshold', got {c.data.binarize!r}")
  require(c.loss.beta >= 0, "loss.beta", f"must be >= 0, got {c.loss.beta}")
  require(c.loss.kl_warmup_steps >= 0, "loss.kl_warmup_steps", "must be >= 0")
  require(c.loss.free_bits >= 0, "loss.free_bits", "must be >= 0 (nats per latent dimension)")
  require(c.iwae.k >= 0 and c.iwae.final_k >= 0 and c.iwae.images >= 0, "iwae",
          "needs k, final_k and images >= 0 (0: off)")
  n_eval = c.train.eval_batches * c.train.batch_size
  iwae_on = c.iwae.k > 0 or c.iwae.final_k > 0
  require(not iwae_on or c.iwae.images <= n_eval, "iwae.images",
          f"must be at most train.eval_batches x train.batch_size = {n_eval} (it takes the "
          f"first evaluation images, so that the ELBO is reported on the same ones), got "
          f"{c.iwae.images}")


def check_targets(images: np.ndarray, likelihood: str, image_shape) -> None:
  """The model's images for a likelihood: [N, H, W, C] of image_shape, in {0, 1}
  (bernoulli) or [0, 1] (logistic, gaussian: 8-bit levels / 255); else one clear error."""
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    raise UserError(f"images must have shape [N, {', '.join(map(str, image_shape))}] (N, H, W, "
                    f"C), got {images.shape}: check model.image_size / model.channels")
  lo, hi = float(images.min()), float(images.max())
  if lo < -1e-6 or hi > 1.0 + 1e-6:
    raise UserError(f"the VAE takes images scaled to [0, 1] (uint8 / 255), got values in "
                    f"[{lo:.3g}, {hi:.3g}]")
  if likelihood == "bernoulli" and not np.isin(images, (0.0, 1.0)).all():
    lo, hi = float(images.min()), float(images.max())
    raise UserError(f"the bernoulli likelihood needs binary images in {{0, 1}}, got values in "
                    f"[{lo:.3g}, {hi:.3g}]: binarize them, or use model.likelihood='logistic'")


# Images per row of each picture's grid (samples: a square).
PICTURE_COLUMNS = {"reconstructions": 16, "interpolation": 10}


class Family:
  name = "vae"
  plot_keys = ("loss", "neg_elbo", "kl")

  def __init__(self, config, workdir: str | None):
    self.config, self.workdir = config, workdir
    self.vae_cfg = VaeConfig(**dict(config.model))
    abstract = nnx.eval_shape(lambda: VAE(self.vae_cfg, rngs=nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract)[0]
    self._param_names = param_names(abstract)
    self.tx, self.schedule = adamw(config.optim, config.train.steps)
    self.train_step = make_supervised_step(self.graphdef, self._loss, self.tx, self.schedule)
    self.items_per_step = {"images": config.train.batch_size}
    self.num_dims = int(np.prod(self.vae_cfg.image_shape))

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def dataset(self) -> image_data.ImageDataset:
    return image_data.load_image_dataset(self.config.data, self.vae_cfg.image_shape)

  @functools.cached_property
  def train_data(self) -> image_data.ImageBatches:
    return image_data.ImageBatches(self.dataset.train_images, self.dataset.train_labels,
                                   self.config.train.batch_size, self.config.seed,
                                   self.config.data.order)

  @property
  def bernoulli(self) -> bool:
    return self.vae_cfg.likelihood == "bernoulli"

  def targets(self, images_m11: np.ndarray, seed: int) -> np.ndarray:
    """Host images in [-1, 1] -> the model's images in [0, 1]: for bernoulli, binarized with
    pixel intensity as probability (a fixed draw for `seed`) or at 0.5."""
    p = ((images_m11 + 1) / 2).astype(np.float32)
    if not self.bernoulli:
      return p
    if self.config.data.binarize == "threshold":
      return (p > 0.5).astype(np.float32)
    return (np.random.default_rng(seed).random(p.shape) < p).astype(np.float32)

  def eval_batches(self):
    """The first train.eval_batches x batch_size test images in [0, 1] (binarized once, with
    a fixed seed, for bernoulli) and their positions: {"images": [B, H, W, C], "index": [B]}."""
    if not hasattr(self, "_eval_batches"):
      def targets(images):
        images = self.targets(images, self.config.seed + 1)
        check_targets(images, self.vae_cfg.likelihood, self.vae_cfg.image_shape)
        return images

      self._eval_batches = image_data.indexed_test_batches(
          self.dataset, self.config.train.batch_size, self.config.train.eval_batches, targets)
    return self._eval_batches

  # --- model ------------------------------------------------------------------------
  def param_names(self) -> dict:
    """The parameters' logical axis names (a pure dict like the parameters)."""
    return self._param_names

  def init_state(self, rng: jax.Array) -> TrainState:
    k_model, k_train = jax.random.split(rng)
    params = nnx.to_pure_dict(nnx.state(VAE(self.vae_cfg, rngs=nnx.Rngs(params=k_model))))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=k_train, extra={})

  def model(self, params) -> VAE:
    return nnx.merge(self.graphdef, params)

  def eval_keys(self, step: jax.Array, index_B: jax.Array) -> jax.Array:
    """Posterior noise keys [B, 2] for evaluation images at positions index_B, fresh at every
    evaluated step: fold_in(fold_in(key(seed + 3), step), index)."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 3), step)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, index_B)

  def kl_weight(self, step: jax.Array) -> jax.Array:
    """beta, ramped linearly from 0 over loss.kl_warmup_steps."""
    lc = self.config.loss
    if lc.kl_warmup_steps == 0:
      return jnp.float32(lc.beta)
    return lc.beta * jnp.minimum(1.0, step.astype(jnp.float32) / lc.kl_warmup_steps)

  def _loss(self, model: VAE, batch, rng, step):
    k_bin, k_z = jax.random.split(rng)
    x01 = (batch["images"] + 1) / 2  # the loop's [-1, 1] -> the model's [0, 1]
    if self.bernoulli:  # dynamic binarization: a fresh draw every step
      x01 = (jax.random.uniform(k_bin, x01.shape) < x01).astype(jnp.float32) \
          if self.config.data.binarize == "dynamic" else (x01 > 0.5).astype(jnp.float32)
    r = vae_losses.elbo(model, x01, k_z, beta=self.kl_weight(step),
                        free_bits=self.config.loss.free_bits)
    return r.loss_B.mean(), {"neg_elbo": -r.elbo_B.mean(), "kl": r.kl_BZ.sum(-1).mean(),
                             "kl_weight": self.kl_weight(step)}

  def _eval_elbo(self, params, x01, index_B, step) -> vae_losses.Elbo:
    """The single-sample ELBO of evaluation images, each with its own fresh key."""
    return vae_losses.elbo(self.model(params), x01, self.eval_keys(step, index_B))

  def eval_step(self, state: TrainState, batch) -> dict:
    """Sums over held-out images: -ELBO (one posterior sample per image, its key folded from
    the image's position and the step) and its square, KL, and the posterior means' first
    and second moments (for active units)."""
    x = batch["images"]
    r = self._eval_elbo(state.params, x, batch["index"], state.step)
    neg_elbo_B = -r.elbo_B
    return {"neg_elbo_sum": neg_elbo_B.sum(), "neg_elbo_sq_sum": (neg_elbo_B ** 2).sum(),
            "kl_sum": r.kl_BZ.sum(), "count": jnp.float32(x.shape[0]),
            "mean_sum_Z": r.mean_BZ.sum(0), "mean_sq_sum_Z": (r.mean_BZ ** 2).sum(0)}

  def summarize_eval(self, sums: dict) -> dict:
    """neg_elbo (nats per image) with neg_elbo_stderr, its standard error over the eval
    images (image-to-image spread and posterior noise together), kl, bits per dimension,
    active units and eval_images, the number of images."""
    n = sums["count"]
    variance_Z = sums["mean_sq_sum_Z"] / n - (sums["mean_sum_Z"] / n) ** 2
    neg_elbo = sums["neg_elbo_sum"] / n
    variance = max(sums["neg_elbo_sq_sum"] / n - neg_elbo ** 2, 0.0) * n / max(n - 1, 1)
    return {"neg_elbo": neg_elbo, "neg_elbo_stderr": math.sqrt(variance / n),
            "kl": sums["kl_sum"] / n,
            "neg_elbo_bits_per_dim": neg_elbo / (self.num_dims * math.log(2)),
            "active_units": int((variance_Z > ACTIVE_UNIT_THRESHOLD).sum()),
            "eval_images": int(n)}

  # --- the importance-weighted bound ------------------------------------------------
  @functools.cached_property
  def _iwae_chunk_fn(self):
    """(params, x [B, ...], key, k) -> log importance weights [k, B] (one compilation per
    chunk size)."""
    def log_weights(params, x, key, k: int):
      return vae_losses.iwae_log_weights_of(self.model(params), x, key, k)
    return jax.jit(log_weights, static_argnums=3)

  @functools.cached_property
  def _neg_elbo_fn(self):
    """(params, x [B, ...], index [B], step) -> -ELBO [B], as eval_step draws it."""
    return jax.jit(lambda params, x, index, step: -self._eval_elbo(params, x, index,
                                                                    step).elbo_B)

  def iwae_nll(self, params, images: np.ndarray, k: int, chunk: int, seed: int = 0,
               batch_size: int = 64, step: int = 0) -> np.ndarray:
    """-log p(x) estimated with k importance samples per image (the IWAE bound), drawn
    `chunk` at a time: nats per image [N]. Images in [0, 1]; keys from `seed` and `step`."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    out = []
    for start in range(0, len(images), batch_size):
      x = images[start:start + batch_size]
      total, drawn = None, 0
      while drawn < k:
        n = min(chunk, k - drawn)
        key = jax.random.fold_in(base, start * (k + 1) + drawn)
        lse = jax.scipy.special.logsumexp(self._iwae_chunk_fn(params, x, key, n), axis=0)
        total = lse if total is None else jnp.logaddexp(total, lse)
        drawn += n
      out.append(np.asarray(-(total - math.log(k))))
    return np.concatenate(out)

  def eval_neg_elbo(self, params, images: np.ndarray, index: np.ndarray, step: int,
                    batch_size: int = 64) -> np.ndarray:
    """-ELBO per image [N] (nats) of evaluation images at positions `index`: the values
    eval_step sums for them at `step`."""
    return np.concatenate([
        np.asarray(self._neg_elbo_fn(params, images[i:i + batch_size],
                                     index[i:i + batch_size], jnp.int32(step)))
        for i in range(0, len(images), batch_size)])

  def sample_metrics(self, state: TrainState) -> dict:
    """On the first iwae.images eval images: nll_iwae (nats per image, iwae.final_k samples
    once training is complete, else iwae.k) and bits_per_dim; iwae_neg_elbo, the -ELBO of
    the same images as eval_step draws it; iwae_gap = iwae_neg_elbo - nll_iwae (>= 0 up to
    noise); each with its standard error over the images."""
    c = self.config.iwae
    step = int(state.step)
    k = c.final_k if step >= self.config.train.steps else c.k
    if k == 0 or c.images == 0:
      return {}
    batches = self.eval_batches()
    images = np.concatenate([b["images"] for b in batches])[:c.images]
    index = np.concatenate([b["index"] for b in batches])[:c.images]
    nll_N = self.iwae_nll(state.params, images, k, min(c.chunk, k), seed=self.config.seed + 5,
                          step=step).astype(np.float64)
    neg_elbo_N = self.eval_neg_elbo(state.params, images, index, step).astype(np.float64)
    stderr = lambda v: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    nll = float(nll_N.mean())
    return {"nll_iwae": nll, "nll_iwae_stderr": stderr(nll_N),
            "bits_per_dim": nll / (self.num_dims * math.log(2)),
            "iwae_neg_elbo": float(neg_elbo_N.mean()), "iwae_neg_elbo_stderr": stderr(neg_elbo_N),
            "iwae_gap": float((neg_elbo_N - nll_N).mean()),
            "iwae_gap_stderr": stderr(neg_elbo_N - nll_N), "iwae_k": k, "iwae_images": len(images)}

  # --- pictures ---------------------------------------------------------------------
  @functools.cached_property
  def _picture_fns(self):
    """(params, x [B, ...] in [0, 1]) -> posterior means [B, Z]; (params, z [..., Z]) ->
    the likelihood's mean images as uint8 [..., H, W, C]."""
    def to_u8(pixels01):
      return jnp.round(pixels01 * 255.0).clip(0, 255).astype(jnp.uint8)

    def decode(params, z):
      model = self.model(params)
      return to_u8(model.mean_image(model.decode(z)))

    encode = jax.jit(lambda params, x: self.model(params).encode(x)[0])
    return encode, jax.jit(decode), to_u8

  def prior_samples(self, state: TrainState, num: int, seed: int,
                    chunk: int = 500) -> np.ndarray:
    """uint8 [num, H, W, C]: the likelihood's mean images of `num` prior draws z ~ N(0, I)
    (the same images for a seed, decoded `chunk` at a time, the last one padded so that
    one compilation serves them all)."""
    decode = self._picture_fns[1]
    z = jax.random.normal(jax.random.PRNGKey(seed), (num, self.vae_cfg.latent_dim))
    chunk = min(chunk, num)
    out = []
    for i in range(0, num, chunk):
      z_chunk = z[i:i + chunk]
      n = z_chunk.shape[0]
      if n < chunk:
        z_chunk = jnp.concatenate([z_chunk, jnp.zeros((chunk - n, z.shape[1]))])
      out.append(np.asarray(decode(state.params, z_chunk))[:n])
    return np.concatenate(out)

  def pictures(self, state: TrainState, num: int, seed: int) -> dict[str, np.ndarray]:
    """uint8 grids' images: reconstructions (inputs beside outputs; min(num, 32) test
    images, at least 2), `num` prior samples, and interpolations between the posterior means
    of pairs of test images."""
    encode, decode, to_u8 = self._picture_fns
    x = self.eval_batches()[0]["images"][:max(2, min(num, 32))]
    recon = np.asarray(decode(state.params, encode(state.params, x)))
    pairs = np.stack([np.asarray(to_u8(x)), recon], 1).reshape(-1, *recon.shape[1:])
    samples = self.prior_samples(state, num, seed)
    n_paths = min(8, len(x) // 2)  # interpolate between test images i and i + n_paths
    ends = encode(state.params, x[:2 * n_paths])
    a, b = ends[:n_paths], ends[n_paths:]
    t = jnp.linspace(0, 1, 10)[None, :, None]
    path = a[:, None] * (1 - t) + b[:, None] * t  # [paths, 10, Z]
    interpolation = np.asarray(decode(state.params, path)).reshape(-1, *recon.shape[1:])
    return {"reconstructions": pairs, "samples": samples, "interpolation": interpolation}

  def _write_pictures(self, state, out_dir: str, suffix: str, num: int, seed: int) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [image_data.write_grid(images, os.path.join(out_dir, f"{name}{suffix}.png"),
                                  cols=PICTURE_COLUMNS.get(name))
            for name, images in self.pictures(state, num, seed).items()]

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    return self._write_pictures(state, os.path.join(workdir, "samples"), f"_step_{step:07d}",
                                self.config.sample.num, self.config.seed)

  CLI_SAMPLE_OPTIONS = image_sampling.CLI_SAMPLE_OPTIONS

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: prior samples, reconstructions and an interpolation, as PNGs:
    WORKDIR/samples/NAME_NUM_seedSEED.png, or --out's stem + _NAME.png."""
    num = image_sampling.sample_count(options, self.config.sample.num)
    seed, out = image_sampling.sample_seed(options), options.get("out")
    if out is not None:  # refuses an --out that is no .png before drawing
      image_sampling.sample_path(out, workdir, "")
    paths = []
    for name, images in self.pictures(state, num, seed).items():
      path = image_sampling.sample_path(None if out is None else f"{out[:-4]}_{name}.png",
                                        workdir, f"{name}_{num}_seed{seed}.png")
      paths.append(image_sampling.write_sample_grid(images, path, is_out=out is not None,
                                                    cols=PICTURE_COLUMNS.get(name)))
    return "wrote " + ", ".join(paths)
