"""A diffusion U-Net (DDPM, Ho et al. 2020; ADM's layout): images x [B, H, W, C], a noise
level per image and optional class labels -> a prediction [B, H, W, C] (float32).

What the output means (noise, x0, velocity, an EDM preconditioned F) is the caller's
choice. Every residual block's last conv, every attention output projection and the
final conv start at zero, so a freshly built U-Net outputs exactly zero and each block
starts as the identity. Conditioning: sinusoidal features of `noise_B` -> MLP (+ a label
embedding) -> `emb_BE`, which scales and shifts every residual block's second norm
(ADM's scale-shift norm).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.gan import dropout
from aigc_jax.nn.attention import bidirectional_attention
from aigc_jax.nn.dtypes import DTYPES, at_least_float32, layer_dtype
from aigc_jax.nn.partitioning import annotate_layers

ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "jax")
_ZERO = nnx.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's architecture (the `model` section of a diffusion run config); checked on
  construction (UserError naming the field). Level i has width * channel_mults[i]
  channels at resolution image_size / 2**i."""

  image_size: int = 28
  channels: int = 1  # image channels in and out
  width: int = 64  # channels at full resolution
  channel_mults: tuple[int, ...] = (1, 2, 2)
  blocks_per_level: int = 2  # encoder res blocks per level; the decoder has one more
  attention_levels: tuple[int, ...] = (2,)  # levels with self-attention after each res block
  head_dim: int = 32  # attention heads = channels // head_dim (at least 1)
  dropout: float = 0.0  # in residual blocks, only when called with a dropout_key
  num_classes: int = 0  # 0: unconditional; else labels in [0, num_classes], num_classes = null
  groups: int = 32  # GroupNorm groups: min(groups, smallest level's channels), for all norms
  dtype: str = "float32"  # compute dtype; parameters, norms, softmax and outputs float32
  attention: str = "einsum"  # einsum (ours) | xla | cudnn | jax (jax.nn.dot_product_attention)

  def __post_init__(self):
    # ml_collections / JSON hand lists: keep the config hashable.
    object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
    object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
    for field in ("image_size", "channels", "width", "head_dim", "blocks_per_level", "groups"):
      if getattr(self, field) < 1:
        raise UserError(f"config 'model.{field}' must be positive, got {getattr(self, field)}")
    if not self.channel_mults or min(self.channel_mults) < 1:
      raise UserError("config 'model.channel_mults' must be a non-empty list of positive "
                      f"integers, got {list(self.channel_mults)}")
    levels = len(self.channel_mults)
    if self.image_size % 2 ** (levels - 1):
      fits = 1 + next(k for k in range(levels) if self.image_size % 2 ** (k + 1))
      raise UserError(f"config 'model.image_size'={self.image_size} is not divisible by "
                      f"2**{levels - 1}, which the U-Net's {levels} levels of down-sampling "
                      f"need: use at most {fits} entries in 'model.channel_mults', or an "
                      f"image size divisible by {2 ** (levels - 1)}")
    bad = [i for i in self.attention_levels if not 0 <= i < levels]
    if bad:
      raise UserError(f"config 'model.attention_levels' has levels {bad} outside "
                      f"[0, {levels - 1}] (indices into model.channel_mults)")
    if not 0 <= self.dropout < 1:
      raise UserError(f"config 'model.dropout' must be in [0, 1), got {self.dropout}")
    if self.num_classes < 0:
      raise UserError(f"config 'model.num_classes' must be >= 0 (0: unconditional), got "
                      f"{self.num_classes}")
    if self.dtype not in DTYPES:
      raise UserError(f"config 'model.dtype' must be one of {sorted(DTYPES)}, got "
                      f"{self.dtype!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(f"config 'model.attention' must be one of {ATTENTION_IMPLEMENTATIONS}, "
                      f"got {self.attention!r}")
    if self.attention == "cudnn" and self.dtype == "float32":
      raise UserError("config 'model.attention'='cudnn' needs model.dtype bfloat16 or float16: "
                      "set one, or use 'xla' / 'einsum'")
    for c in self.level_channels:
      if c % self.norm_groups:
        raise UserError(f"config 'model.groups'={self.groups} ({self.norm_groups} used) does "
                        f"not divide a level's {c} channels: use a common divisor of "
                        f"{sorted(set(self.level_channels))}")
    for i in sorted(set(self.attention_levels) | {levels - 1}):  # the middle attends too
      c = self.level_channels[i]
      if c % max(1, c // self.head_dim):
        raise UserError(f"config 'model.head_dim'={self.head_dim}: {c} channels at level {i} "
                        f"do not split into {c // self.head_dim} heads: use a divisor of {c}")

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.width * m for m in self.channel_mults)

  @property
  def norm_groups(self) -> int:
    """GroupNorm groups of every norm (so concatenated skips split evenly too)."""
    return min(self.groups, min(self.level_channels))

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images."""
    return (self.image_size, self.image_size, self.channels)

  @property
  def compute_dtype(self):
    """The layers' compute dtype (parameters stay float32)."""
    return layer_dtype(self.dtype)


def timestep_features(noise_B: jax.Array, dim: int) -> jax.Array:
  """DDPM's sinusoidal embedding [B, dim] (dim even): sin and cos of noise_B * f for dim/2
  frequencies f from 1 down to 1/10,000 (geometric). Suits values in the hundreds to
  thousands (DDPM timesteps 0..999, EDM's 250 * ln(sigma))."""
  half = dim // 2
  freqs_F = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
  angles_BF = noise_B.astype(jnp.float32)[:, None] * freqs_F[None, :]
  return jnp.concatenate([jnp.sin(angles_BF), jnp.cos(angles_BF)], axis=-1)


def _norm(c: int, cfg: UNetConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # dtype None: float32 statistics and outputs (promoted from the float32 parameters).
  return nnx.GroupNorm(c, num_groups=cfg.norm_groups, epsilon=1e-5, rngs=rngs)


def _conv(c_in: int, c_out: int, cfg: UNetConfig, rngs: nnx.Rngs, *, stride: int = 1,
          kernel: int = 3, zero: bool = False) -> nnx.Conv:
  extra = {"kernel_init": _ZERO} if zero else {}
  return nnx.Conv(c_in, c_out, (kernel, kernel), strides=stride, padding="SAME",
                  dtype=cfg.compute_dtype, rngs=rngs, **extra)


class ResBlock(nnx.Module):
  """x [B, H, W, Ci], silu(emb) [B, E] -> [B, H, W, Co]: norm, SiLU, conv, norm scaled
  and shifted by Linear(emb) (ADM's scale-shift norm: (1 + scale) * norm(h) + shift),
  SiLU, dropout, zero-initialised conv; + skip (1x1 conv if Ci != Co)."""

  def __init__(self, c_in: int, c_out: int, emb_dim: int, cfg: UNetConfig, rngs: nnx.Rngs):
    self.rate = cfg.dropout
    self.norm1, self.conv1 = _norm(c_in, cfg, rngs), _conv(c_in, c_out, cfg, rngs)
    self.emb_proj = nnx.Linear(emb_dim, 2 * c_out, dtype=cfg.compute_dtype, rngs=rngs)
    self.norm2, self.conv2 = _norm(c_out, cfg, rngs), _conv(c_out, c_out, cfg, rngs, zero=True)
    self.skip = _conv(c_in, c_out, cfg, rngs, kernel=1) if c_in != c_out else None

  def __call__(self, x_BHWC, emb_BE, key):
    h = self.conv1(nnx.silu(self.norm1(x_BHWC)))
    scale_BC, shift_BC = jnp.split(self.emb_proj(emb_BE), 2, axis=-1)
    h = self.norm2(h) * (1 + scale_BC[:, None, None, :]) + shift_BC[:, None, None, :]
    h = dropout(nnx.silu(h), self.rate, key)
    h = self.conv2(h)
    return (x_BHWC if self.skip is None else self.skip(x_BHWC)) + h


class AttentionBlock(nnx.Module):
  """x [B, H, W, C] -> x + out_proj(attention(q, k, v of norm(x))) over the H*W positions,
  bidirectional, C // head_dim heads; out_proj starts at zero."""

  def __init__(self, c: int, cfg: UNetConfig, rngs: nnx.Rngs):
    self.heads, self.impl = max(1, c // cfg.head_dim), cfg.attention
    self.norm = _norm(c, cfg, rngs)
    dense = lambda **kw: nnx.Linear(c, c, dtype=cfg.compute_dtype, rngs=rngs, **kw)
    self.q, self.k, self.v = dense(), dense(), dense()
    self.out = dense(kernel_init=_ZERO)

  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    h_BTC = self.norm(x_BHWC).reshape(B, H * W, C)
    split = lambda y: y.reshape(B, H * W, self.heads, C // self.heads)
    out_BTNH = bidirectional_attention(split(self.q(h_BTC)), split(self.k(h_BTC)),
                                       split(self.v(h_BTC)), None, self.impl)
    return x_BHWC + self.out(out_BTNH.reshape(B, H * W, C)).reshape(B, H, W, C)


class Upsample(nnx.Module):
  """[B, H, W, C] -> [B, 2H, 2W, C]: nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, c: int, cfg: UNetConfig, rngs: nnx.Rngs):
    self.conv = _conv(c, c, cfg, rngs)

  def __call__(self, x_BHWC):
    return self.conv(jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution: res blocks (each followed by attention at attention levels), then a
  resampling layer (stride-2 conv down, Upsample up, or None)."""

  def __init__(self, blocks, attns, resample):
    self.blocks, self.attns, self.resample = nnx.List(blocks), nnx.List(attns), resample


class UNet(nnx.Module):
  """x [B, H, W, C], noise_B [B], labels_B [B] | None -> out [B, H, W, C] (float32)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, E, chans = cfg.compute_dtype, 4 * cfg.width, cfg.level_channels
    self.features = 2 * max(1, cfg.width // 2)
    self.time_mlp = nnx.List([nnx.Linear(self.features, E, dtype=dtype, rngs=rngs),
                              nnx.Linear(E, E, dtype=dtype, rngs=rngs)])
    self.label_embed = (nnx.Embed(cfg.num_classes + 1, E, dtype=dtype, rngs=rngs)
                        if cfg.num_classes else None)
    self.conv_in = _conv(cfg.channels, cfg.width, cfg, rngs)
    attn = lambda i, c: AttentionBlock(c, cfg, rngs) if i in cfg.attention_levels else None
    skips, c, down = [cfg.width], cfg.width, []
    for i, c_out in enumerate(chans):
      blocks, attns = [], []
      for _ in range(cfg.blocks_per_level):
        blocks.append(ResBlock(c, c_out, E, cfg, rngs))
        attns.append(attn(i, c_out))
        c = c_out
        skips.append(c)
      last = i == len(chans) - 1
      down.append(Level(blocks, attns, None if last else _conv(c, c, cfg, rngs, stride=2)))
      skips += [] if last else [c]
    self.down = nnx.List(down)
    self.mid = nnx.List([ResBlock(c, c, E, cfg, rngs), AttentionBlock(c, cfg, rngs),
                         ResBlock(c, c, E, cfg, rngs)])
    up = []
    for i in reversed(range(len(chans))):
      blocks, attns = [], []
      for _ in range(cfg.blocks_per_level + 1):
        blocks.append(ResBlock(c + skips.pop(), chans[i], E, cfg, rngs))
        attns.append(attn(i, chans[i]))
        c = chans[i]
      up.append(Level(blocks, attns, Upsample(c, cfg, rngs) if i else None))
    self.up = nnx.List(up)
    self.norm_out = _norm(c, cfg, rngs)
    self.conv_out = _conv(c, cfg.channels, cfg, rngs, zero=True)
    overrides = {"conv_in.kernel": (None, None, "image_channels", "conv_out"),
                 "conv_out.kernel": (None, None, "conv_in", "image_channels"),
                 "conv_out.bias": ("image_channels",)}
    if self.label_embed is not None:
      overrides["label_embed.embedding"] = ("classes", "dense_out")
    annotate_layers(self, overrides)

  def __call__(self, x_BHWC: jax.Array, noise_B: jax.Array, labels_B: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """x_BHWC: noisy images; noise_B: the noise level per image, in the hundreds to
    thousands (DDPM: the timestep 0..999; EDM: 250 * ln(sigma)); labels_B: ints in
    [0, num_classes], num_classes meaning no label (None: all unlabelled; must be None
    when num_classes is 0); dropout_key: applies model.dropout (None: none).
    Returns [B, H, W, C] float32."""
    cfg = self.cfg
    B = x_BHWC.shape[0]
    if x_BHWC.shape[1:] != cfg.image_shape:
      raise ValueError(f"U-Net input must be [B, {', '.join(map(str, cfg.image_shape))}], got "
                       f"{list(x_BHWC.shape)}")
    if noise_B.shape != (B,):
      raise ValueError(f"noise_B must have shape [{B}], got {list(noise_B.shape)}")
    if cfg.num_classes == 0 and labels_B is not None:
      raise ValueError("labels_B must be None for an unconditional U-Net (model.num_classes "
                       "is 0): set model.num_classes to condition on labels")
    emb_BE = self.time_mlp[1](nnx.silu(self.time_mlp[0](timestep_features(noise_B,
                                                                          self.features))))
    if self.label_embed is not None:
      if labels_B is None:
        labels_B = jnp.full((B,), cfg.num_classes, jnp.int32)
      if labels_B.shape != (B,):
        raise ValueError(f"labels_B must have shape [{B}], got {list(labels_B.shape)}")
      emb_BE = emb_BE + self.label_embed(labels_B)
    emb_BE = nnx.silu(emb_BE)
    count = itertools.count()  # one dropout key per res block
    key = lambda: None if dropout_key is None else jax.random.fold_in(dropout_key, next(count))

    h = self.conv_in(x_BHWC)
    skips = [h]
    for level in self.down:
      for block, attn in zip(level.blocks, level.attns, strict=True):
        h = block(h, emb_BE, key())
        h = h if attn is None else attn(h)
        skips.append(h)
      if level.resample is not None:
        h = level.resample(h)
        skips.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, emb_BE, key())), emb_BE, key())
    for level in self.up:
      for block, attn in zip(level.blocks, level.attns, strict=True):
        skip = skips.pop()
        h = block(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), emb_BE, key())
        h = h if attn is None else attn(h)
      if level.resample is not None:
        h = level.resample(h)
    return at_least_float32(self.conv_out(nnx.silu(self.norm_out(h))))
