"""A small diffusion transformer (DiT, Peebles & Xie 2023) built from the LM's parts:
images x [B, H, W, C], a noise level per image and optional class labels -> a prediction
[B, H, W, C] (float32), the same contract as `aigc_jax.models.unet.UNet`, so every
objective and sampler serves both.

The image is cut into p x p patches (T = (H / p) * (W / p) tokens of width D) with fixed
2-D sine-cosine positions. Each block is pre-norm attention (our `bidirectional_attention`)
and a SwiGLU MLP (`nn.mlp.SwiGLU`), both on our bias-free `nn.linear.Linear`, with
adaLN-Zero conditioning: the noise level's sinusoidal features (the U-Net's) through an
MLP, plus a label embedding, give c [B, D]; a zero-initialised projection of silu(c) gives
each block's shift, scale and gate for both branches, so every block starts as the
identity and a fresh DiT outputs exactly zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.gan import dropout
from aigc_jax.models.unet import ATTENTION_IMPLEMENTATIONS, timestep_features
from aigc_jax.nn.attention import bidirectional_attention
from aigc_jax.nn.dtypes import DTYPES, at_least_float32, layer_dtype
from aigc_jax.nn.linear import Linear
from aigc_jax.nn.mlp import SwiGLU
from aigc_jax.nn.partitioning import annotate, constrain

_ZERO = nnx.initializers.zeros_init()
_HEADS = ("act_batch", "act_length", "act_heads", None)
_TOKENS = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """The DiT's architecture (the `model` section of a diffusion run with model.arch='dit');
  checked on construction (UserError naming the field)."""

  image_size: int = 28
  channels: int = 1  # image channels in and out
  patch_size: int = 2  # tokens are patch_size x patch_size patches
  dim: int = 256  # token width D
  depth: int = 6  # transformer blocks
  head_dim: int = 64  # attention heads = dim // head_dim
  mlp_dim: int = 1024  # SwiGLU hidden width
  dropout: float = 0.0  # on each branch's output, only when called with a dropout_key
  num_classes: int = 0  # 0: unconditional; else labels in [0, num_classes], num_classes = null
  dtype: str = "float32"  # compute dtype; parameters, norms, softmax and outputs float32
  attention: str = "einsum"  # einsum (ours) | xla | cudnn | jax

  def __post_init__(self):
    for field in ("image_size", "channels", "patch_size", "dim", "depth", "head_dim",
                  "mlp_dim"):
      if getattr(self, field) < 1:
        raise UserError(f"config 'model.{field}' must be positive, got {getattr(self, field)}")
    if self.image_size % self.patch_size:
      raise UserError(f"config 'model.image_size'={self.image_size} is not divisible by "
                      f"model.patch_size={self.patch_size}: use a patch size that divides it")
    if self.dim % self.head_dim:
      raise UserError(f"config 'model.head_dim'={self.head_dim} does not divide model.dim="
                      f"{self.dim} into heads: use a divisor of {self.dim}")
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

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images."""
    return (self.image_size, self.image_size, self.channels)

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def heads(self) -> int:
    return self.dim // self.head_dim

  @property
  def compute_dtype(self):
    return layer_dtype(self.dtype)


def sincos_positions(grid: int, dim: int) -> np.ndarray:
  """Fixed 2-D positions [grid * grid, dim] (row-major patches): half the features encode
  the row, half the column, each as sin and cos at dim / 4 geometric frequencies."""
  quarter = max(dim // 4, 1)
  freqs = 1.0 / 10_000 ** (np.arange(quarter) / quarter)
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  angles = lambda pos: pos.reshape(-1, 1) * freqs[None]
  table = np.concatenate([np.sin(angles(rows)), np.cos(angles(rows)),
                          np.sin(angles(cols)), np.cos(angles(cols))], axis=1)
  return np.pad(table, ((0, 0), (0, dim - table.shape[1]))).astype(np.float32)


def patchify(x_BHWC: jax.Array, p: int) -> jax.Array:
  """Images [B, H, W, C] -> tokens [B, (H / p) * (W / p), p * p * C]: the p x p patches in
  row-major order, each flattened row-major (pixel rows, then columns, then channels)."""
  B, H, W, C = x_BHWC.shape
  patches = x_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens_BTP: jax.Array, p: int, image_shape: tuple[int, int, int]) -> jax.Array:
  """The inverse of `patchify`: tokens [B, T, p * p * C] -> images [B, H, W, C]."""
  H, W, C = image_shape
  B = tokens_BTP.shape[0]
  patches = tokens_BTP.reshape(B, H // p, W // p, p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(B, H, W, C)


def _layer_norm(x_BTD: jax.Array) -> jax.Array:
  """LayerNorm without scale or bias (adaLN supplies them), in float32."""
  x = x_BTD.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def _modulation(dim: int, outputs: int, rngs: nnx.Rngs) -> nnx.Linear:
  """silu(c) [B, D] -> outputs x D shifts, scales and gates; zero-initialised (adaLN-Zero)."""
  layer = nnx.Linear(dim, outputs * dim, kernel_init=_ZERO, rngs=rngs)
  annotate(layer.kernel, ("embed", "mlp"))
  annotate(layer.bias, ("mlp",))
  return layer


def _modulate(x_BTD, shift_BD, scale_BD):
  return x_BTD * (1 + scale_BD[:, None, :]) + shift_BD[:, None, :]


class DiTBlock(nnx.Module):
  """x [B, T, D], silu(c) [B, D] -> [B, T, D]: x + gate * attention(adaLN(x)), then
  x + gate * SwiGLU(adaLN(x)); shift, scale and gate of each from silu(c)."""

  def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, D = cfg.compute_dtype, cfg.dim
    linear = lambda axes: Linear(D, D, dtype=dtype, axes=axes, rngs=rngs)
    self.q, self.k, self.v = (linear(("embed", "heads")) for _ in range(3))
    self.o = linear(("heads", "embed"))
    self.mlp = SwiGLU(D, cfg.mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.modulation = _modulation(D, 6, rngs)

  def __call__(self, x_BTD, c_BD, key):
    cfg = self.cfg
    B, T, D = x_BTD.shape
    mod = jnp.split(self.modulation(c_BD), 6, axis=-1)  # shift, scale, gate: attn, mlp
    keys = (None, None) if key is None else jax.random.split(key)
    h = _modulate(_layer_norm(x_BTD), mod[0], mod[1])
    split = lambda y: constrain(y.reshape(B, T, cfg.heads, cfg.head_dim), _HEADS)
    attended = bidirectional_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)),
                                       None, cfg.attention)
    out = dropout(self.o(attended.reshape(B, T, D)), cfg.dropout, keys[0])
    x_BTD = x_BTD + mod[2][:, None, :] * at_least_float32(out)
    h = _modulate(_layer_norm(x_BTD), mod[3], mod[4])
    out = dropout(self.mlp(h.astype(cfg.compute_dtype)), cfg.dropout, keys[1])
    return constrain(x_BTD + mod[5][:, None, :] * at_least_float32(out), _TOKENS)


class DiT(nnx.Module):
  """x [B, H, W, C], noise_B [B], labels_B [B] | None -> out [B, H, W, C] (float32)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, D, p = cfg.compute_dtype, cfg.dim, cfg.patch_size
    self.features = 2 * max(1, D // 2)
    self.patch_embed = Linear(p * p * cfg.channels, D, dtype=dtype,
                              axes=("image_channels", "embed"), rngs=rngs)
    self.time_mlp = nnx.List([
        Linear(self.features, D, dtype=dtype, axes=(None, "mlp"), rngs=rngs),
        Linear(D, D, dtype=dtype, axes=("mlp", "embed"), rngs=rngs)])
    self.label_embed = (nnx.Embed(cfg.num_classes + 1, D, dtype=dtype, rngs=rngs)
                        if cfg.num_classes else None)
    if self.label_embed is not None:
      annotate(self.label_embed.embedding, ("classes", "embed"))
    self.blocks = nnx.List([DiTBlock(cfg, rngs) for _ in range(cfg.depth)])
    self.final_modulation = _modulation(D, 2, rngs)
    self.unpatch = Linear(D, p * p * cfg.channels, dtype=dtype, kernel_init=_ZERO,
                          axes=("embed", "image_channels"), rngs=rngs)

  def __call__(self, x_BHWC: jax.Array, noise_B: jax.Array, labels_B: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """As `UNet.__call__`: noise_B in the hundreds to thousands; labels_B ints in
    [0, num_classes] (num_classes: no label; None: all unlabelled; must be None when
    num_classes is 0); dropout_key applies model.dropout. Returns [B, H, W, C] float32."""
    cfg = self.cfg
    B = x_BHWC.shape[0]
    if x_BHWC.shape[1:] != cfg.image_shape:
      raise ValueError(f"DiT input must be [B, {', '.join(map(str, cfg.image_shape))}], got "
                       f"{list(x_BHWC.shape)}")
    if noise_B.shape != (B,):
      raise ValueError(f"noise_B must have shape [{B}], got {list(noise_B.shape)}")
    if cfg.num_classes == 0 and labels_B is not None:
      raise ValueError("labels_B must be None for an unconditional DiT (model.num_classes "
                       "is 0): set model.num_classes to condition on labels")
    c_BD = self.time_mlp[1](nnx.silu(self.time_mlp[0](timestep_features(noise_B,
                                                                       self.features))))
    if self.label_embed is not None:
      if labels_B is None:
        labels_B = jnp.full((B,), cfg.num_classes, jnp.int32)
      if labels_B.shape != (B,):
        raise ValueError(f"labels_B must have shape [{B}], got {list(labels_B.shape)}")
      c_BD = c_BD + self.label_embed(labels_B)
    c_BD = nnx.silu(c_BD.astype(jnp.float32))

    x_BTD = at_least_float32(self.patch_embed(patchify(x_BHWC, cfg.patch_size)))
    x_BTD = constrain(x_BTD + sincos_positions(cfg.grid, cfg.dim)[None], _TOKENS)
    for i, block in enumerate(self.blocks):
      x_BTD = block(x_BTD, c_BD, None if dropout_key is None
                    else jax.random.fold_in(dropout_key, i))
    shift_BD, scale_BD = jnp.split(self.final_modulation(c_BD), 2, axis=-1)
    out = self.unpatch(_modulate(_layer_norm(x_BTD), shift_BD, scale_BD))
    return at_least_float32(unpatchify(out, cfg.patch_size, cfg.image_shape))
