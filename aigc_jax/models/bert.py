"""BERT-family bidirectional encoder (Flax NNX): sentence embeddings, features for heads.

Token + position + segment embeddings, summed and layer-normed; L post-LayerNorm blocks
(x = norm(x + attn(x)), x = norm(x + mlp(x))) with biased projections, exact (erf) GELU
and a padding mask from the attention mask; Devlin et al. 2019, as Hugging Face's
`BertModel` computes it. Parameters are float32; `dtype` is the compute dtype of the
matmuls, while embeddings, LayerNorms and the residual stream stay float32, so hidden
states come out float32.

Dropout (after the embeddings and on each sub-layer's output, BERT's hidden dropout)
follows the transformer's convention: each dropout layer holds its own key stream, a new
encoder starts in evaluation mode, `model.train()` turns dropout on, and pure steps use
`models.transformer.detach_dropout_rngs` / `train_with_key`. Attention-probability
dropout is not implemented (the shared attention kernels have none).

  model = BertEncoder(BertConfig(...), rngs=nnx.Rngs(0))
  emb_BD = model.sentence_embedding(ids_BT, mask_BT)  # unit length, mean pooled
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.transformer import check_tokens
from aigc_jax.nn.attention import bidirectional_attention
from aigc_jax.nn.concrete import concrete_values
from aigc_jax.nn.dtypes import DTYPES
from aigc_jax.nn.linear import Linear, dropout_layer
from aigc_jax.nn.partitioning import annotate, constrain

ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "jax")  # see bidirectional_attention
POOLINGS = ("mean", "cls")
_ACT_BTD = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The encoder's shape and runtime settings (frozen). Sizes: vocab_size V, hidden D,
  num_layers L, num_heads N (head dim D // N), mlp_dim F, max_positions P (the position
  table's rows, the longest input), type_vocab_size (segments). Defaults: BERT-base."""

  vocab_size: int = 30522
  hidden: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.0  # BERT's hidden dropout (embeddings, attention and MLP outputs)
  dtype: str = "float32"  # matmul compute dtype; parameters stay float32
  attention: str = "einsum"  # one of ATTENTION_IMPLEMENTATIONS
  pooling: str = "mean"  # 'mean' (masked mean, sentence-transformers) or 'cls'

  def __post_init__(self):
    if self.hidden % self.num_heads:
      raise UserError(f"BERT hidden={self.hidden} is not a multiple of num_heads="
                      f"{self.num_heads}: choose sizes where heads split the width evenly")
    choices = {"dtype": tuple(DTYPES), "attention": ATTENTION_IMPLEMENTATIONS,
               "pooling": POOLINGS}
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise UserError(f"BERT {field}={getattr(self, field)!r} is not supported: choose one "
                        f"of {list(allowed)}")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"BERT dropout={self.dropout} must be in [0, 1)")

  @property
  def head_dim(self) -> int:
    """H = D // N."""
    return self.hidden // self.num_heads

  @property
  def max_seq_len(self) -> int:
    """The longest input: the position table's rows (the name the transformer uses)."""
    return self.max_positions

  def check_sharding(self, shards) -> None:
    """UserError unless each logical axis splits whole: `shards(name)` is the number of
    pieces the mesh rules cut a dimension named `name` into (heads must split whole)."""
    sizes = {"heads": ("num_heads", self.num_heads, "attn.query / key / value / out"),
             "mlp": ("mlp_dim", self.mlp_dim, "mlp.up / down"),
             "vocab": ("vocab_size", self.vocab_size, "word_embed"),
             "embed": ("hidden", self.hidden, "every kernel's embed axis")}
    for name, (field, size, params) in sizes.items():
      n = shards(name)
      if size % n:
        raise UserError(f"the encoder's {field}={size} does not split over the {n} devices "
                        f"its rule gives (mesh.rules.{name}; parameters layers.*.{params}): "
                        f"set mesh.rules.{name}='' or use a mesh of a divisor of {size}")

  def num_params(self) -> int:
    """The parameter count (embeddings included; no pooler)."""
    D, F = self.hidden, self.mlp_dim
    per_layer = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D
    embeddings = (self.vocab_size + self.max_positions + self.type_vocab_size) * D + 2 * D
    return embeddings + self.num_layers * per_layer


class BiasedLinear(Linear):
  """`Linear` plus a bias [O] (float32, zeros at init, named by the kernel's output axis).
  A `Linear` subclass, so `add_lora` adapts it the same way; the adapter leaves the bias
  alone."""

  def __init__(self, in_features: int, out_features: int, *, axes=(None, None), **kwargs):
    super().__init__(in_features, out_features, axes=axes, **kwargs)
    self.bias = annotate(nnx.Param(jnp.zeros((out_features,), jnp.float32)), (axes[1],))

  def __call__(self, x_NI: jax.Array) -> jax.Array:
    y_NO = super().__call__(x_NI)
    # Broadcast spelled out: the tests run with rank promotion set to raise.
    return y_NO + self.bias[...].astype(self.dtype).reshape((1,) * (y_NO.ndim - 1) + (-1,))


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # The two-pass variance (E[(x - mean)^2]) as PyTorch computes it: the one-pass
  # E[x^2] - E[x]^2 loses digits on BERT's large-mean residual stream.
  norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                       rngs=rngs)
  annotate(norm.scale, ("norm",))
  annotate(norm.bias, ("norm",))
  return norm


def _embed(num: int, cfg: BertConfig, names, rngs: nnx.Rngs) -> nnx.Embed:
  embed = nnx.Embed(num, cfg.hidden, param_dtype=jnp.float32,
                    embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
  annotate(embed.embedding, names)
  return embed


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biased Q/K/V/O projections, [B, T, D]
  (compute dtype) -> [B, T, D]; keys where `key_mask_BT` is False are never attended to."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.implementation = (cfg.num_heads, cfg.head_dim,
                                                          cfg.attention)
    linear = lambda axes: BiasedLinear(cfg.hidden, cfg.hidden, dtype=DTYPES[cfg.dtype],
                                       axes=axes, rngs=rngs)
    # Megatron's split: Q, K, V column-parallel (by head), O row-parallel.
    self.query = linear(("embed", "heads"))
    self.key = linear(("embed", "heads"))
    self.value = linear(("embed", "heads"))
    self.out = linear(("heads", "embed"))

  def __call__(self, x_BTD: jax.Array, key_mask_BT: jax.Array) -> jax.Array:
    B, T, _ = x_BTD.shape
    heads = lambda proj: constrain(proj(x_BTD).reshape(B, T, self.num_heads, self.head_dim),
                                   ("act_batch", "act_length", "act_heads", None))
    out_BTNH = bidirectional_attention(heads(self.query), heads(self.key), heads(self.value),
                                       key_mask_BT, self.implementation)
    return self.out(out_BTNH.reshape(B, T, self.num_heads * self.head_dim))


class Mlp(nnx.Module):
  """down(gelu(up(x))) with biases and the exact (erf) GELU that BERT uses."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    self.up = BiasedLinear(cfg.hidden, cfg.mlp_dim, dtype=dtype, axes=("embed", "mlp"),
                           rngs=rngs)
    self.down = BiasedLinear(cfg.mlp_dim, cfg.hidden, dtype=dtype, axes=("mlp", "embed"),
                             rngs=rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    h_BTF = constrain(jax.nn.gelu(self.up(x_BTD), approximate=False),
                      ("act_batch", "act_length", "act_mlp"))
    return self.down(h_BTF)


class Layer(nnx.Module):
  """One post-LayerNorm block, [B, T, D] float32 -> [B, T, D] float32:
  x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.attn = SelfAttention(cfg, rngs)
    self.attn_norm = _layer_norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs)
    self.mlp_norm = _layer_norm(cfg, rngs)
    self.dropout = dropout_layer(cfg.dropout, rngs)
    self.dtype = DTYPES[cfg.dtype]

  def __call__(self, x_BTD: jax.Array, key_mask_BT: jax.Array) -> jax.Array:
    h_BTD = self.attn(x_BTD.astype(self.dtype), key_mask_BT)
    x_BTD = self.attn_norm(x_BTD + self.dropout(h_BTD).astype(jnp.float32))
    h_BTD = self.mlp(x_BTD.astype(self.dtype))
    x_BTD = self.mlp_norm(x_BTD + self.dropout(h_BTD).astype(jnp.float32))
    return constrain(x_BTD, _ACT_BTD)


class BertEncoder(nnx.Module):
  """input ids [B, T] int + attention mask [B, T] (1 token, 0 padding) -> hidden states
  [B, T, D] float32. Built in evaluation mode (`model.train()` turns dropout on)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word_embed = _embed(cfg.vocab_size, cfg, ("vocab", "embed"), rngs)
    # Positions and segments are few rows, read whole by every token: never split.
    self.position_embed = _embed(cfg.max_positions, cfg, (None, "embed"), rngs)
    self.type_embed = _embed(cfg.type_vocab_size, cfg, (None, "embed"), rngs)
    self.embed_norm = _layer_norm(cfg, rngs)
    self.embed_dropout = dropout_layer(cfg.dropout, rngs)
    self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_layers)])

  def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
               token_type_ids_BT: jax.Array | None = None) -> jax.Array:
    """Hidden states [B, T, D] float32 of every position; rows at padding positions are
    finite but meaningless (they attend to the real tokens only, as in `BertModel`)."""
    self._check_inputs(input_ids_BT, attention_mask_BT, token_type_ids_BT)
    T = input_ids_BT.shape[1]
    if token_type_ids_BT is None:
      token_type_ids_BT = jnp.zeros_like(input_ids_BT)
    # As in the transformer: the table read whole along its embedding axis, split along
    # the vocabulary as the rules say.
    table_VD = constrain(self.word_embed.embedding[...], ("act_vocab", None))
    x_BTD = (jnp.take(table_VD, input_ids_BT, axis=0)
             + self.position_embed.embedding[...][:T][None]
             + jnp.take(self.type_embed.embedding[...], token_type_ids_BT, axis=0))
    x_BTD = constrain(self.embed_dropout(self.embed_norm(x_BTD)), _ACT_BTD)
    key_mask_BT = attention_mask_BT.astype(bool)
    for layer in self.layers:
      x_BTD = layer(x_BTD, key_mask_BT)
    return x_BTD

  def _check_inputs(self, ids_BT, mask_BT, types_BT) -> None:
    cfg = self.cfg
    check_tokens(ids_BT, cfg.vocab_size)
    shape = tuple(jnp.shape(ids_BT))
    if tuple(jnp.shape(mask_BT)) != shape:
      raise UserError(f"attention mask has shape {tuple(jnp.shape(mask_BT))} but the input ids "
                      f"{shape}: give one mask value (1 token, 0 padding) per id")
    if shape[1] > cfg.max_positions:
      raise UserError(f"inputs of {shape[1]} tokens are longer than the model's "
                      f"{cfg.max_positions} positions: truncate them (encode_batch's max_len)")
    if types_BT is None:
      return
    if tuple(jnp.shape(types_BT)) != shape:
      raise UserError(f"token type ids have shape {tuple(jnp.shape(types_BT))} but the input "
                      f"ids {shape}: give one segment id per id (or None for all 0)")
    values = concrete_values(types_BT)
    if values is not None and values.size and (values.min() < 0
                                               or values.max() >= cfg.type_vocab_size):
      raise UserError(f"token type ids must lie in [0, {cfg.type_vocab_size}), got "
                      f"{int(values.min())}..{int(values.max())}")

  def pool(self, hidden_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """[B, D] float32 by `cfg.pooling`: 'mean' over the real tokens (padding excluded,
    an all-padding row gives zeros), 'cls' the first position's state."""
    if self.cfg.pooling == "cls":
      return hidden_BTD[:, 0].astype(jnp.float32)
    return masked_mean(hidden_BTD, mask_BT)

  def sentence_embedding(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                         token_type_ids_BT: jax.Array | None = None) -> jax.Array:
    """Pooled, then L2-normalised [B, D] float32: with 'mean' pooling what
    sentence-transformers computes for all-MiniLM-L6-v2 (cosine = dot product)."""
    hidden_BTD = self(input_ids_BT, attention_mask_BT, token_type_ids_BT)
    return l2_normalize(self.pool(hidden_BTD, attention_mask_BT))


def masked_mean(hidden_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean over the positions where mask is 1, [B, D] float32 (the count clamped at 1e-9,
  as sentence-transformers does, so an empty row gives zeros rather than NaN)."""
  mask_BT1 = mask_BT.astype(jnp.float32)[:, :, None]
  total_BD = (hidden_BTD.astype(jnp.float32) * mask_BT1).sum(axis=1)
  return total_BD / jnp.maximum(mask_BT1.sum(axis=1), 1e-9)


def l2_normalize(x_BD: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) per row (PyTorch's F.normalize)."""
  norm_B1 = jnp.linalg.norm(x_BD, axis=-1, keepdims=True)
  return x_BD / jnp.maximum(norm_B1, eps)
