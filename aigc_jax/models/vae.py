"""VAE encoders and decoders (Flax NNX): a convolutional pair for square images (the DCGAN
resolutions: 8, 28, 32, 64) and an MLP pair, with a diagonal-Gaussian posterior.

`VAE` is the model to use: images in [0, 1] in, and see its docstring for the API.
Underneath, an encoder maps images [B, H, W, C] on [-1, 1] to (mean [B, Z], logvar [B, Z]),
a decoder maps z [B, Z] to Bernoulli logits [B, H, W, C], or to (mean, log_scale)
[B, H, W, C] each for the discretized logistic / Gaussian likelihoods of 8-bit images.
Layers compute in `dtype` (e.g. bfloat16 on accelerators); outputs are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.gan import upsampling_plan
from aigc_jax.models.vae_losses import check_likelihood, reparameterize
from aigc_jax.nn.concrete import concrete_values
from aigc_jax.nn.dtypes import DTYPES, at_least_float32, layer_dtype
from aigc_jax.nn.partitioning import annotate_layers
from aigc_jax.nn.upsample import UpConv2x

ARCHITECTURES = ("conv", "mlp")
_MIN_LOG_SCALE = -7.0  # keeps the pixel scale above ~1e-3: 1/4 of an 8-bit level


@dataclasses.dataclass(frozen=True)
class VaeConfig:
  """The VAE's architecture (the `model` section of a VAE run config); checked on
  construction (UserError naming the field). arch: conv | mlp; images [image_size,
  image_size, channels]; latent_dim: Z; likelihood: bernoulli | logistic | gaussian."""

  arch: str = "conv"
  image_size: int = 28
  channels: int = 1
  latent_dim: int = 20
  width: int = 32  # conv: channels of the first conv layer (doubling per 2x downsampling)
  hidden: int = 512  # the fully connected layer (conv) or both hidden layers (MLP)
  likelihood: str = "bernoulli"  # bernoulli | logistic | gaussian
  dtype: str = "float32"  # compute dtype; parameters, likelihoods and outputs stay float32

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise UserError(f"config 'model.arch' must be one of {ARCHITECTURES}, got {self.arch!r}")
    check_likelihood(self.likelihood)
    for field in ("image_size", "channels", "width", "hidden"):
      if getattr(self, field) < 1:
        raise UserError(f"config 'model.{field}' must be positive, got {getattr(self, field)}")
    if self.dtype not in DTYPES:
      raise UserError(f"config 'model.dtype' must be one of {sorted(DTYPES)}, got "
                      f"{self.dtype!r}")
    if self.latent_dim < 1:
      raise UserError(f"config 'model.latent_dim' must be at least 1, got {self.latent_dim}")
    if self.arch == "conv":
      upsampling_plan(self.image_size)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images."""
    return (self.image_size, self.image_size, self.channels)

  @property
  def compute_dtype(self):
    """The layers' compute dtype (parameters stay float32)."""
    return layer_dtype(self.dtype)

  @property
  def outputs_per_pixel(self) -> int:
    """Decoder outputs per pixel and channel: 1 (Bernoulli logits) or 2 (mean, log-scale)."""
    return 1 if self.likelihood == "bernoulli" else 2




def _split_output(cfg: VaeConfig, out_BHWK: jax.Array):
  out_BHWK = at_least_float32(out_BHWK)
  if cfg.likelihood == "bernoulli":
    return out_BHWK
  C = cfg.channels
  mean = jnp.tanh(out_BHWK[..., :C])  # pixel means inside [-1, 1]
  log_scale = jnp.maximum(out_BHWK[..., C:], _MIN_LOG_SCALE)
  return mean, log_scale


class ConvEncoder(nnx.Module):
  """images [B, H, W, C] in [-1, 1] -> (mean [B, Z], logvar [B, Z]): stride-2 convolutions,
  then a dense layer."""

  def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    base, k = upsampling_plan(cfg.image_size)
    widths = [cfg.channels] + [cfg.width * 2 ** i for i in range(k)]
    self.convs = nnx.List([nnx.Conv(widths[i], widths[i + 1], (4, 4), strides=2,
                                    padding="SAME", dtype=dtype, rngs=rngs) for i in range(k)])
    self.hidden = nnx.Linear(base * base * widths[-1], cfg.hidden, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(cfg.hidden, 2 * cfg.latent_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x_BHWC
    for conv in self.convs:
      h = nnx.gelu(conv(h))
    h = nnx.gelu(self.hidden(h.reshape(h.shape[0], math.prod(h.shape[1:]))))
    mean, logvar = jnp.split(at_least_float32(self.out(h)), 2, axis=-1)
    return mean, logvar


class ConvDecoder(nnx.Module):
  """z [B, Z] -> the likelihood's raw outputs [B, H, W, C * outputs_per_pixel]: a dense
  layer, then 2x transposed convolutions."""

  def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    self.base, k = upsampling_plan(cfg.image_size)
    widths = [cfg.width * 2 ** (k - 1 - i) for i in range(k)] + [
        cfg.channels * cfg.outputs_per_pixel]
    self.width0 = widths[0]
    self.hidden = nnx.Linear(cfg.latent_dim, cfg.hidden, dtype=dtype, rngs=rngs)
    self.project = nnx.Linear(cfg.hidden, self.base * self.base * widths[0], dtype=dtype,
                              rngs=rngs)
    self.ups = nnx.List([UpConv2x(widths[i], widths[i + 1], dtype=dtype, rngs=rngs)
                         for i in range(k)])

  def __call__(self, z_BZ: jax.Array):
    B = z_BZ.shape[0]
    h = nnx.gelu(self.hidden(z_BZ))
    h = self.project(h).reshape(B, self.base, self.base, self.width0)
    for up in self.ups:
      h = up(nnx.gelu(h))
    return _split_output(self.cfg, h)


class MLPEncoder(nnx.Module):
  """images [B, H, W, C] in [-1, 1] -> (mean [B, Z], logvar [B, Z]) through two hidden layers."""

  def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    H, W, C = cfg.image_shape
    self.layers = nnx.List([nnx.Linear(H * W * C, cfg.hidden, dtype=dtype, rngs=rngs),
                            nnx.Linear(cfg.hidden, cfg.hidden, dtype=dtype, rngs=rngs),
                            nnx.Linear(cfg.hidden, 2 * cfg.latent_dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x_BHWC.reshape(x_BHWC.shape[0], math.prod(x_BHWC.shape[1:]))
    h = nnx.gelu(self.layers[1](nnx.gelu(self.layers[0](h))))
    mean, logvar = jnp.split(at_least_float32(self.layers[2](h)), 2, axis=-1)
    return mean, logvar


class MLPDecoder(nnx.Module):
  """z [B, Z] -> the likelihood's raw outputs [B, H, W, C * outputs_per_pixel]."""

  def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    H, W, C = cfg.image_shape
    self.layers = nnx.List([nnx.Linear(cfg.latent_dim, cfg.hidden, dtype=dtype, rngs=rngs),
                            nnx.Linear(cfg.hidden, cfg.hidden, dtype=dtype, rngs=rngs),
                            nnx.Linear(cfg.hidden, H * W * C * cfg.outputs_per_pixel,
                                       dtype=dtype, rngs=rngs)])

  def __call__(self, z_BZ: jax.Array):
    h = nnx.gelu(self.layers[1](nnx.gelu(self.layers[0](z_BZ))))
    out = self.layers[2](h).reshape(z_BZ.shape[0], self.cfg.image_size, self.cfg.image_size,
                                    self.cfg.channels * self.cfg.outputs_per_pixel)
    return _split_output(self.cfg, out)


class VAE(nnx.Module):
  """A VAE with a diagonal-Gaussian posterior, for images in [0, 1].

  Inputs are images as a dataset gives them scaled to [0, 1] (`uint8 / 255`): binarized
  {0, 1} images for the Bernoulli likelihood, 8-bit grey levels for the logistic and
  Gaussian ones. The model maps them to the encoder's [-1, 1] itself.

    encode(x [..., H, W, C]) -> (mean [..., Z], logvar [..., Z])
    decode(z [..., Z]) -> the likelihood's parameters, [..., H, W, C]: Bernoulli logits, or
      (mean, log_scale) of the pixels on the likelihoods' [-1, 1] scale
    vae(x [B, H, W, C], rngs) -> (decoded [B, H, W, C], mean [B, Z], logvar [B, Z]): one
      reparameterized posterior sample z = mean + exp(logvar / 2) * eps per image
    mean_image(decoded) -> the likelihood's mean image [..., H, W, C] in [0, 1]

  Randomness is explicit: `rngs` is a key, an `nnx.RngStream` or an `nnx.Rngs` (its
  'sample' stream, else its default one). The module holds parameters only, so its state
  is the parameter dict that optimizers and checkpoints see, and it behaves the same in
  `train()` and `eval()` mode (nothing depends on the mode). The objectives that take this
  module are in `aigc_jax.models.vae_losses` (`elbo`, `iwae_log_weights_of`).
  """

  def __init__(self, cfg: VaeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    conv = cfg.arch == "conv"
    self.encoder = (ConvEncoder if conv else MLPEncoder)(cfg, rngs=rngs)
    self.decoder = (ConvDecoder if conv else MLPDecoder)(cfg, rngs=rngs)
    # Logical axis names (nn.partitioning): the posterior's parameters and the decoder's
    # pixel outputs are small axes that stay whole.
    head = "encoder.out" if conv else "encoder.layers.2"
    overrides = {f"{head}.kernel": ("dense_in", "out"), f"{head}.bias": ("out",)}
    if conv:
      last = f"decoder.ups.{len(self.decoder.ups) - 1}"
      overrides.update({f"{last}.kernel": (None, None, "conv_in", "image_channels"),
                        f"{last}.bias": ("image_channels",)})
    annotate_layers(self, overrides)

  def _check_images(self, x, what: str = "images") -> None:
    if x.ndim < 4 or tuple(x.shape[-3:]) != self.cfg.image_shape:
      shape = ", ".join(map(str, self.cfg.image_shape))
      raise UserError(f"VAE {what} must have shape [..., {shape}] ([..., H, W, C]), got "
                      f"{x.shape}: check model.image_size / model.channels")
    values = concrete_values(x)
    if values is None:
      return  # traced or on other hosts: the range is the caller's (the family checks data)
    if values.size and (values.min() < 0 or values.max() > 1):
      raise UserError(f"VAE {what} must lie in [0, 1] (uint8 / 255; binarized for Bernoulli "
                      f"pixels), got values in [{values.min():.3g}, {values.max():.3g}]")

  def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [..., H, W, C] in [0, 1] -> the posterior's (mean, logvar), [..., Z] each."""
    self._check_images(x_BHWC)
    lead = x_BHWC.shape[:-3]
    x_NHWC = x_BHWC.reshape(-1, *self.cfg.image_shape)
    mean_NZ, logvar_NZ = self.encoder(x_NHWC * 2.0 - 1.0)  # the encoder sees [-1, 1]
    Z = self.cfg.latent_dim
    return mean_NZ.reshape(*lead, Z), logvar_NZ.reshape(*lead, Z)

  def decode(self, z_BZ: jax.Array):
    """Latents [..., Z] -> the likelihood's parameters [..., H, W, C] (float32): Bernoulli
    logits, or a (mean in [-1, 1], log_scale) pair."""
    if z_BZ.ndim < 1 or z_BZ.shape[-1] != self.cfg.latent_dim:
      raise UserError(f"VAE latents must have shape [..., {self.cfg.latent_dim}] "
                      f"(model.latent_dim), got {z_BZ.shape}")
    lead = z_BZ.shape[:-1]
    out = self.decoder(z_BZ.reshape(-1, self.cfg.latent_dim))
    return jax.tree.map(lambda a: a.reshape(*lead, *self.cfg.image_shape), out)

  def __call__(self, x_BHWC: jax.Array, rngs: nnx.Rngs | nnx.RngStream | jax.Array):
    """(decoded [B, H, W, C], mean [B, Z], logvar [B, Z]) for images [B, H, W, C] in [0, 1]:
    the decoder's output at one posterior sample per image, drawn with `rngs` (a key, [B]
    keys for one per image, an nnx.RngStream or an nnx.Rngs)."""
    mean_BZ, logvar_BZ = self.encode(x_BHWC)
    z_BZ = reparameterize(sample_key(rngs), mean_BZ, logvar_BZ)
    return self.decode(z_BZ), mean_BZ, logvar_BZ

  def mean_image(self, decoded) -> jax.Array:
    """The likelihood's mean image [..., H, W, C] in [0, 1] from decode's output."""
    if self.cfg.likelihood == "bernoulli":
      return jax.nn.sigmoid(decoded)
    return (decoded[0] + 1.0) / 2.0


def sample_key(rngs: nnx.Rngs | nnx.RngStream | jax.Array) -> jax.Array:
  """A key from an explicit key, an RngStream, or an Rngs' 'sample' stream (else its
  default stream)."""
  if isinstance(rngs, nnx.Rngs):
    return rngs.sample()  # falls back to the default stream
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  if rngs is None:
    raise UserError("the VAE samples its latents: pass rngs= a key, an nnx.RngStream or an "
                    "nnx.Rngs (its 'sample' stream, else its default one)")
  return rngs
