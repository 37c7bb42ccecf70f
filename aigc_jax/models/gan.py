"""GAN generators and discriminators (Flax NNX): DCGAN-style convolutional pairs for
square images of 8, 28, 32 or 64 pixels (grey or colour), and the classic MLP pair.

G: z [B, Z] -> images [B, H, W, C] in [-1, 1] (tanh). D: images -> logits [B].

Behaviour follows the module's mode, as in NNX: `model.train()` (the mode modules are built
in) normalises with batch statistics and updates the BatchNorm running averages and the
spectral norm's power-iteration vector; `model.eval()` (or `nnx.view(model,
use_running_average=True)`) uses the stored statistics and writes nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.nn.dtypes import DTYPES, at_least_float32, layer_dtype
from aigc_jax.nn.partitioning import annotate_layers
from aigc_jax.nn.upsample import UpConv2x

ARCHITECTURES = ("dcgan", "mlp")
G_NORMS = ("batch", "none")
G_ACTIVATIONS = ("relu", "leaky_relu")
# Kernel initialisers: flax's default (LeCun normal), or Keras' and PyTorch-DCGAN's scale
# (Glorot uniform), which keeps the 64 -> 7x7xC projection's outputs ~7x smaller.
KERNEL_INITS = {"lecun_normal": nnx.initializers.lecun_normal(),
                "glorot_uniform": nnx.initializers.glorot_uniform()}


def _init(layer, cfg):
  """`layer` (nnx.Linear, nnx.Conv, UpConv2x, ...) with the config's kernel initialiser."""
  return functools.partial(layer, kernel_init=KERNEL_INITS[cfg.kernel_init])
D_NORMS = ("none", "spectral", "layer")


@dataclasses.dataclass(frozen=True)
class GanConfig:
  """The GAN's architecture (the `model` section of a GAN run config); checked on
  construction (UserError naming the field). arch: dcgan | mlp; images [image_size,
  image_size, channels] in [-1, 1]; z_dim: the latent size of G's input [B, z_dim]."""

  arch: str = "dcgan"
  image_size: int = 28
  channels: int = 1
  z_dim: int = 64
  width: int = 64  # DCGAN: channels of the widest-resolution conv layer; MLP: hidden units
  depth: int = 0  # DCGAN: extra stride-1 3x3 conv blocks at each resolution of G and D
  g_norm: str = "batch"
  d_norm: str = "none"
  g_activation: str = "relu"  # G's hidden activation: relu | leaky_relu (slope 0.2)
  d_kernel: int = 4  # DCGAN: the side of D's strided convolutions (4, or 5 as in TF's DCGAN)
  d_dropout: float = 0.0  # dropout rate after each of D's activations (training only)
  kernel_init: str = "lecun_normal"  # every kernel's initialiser: lecun_normal | glorot_uniform
  dtype: str = "float32"  # compute dtype; parameters, losses and outputs stay float32

  def __post_init__(self):
    for field, value, choices in (("arch", self.arch, ARCHITECTURES),
                                  ("g_norm", self.g_norm, G_NORMS),
                                  ("d_norm", self.d_norm, D_NORMS),
                                  ("g_activation", self.g_activation, G_ACTIVATIONS),
                                  ("kernel_init", self.kernel_init, tuple(KERNEL_INITS))):
      if value not in choices:
        raise UserError(f"config 'model.{field}' must be one of {choices}, got {value!r}")
    for field in ("image_size", "channels", "z_dim", "width"):
      if getattr(self, field) < 1:
        raise UserError(f"config 'model.{field}' must be positive, got {getattr(self, field)}")
    if self.dtype not in DTYPES:
      raise UserError(f"config 'model.dtype' must be one of {sorted(DTYPES)}, got "
                      f"{self.dtype!r}")
    if self.depth < 0:
      raise UserError(f"config 'model.depth' must be >= 0, got {self.depth}")
    if self.d_kernel not in (3, 4, 5):
      raise UserError(f"config 'model.d_kernel' must be 3, 4 or 5, got {self.d_kernel}")
    if not 0 <= self.d_dropout < 1:
      raise UserError(f"config 'model.d_dropout' must be in [0, 1), got {self.d_dropout}")
    if self.arch == "dcgan":
      upsampling_plan(self.image_size)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images."""
    return (self.image_size, self.image_size, self.channels)

  @property
  def compute_dtype(self):
    """The layers' compute dtype (parameters stay float32)."""
    return layer_dtype(self.dtype)


def upsampling_plan(image_size: int) -> tuple[int, int]:
  """(base, k): the DCGAN grows a base x base map by 2x, k times (28 -> (7, 2),
  32 -> (4, 3), 64 -> (4, 4), 8 -> (4, 1))."""
  base, k = image_size, 0
  while base % 2 == 0 and base > 7:
    base //= 2
    k += 1
  if k == 0 or base > 8:
    raise UserError(f"config 'model.image_size'={image_size} is not supported by the DCGAN: "
                    "use 8, 28, 32 or 64 (a size of base x 2^k with base <= 8), or arch='mlp'")
  return base, k


class SpectralNormConv(nnx.Module):
  """A convolution whose kernel is divided by its largest singular value, estimated by
  one power iteration per call from a persistent vector u (Miyato et al.).

  Like `nnx.SpectralNorm`, the mode is the `use_running_average` attribute that
  `train()` / `eval()` set: in training mode the iteration's new u is stored; in
  evaluation mode u is read only. The output is the same in both modes."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               kernel: int = 4, stride: int = 2, dtype=None, use_running_average: bool = False,
               kernel_init=None):
    self.dtype = dtype
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                         padding="SAME", dtype=dtype, rngs=rngs,
                         kernel_init=kernel_init or nnx.initializers.lecun_normal())
    self.stride = stride
    self.u = nnx.BatchStat(jax.random.normal(rngs.params(), (out_features,)))
    self.use_running_average = use_running_average

  def set_view(self, use_running_average: bool | None = None):
    """Used by `nnx.view`: use_running_average=True reads u without updating it."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    w_HWIO = self.conv.kernel[...]
    w_MO = w_HWIO.reshape(-1, w_HWIO.shape[-1])
    normalize = lambda v: v / (jnp.linalg.norm(v) + 1e-12)
    v_M = jax.lax.stop_gradient(normalize(w_MO @ self.u[...]))
    u_O = jax.lax.stop_gradient(normalize(w_MO.T @ v_M))
    if not self.use_running_average:
      self.u[...] = u_O
    sigma = v_M @ w_MO @ u_O  # float32, as the parameters
    dtype = self.dtype or x_BHWC.dtype
    y = jax.lax.conv_general_dilated(x_BHWC.astype(dtype), (w_HWIO / sigma).astype(dtype),
                                     (self.stride,) * 2, "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.conv.bias[...].astype(dtype)[None, None, None, :]


def _generator_activation(cfg: GanConfig):
  return nnx.relu if cfg.g_activation == "relu" else (lambda h: nnx.leaky_relu(h, 0.2))


def dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout of `h` with a given key (None or rate 0: the identity), so the
  discriminator stays a pure function of (parameters, images, key)."""
  if key is None or rate == 0:
    return h
  keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
  return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


def _scalar_head(path: str) -> dict:
  """Logical names of a dense layer with one output (the critic's logit): kept whole."""
  return {f"{path}.kernel": ("dense_in", "out"), f"{path}.bias": ("out",)}


class DCGANGenerator(nnx.Module):
  """z -> a base x base map -> k times [norm, ReLU, `depth` x (3x3 conv, norm, ReLU),
  2x up-convolution] -> tanh."""

  def __init__(self, cfg: GanConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    self.base, k = upsampling_plan(cfg.image_size)
    widths = [cfg.width * 2 ** (k - 1 - i) for i in range(k)] + [cfg.channels]
    self.project = _init(nnx.Linear, cfg)(cfg.z_dim, self.base * self.base * widths[0], dtype=dtype,
                              rngs=rngs)
    batch_norm = lambda w: nnx.BatchNorm(w, momentum=0.9, dtype=dtype, rngs=rngs)
    norm = batch_norm if cfg.g_norm == "batch" else (lambda w: None)
    self.norms = nnx.List([norm(w) for w in widths[:-1]])
    self.blocks = nnx.List([
        nnx.List([nnx.List([_init(nnx.Conv, cfg)(widths[i], widths[i], (3, 3), dtype=dtype,
                                                  rngs=rngs),
                            norm(widths[i])])
                  for _ in range(cfg.depth)]) for i in range(k)])
    self.ups = nnx.List([_init(UpConv2x, cfg)(widths[i], widths[i + 1], dtype=dtype, rngs=rngs)
                         for i in range(k)])
    annotate_layers(self, {f"ups.{k - 1}.kernel": (None, None, "conv_in", "image_channels"),
                           f"ups.{k - 1}.bias": ("image_channels",)})

  def __call__(self, z_BZ: jax.Array) -> jax.Array:
    B = z_BZ.shape[0]
    normalize = lambda norm, h: h if norm is None else norm(h)
    act = _generator_activation(self.cfg)
    h = self.project(z_BZ).reshape(B, self.base, self.base, -1)
    for i, up in enumerate(self.ups):
      h = act(normalize(self.norms[i], h))
      for conv, norm in self.blocks[i]:
        h = act(normalize(norm, conv(h)))
      h = up(h)
    return at_least_float32(jnp.tanh(h))


class DCGANDiscriminator(nnx.Module):
  """images -> k times [stride-2 4x4 conv, norm, LeakyReLU, `depth` x (3x3 conv, norm,
  LeakyReLU)] -> linear."""

  def __init__(self, cfg: GanConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    base, k = upsampling_plan(cfg.image_size)
    widths = [cfg.channels] + [cfg.width * 2 ** i for i in range(k)]

    def conv(c_in, c_out, kernel, stride):
      if cfg.d_norm == "spectral":
        return _init(SpectralNormConv, cfg)(c_in, c_out, dtype=dtype, rngs=rngs, kernel=kernel,
                                            stride=stride)
      return _init(nnx.Conv, cfg)(c_in, c_out, (kernel, kernel), strides=stride, padding="SAME",
                      dtype=dtype, rngs=rngs)

    # No normalisation after the first conv (DCGAN); layer norm suits WGAN-GP critics.
    def norm(c, first=False):
      if cfg.d_norm != "layer" or first:
        return None
      return nnx.LayerNorm(c, reduction_axes=(1, 2, 3), feature_axes=-1, dtype=dtype, rngs=rngs)

    self.convs = nnx.List([conv(widths[i], widths[i + 1], cfg.d_kernel, 2) for i in range(k)])
    self.norms = nnx.List([norm(widths[i + 1], first=i == 0) for i in range(k)])
    self.blocks = nnx.List([
        nnx.List([nnx.List([conv(widths[i + 1], widths[i + 1], 3, 1), norm(widths[i + 1])])
                  for _ in range(cfg.depth)]) for i in range(k)])
    self.head = _init(nnx.Linear, cfg)(base * base * widths[-1], 1, dtype=dtype, rngs=rngs)
    annotate_layers(self, _scalar_head("head"))

  def __call__(self, images_BHWC: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """`dropout_key`: applies `model.d_dropout` after every activation (None: none)."""
    layers = len(self.convs) * (1 + self.cfg.depth)
    keys = iter([None] * layers if dropout_key is None
                else jax.random.split(dropout_key, layers))

    def layer(conv, norm, h):
      h = conv(h)
      h = nnx.leaky_relu(h if norm is None else norm(h), 0.2)
      return dropout(h, self.cfg.d_dropout, next(keys))

    h = images_BHWC
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
      h = layer(conv, norm, h)
      for block_conv, block_norm in self.blocks[i]:
        h = layer(block_conv, block_norm, h)
    return at_least_float32(self.head(h.reshape(h.shape[0], -1))[:, 0])


class MLPGenerator(nnx.Module):
  """z [B, z_dim] -> images [B, H, W, C] in [-1, 1] through three dense layers."""

  def __init__(self, cfg: GanConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    H, W, C = cfg.image_shape
    dense = _init(nnx.Linear, cfg)
    self.layers = nnx.List([dense(cfg.z_dim, cfg.width, dtype=dtype, rngs=rngs),
                            dense(cfg.width, cfg.width, dtype=dtype, rngs=rngs),
                            dense(cfg.width, H * W * C, dtype=dtype, rngs=rngs)])
    annotate_layers(self)

  def __call__(self, z_BZ: jax.Array) -> jax.Array:
    act = _generator_activation(self.cfg)
    h = act(self.layers[0](z_BZ))
    h = act(self.layers[1](h))
    out = at_least_float32(jnp.tanh(self.layers[2](h)))
    return out.reshape(z_BZ.shape[0], *self.cfg.image_shape)


class MLPDiscriminator(nnx.Module):
  """images [B, H, W, C] -> logits [B] through three dense layers."""

  def __init__(self, cfg: GanConfig, *, rngs: nnx.Rngs):
    dtype = cfg.compute_dtype
    self.cfg = cfg
    H, W, C = cfg.image_shape
    dense = _init(nnx.Linear, cfg)
    self.layers = nnx.List([dense(H * W * C, cfg.width, dtype=dtype, rngs=rngs),
                            dense(cfg.width, cfg.width, dtype=dtype, rngs=rngs),
                            dense(cfg.width, 1, dtype=dtype, rngs=rngs)])
    annotate_layers(self, _scalar_head("layers.2"))

  def __call__(self, images_BHWC: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """`dropout_key`: applies `model.d_dropout` after both activations (None: none)."""
    keys = [None, None] if dropout_key is None else jax.random.split(dropout_key)
    h = nnx.leaky_relu(self.layers[0](images_BHWC.reshape(images_BHWC.shape[0], -1)), 0.2)
    h = dropout(h, self.cfg.d_dropout, keys[0])
    h = dropout(nnx.leaky_relu(self.layers[1](h), 0.2), self.cfg.d_dropout, keys[1])
    return at_least_float32(self.layers[2](h)[:, 0])


def build_gan(cfg: GanConfig, rngs: nnx.Rngs) -> tuple[nnx.Module, nnx.Module]:
  """(generator, discriminator) for the config."""
  if cfg.arch == "dcgan":
    return DCGANGenerator(cfg, rngs=rngs), DCGANDiscriminator(cfg, rngs=rngs)
  return MLPGenerator(cfg, rngs=rngs), MLPDiscriminator(cfg, rngs=rngs)
