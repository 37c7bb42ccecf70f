"""Decoder-only transformer language model, Llama-style (Flax NNX).

RMSNorm pre-normalisation, rotary positions, SwiGLU MLP, grouped-query attention,
optional tied embeddings, dropout and block rematerialisation (by a named
`jax.checkpoint_policies` policy). Parameters are float32; `dtype` is the compute dtype;
logits are returned in float32.

Layer layouts: by default the L blocks are L modules (`blocks.0`, `blocks.1`, ...), unrolled
in the compiled program. With `scan_layers=True` they are one module whose parameters carry
a leading layer axis of size L (logical name None: never split) and run under
`jax.lax.scan`, so compile time does not grow with depth; `block_layout.stack_blocks` /
`unstack_blocks` convert parameter dicts between the layouts. Pretrained import/export
and LoRA read the unrolled layout (`block_layout.require_unrolled`).

Dropout follows NNX's convention: each dropout layer holds its own key stream (forked from
the 'dropout' stream of the `rngs` the model is built with), and `model.train()` /
`model.eval()` switch it on and off; no call takes a `deterministic` flag or keys. Unlike a
bare `nnx.Dropout`, a new `Transformer` starts in evaluation mode (dropout off), so that
inference and `generate` on a fresh or loaded model are deterministic: call
`model.train()` before training with dropout. Pure steps that merge the model from a
parameter dict use `detach_dropout_rngs` (for the graphdef) and `train_with_key` (in the
step, with the step's key).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.nn import Attention, KVCache, SwiGLU, init_kv_cache
from aigc_jax.nn.concrete import concrete_values
from aigc_jax.nn.cross_entropy import linear_cross_entropy
from aigc_jax.nn.dense import dense
from aigc_jax.nn.dtypes import DTYPES
from aigc_jax.nn.linear import Linear, dropout_layer
from aigc_jax.nn.partitioning import annotate, constrain
from aigc_jax.nn.rope import rope_angles, rope_angles_from_zero

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "einsum", "xla", "cudnn", "jax")
# Rematerialisation of each block in training: 'none' keeps every activation, 'full'
# recomputes the block in the backward pass, the rest name `jax.checkpoint_policies` (what
# the backward pass may keep instead of recomputing).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable")


def checkpoint_policy(name: str):
  """The `jax.checkpoint` policy of a REMAT_POLICIES name (None for 'full': save nothing)."""
  if name not in REMAT_POLICIES or name == "none":
    raise ValueError(f"no checkpoint policy for remat policy {name!r}")
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


def resolve_attention(name: str) -> str:
  """'auto': cuDNN's fused kernel on GPU, our blockwise causal attention on CPU (it skips
  the masked key blocks), our einsum attention elsewhere (both faster than XLA's generic
  path on CPU)."""
  if name != "auto":
    return name
  backend = jax.default_backend()
  return {"gpu": "cudnn", "cpu": "blockwise"}.get(backend, "einsum")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The transformer's shape and runtime settings (frozen). Sizes: vocab_size V,
  num_layers L, num_heads N, num_kv_heads K (grouped-query attention when K < N),
  embed_dim D, mlp_dim F, head_dim H (0: D // N); max_seq_len bounds decoding."""

  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  mlp_dim: int
  head_dim: int = 0  # 0: embed_dim // num_heads
  max_seq_len: int = 2048  # longest sequence decoding may reach (cache size bound)
  dropout: float = 0.0
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  attention: str = "auto"
  remat: bool = False  # older configs' switch: True is remat_policy 'full'
  remat_policy: str = "none"  # one of REMAT_POLICIES
  scan_layers: bool = False  # stacked blocks under lax.scan (module docstring)
  # Training/evaluation losses form [B, logits_chunk, V] logits at a time (0: all T at
  # once); see nn.cross_entropy. Worth it when V is large.
  logits_chunk: int = 0
  # The context length of the pretrained file the weights came from (0: none, or
  # max_seq_len): what export writes, whatever max_seq_len the model was loaded with.
  pretrained_max_seq_len: int = 0

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise UserError(f"config 'model.remat_policy'={self.remat_policy!r} is not a known "
                      f"policy: choose one of {list(REMAT_POLICIES)}")
    if self.scan_layers and self.num_layers < 1:
      raise UserError(f"config 'model.num_layers'={self.num_layers} with model.scan_layers=True: "
                      "a scan needs at least one block")

  @property
  def resolved_remat_policy(self) -> str:
    """remat_policy, with the older `remat=True` meaning 'full' when no policy is named."""
    return "full" if self.remat and self.remat_policy == "none" else self.remat_policy

  @property
  def resolved_head_dim(self) -> int:
    """H: head_dim, or embed_dim // num_heads when head_dim is 0."""
    return self.head_dim or self.embed_dim // self.num_heads

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> TransformerConfig:
    """From the `model` section of a run config (a ConfigDict or mapping)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model_cfg).items() if k in fields}
    values.update(overrides)
    return cls(**values)

  def num_params(self, include_embeddings: bool = True) -> int:
    """The parameter count (optionally without the embedding / output matrices)."""
    D, H = self.embed_dim, self.resolved_head_dim
    attn = D * H * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * D * self.mlp_dim + 2 * D
    emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + D + (emb if include_embeddings else 0)

  def check_sharding(self, shards) -> None:
    """UserError unless each logical axis splits whole: `shards(name)` is the number of
    pieces the mesh rules cut a dimension named `name` into. Heads must split whole (a
    flattened heads x head_dim axis that merely divides would cut heads apart)."""
    sizes = {"heads": ("model.num_heads", self.num_heads, "attn.q_proj / o_proj kernels"),
             "kv_heads": ("model.num_kv_heads", self.num_kv_heads,
                          "attn.k_proj / v_proj kernels"),
             "mlp": ("model.mlp_dim", self.mlp_dim, "mlp.gate / up / down kernels"),
             "vocab": ("model.vocab_size", self.vocab_size, "embed.embedding, lm_head"),
             "embed": ("model.embed_dim", self.embed_dim, "every kernel's embed axis")}
    for name, (field, size, params) in sizes.items():
      n = shards(name)
      if size % n:
        raise UserError(f"config '{field}'={size} does not split over the {n} devices its "
                        f"rule gives (mesh.rules.{name}; parameters blocks.*.{params}): "
                        f"choose a multiple of {n}, or set mesh.rules.{name}=''")

  def flops_per_token(self, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token, MaxText's convention: 2 per multiply-add, causal attention
    counted at half, training = 3x forward."""
    D, H, L = self.embed_dim, self.resolved_head_dim, self.num_layers
    proj = 2 * D * H * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 2 * 3 * D * self.mlp_dim
    attn = 2 * 2 * seq_len * self.num_heads * H / 2  # QK^T and AV, causal half
    head = 2 * D * self.vocab_size
    forward = L * (proj + mlp + attn) + head
    return forward * (3 if training else 1)


def check_tokens(tokens_BT, vocab_size: int) -> None:
  """Rank and dtype always; the id range too when the values are concrete (outside jit)."""
  shape, dtype = jnp.shape(tokens_BT), jnp.result_type(tokens_BT)
  if len(shape) != 2:
    raise UserError(f"tokens must have shape [batch, seq_len], got shape {shape}: add a batch "
                    "axis with tokens[None] for a single sequence")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise UserError(f"tokens must be integer ids, got dtype {dtype}")
  values = concrete_values(tokens_BT)
  if values is None:
    return  # traced: checked where the data enters (tokenizer, batcher, generate)
  if values.size and (values.min() < 0 or values.max() >= vocab_size):
    bad = values[(values < 0) | (values >= vocab_size)][0]
    raise UserError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size})")


_ACT_BTD = ("act_batch", "act_length", "act_embed")


def _rms_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  norm = nnx.RMSNorm(cfg.embed_dim, epsilon=cfg.norm_eps, rngs=rngs)
  annotate(norm.scale, ("norm",))
  return norm


class Block(nnx.Module):
  """One pre-norm decoder block, [B, T, D] -> [B, T, D]: x + attn(norm(x)), then
  x + mlp(norm(x))."""

  def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
    dtype = DTYPES[cfg.dtype]
    impl = resolve_attention(cfg.attention)
    if impl == "cudnn" and cfg.dtype == "float32":
      impl = "jax"  # cuDNN's fused attention needs 16-bit inputs
    self.attn_norm = _rms_norm(cfg, rngs)
    self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                          rope_base=cfg.rope_base, implementation=impl, dtype=dtype,
                          param_dtype=jnp.float32, rngs=rngs)
    self.mlp_norm = _rms_norm(cfg, rngs)
    self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.dropout = dropout_layer(cfg.dropout, rngs)
    self.dtype = dtype

  def __call__(self, x_BTD, angles, cache, cache_index, mask_B1TS):
    # Norms run in float32 (the residual stream's dtype); matmuls in the compute dtype.
    h = self.attn_norm(x_BTD).astype(self.dtype)
    h, cache = self.attn(h, angles, cache=cache, cache_index=cache_index, mask_B1TS=mask_B1TS)
    x_BTD = x_BTD + self.dropout(h).astype(jnp.float32)
    h = self.mlp(self.mlp_norm(x_BTD).astype(self.dtype))
    x_BTD = x_BTD + self.dropout(h).astype(jnp.float32)
    return constrain(x_BTD, _ACT_BTD), cache


def _run_block(block, x, angles):
  return block(x, angles, None, None, None)[0]


def _stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters have a leading layer axis of size L (logical name None),
  each layer initialised from its own split of `rngs`."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
  def build(rngs):
    return Block(cfg, rngs)

  blocks = build(rngs)
  # The vmapped build gives each dropout layer a batch of L key streams. One unbatched
  # stream instead, like every other dropout layer's (what `train_with_key` and
  # `nnx.reseed` handle): `_scan_blocks` draws from it once per call and splits the key
  # into the L layers' keys.
  for layer in _dropout_layers(blocks):
    layer.rngs = dropout_layer(layer.rate, rngs).rngs
  return blocks


def _drawing_dropouts(module: nnx.Module) -> list[nnx.Dropout]:
  """The dropout layers that draw keys when called (rate > 0, on, with a stream)."""
  return [m for m in _dropout_layers(module) if not m.deterministic and m.rngs is not None]


class Transformer(nnx.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32 (and an updated cache when given).

  Built in evaluation mode: `model.train()` turns dropout on (cfg.dropout > 0, or LoRA
  adapters' dropout), `model.eval()` off again.
  """

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # GPT-2's initialisation; the embedding also serves as the output layer when tied.
    self.embed = nnx.Embed(cfg.vocab_size, cfg.embed_dim, dtype=DTYPES[cfg.dtype],
                           param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    annotate(self.embed.embedding, ("vocab", "embed"))
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _rms_norm(cfg, rngs)
    self.embed_dropout = dropout_layer(cfg.dropout, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.embed_dim, cfg.vocab_size, dtype=DTYPES[cfg.dtype],
                            param_dtype=jnp.float32, axes=("embed", "vocab"), rngs=rngs)

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, *,
               cache: list[KVCache] | KVCache | None = None,
               cache_index: jax.Array | None = None, start_B: jax.Array | None = None):
    """Without `cache`: causal LM over the T tokens; returns logits_BTV.

    With `cache` (from `init_cache`: a list of per-layer KVCaches, or with scan_layers one
    stacked KVCache): the tokens occupy absolute slots [cache_index, cache_index + T);
    row b's real tokens start at slot start_B[b] (left padding before it is masked out
    and positions count from it). Returns (logits_BTV, new_cache).
    """
    h_BTD, new_cache = self._trunk(tokens_BT, positions_BT, cache, cache_index, start_B)
    logits_BTV = self.logits(h_BTD)
    return logits_BTV if cache is None else (logits_BTV, new_cache)

  def hidden_states(self, tokens_BT: jax.Array,
                    positions_BT: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] -> the final-normed hidden states [B, T, D] (compute dtype) that
    the output layer reads: the features for a task head."""
    return self._trunk(tokens_BT, positions_BT, None, None, None)[0]

  def nll_sum(self, tokens_BT: jax.Array, targets_BT: jax.Array,
              weights_BT: jax.Array) -> jax.Array:
    """sum over [B, T] of weights * -log p(target | tokens up to t), float32 (the
    logits made `cfg.logits_chunk` positions at a time when set)."""
    h_BTD = self.hidden_states(tokens_BT)
    head = None if self.cfg.tie_embeddings else self.lm_head
    # An adapter with dropout on the output layer cannot be merged into one matrix.
    head_dropout = (head is not None and head.lora is not None
                    and head.lora.dropout.rate > 0 and not head.lora.dropout.deterministic)
    if self.cfg.logits_chunk and not head_dropout:
      w_DV = (self.embed.embedding[...].astype(DTYPES[self.cfg.dtype]).T if head is None
              else head.merged_kernel())
      return linear_cross_entropy(h_BTD, w_DV, targets_BT, weights_BT, self.cfg.logits_chunk)
    logits_BTV = self.logits(h_BTD)
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return (nll_BT * weights_BT).sum()

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Hidden states [B, T, D] -> logits [B, T, V] float32."""
    dtype = DTYPES[self.cfg.dtype]
    if self.cfg.tie_embeddings:
      logits_BTV = dense(h_BTD, self.embed.embedding[...].astype(dtype).T)
    else:
      logits_BTV = self.lm_head(h_BTD)
    return constrain(logits_BTV.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))

  def _trunk(self, tokens_BT, positions_BT, cache, cache_index, start_B):
    """(final-normed hidden states [B, T, D], new cache: a list, empty without one)."""
    cfg = self.cfg
    check_tokens(tokens_BT, cfg.vocab_size)
    B, T = tokens_BT.shape
    dtype = DTYPES[cfg.dtype]
    # Computed once for all layers.
    if positions_BT is None:
      angles = rope_angles_from_zero(T, cfg.resolved_head_dim, cfg.rope_base)
    else:
      angles = rope_angles(positions_BT, cfg.resolved_head_dim, cfg.rope_base)
    # The lookup reads the table whole along its embedding axis (FSDP gathers it, as it
    # does every weight before use) and split along the vocabulary as the rules say, so
    # the rows come out without a full rematerialisation of the table.
    table_VD = constrain(self.embed.embedding[...], ("act_vocab", None)).astype(dtype)
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(jnp.float32)
    x_BTD = constrain(self.embed_dropout(x_BTD), _ACT_BTD)
    mask_B1TS = None
    if cache is not None:
      S = self._check_cache(cache)
      if start_B is None:
        start_B = jnp.zeros((B,), jnp.int32)
      slot_S = jnp.arange(S, dtype=jnp.int32)
      query_slot_T = cache_index + jnp.arange(T, dtype=jnp.int32)
      mask_B1TS = ((slot_S[None, None, None, :] >= start_B[:, None, None, None])
                   & (slot_S[None, None, None, :] <= query_slot_T[None, None, :, None]))
    if cfg.scan_layers:
      x_BTD, new_cache = self._scan_blocks(x_BTD, angles, cache, cache_index, mask_B1TS)
      return self.final_norm(x_BTD).astype(dtype), new_cache
    policy = cfg.resolved_remat_policy
    new_cache = []
    for i, block in enumerate(self.blocks):
      if cache is None and policy != "none":
        x_BTD = nnx.remat(_run_block, policy=checkpoint_policy(policy))(block, x_BTD, angles)
      else:
        x_BTD, layer_cache = block(x_BTD, angles, None if cache is None else cache[i],
                                   cache_index, mask_B1TS)
        new_cache.append(layer_cache)
    return self.final_norm(x_BTD).astype(dtype), new_cache

  def _scan_blocks(self, x_BTD, angles, cache, cache_index, mask_B1TS):
    """The stacked blocks under `lax.scan`: layer l's parameters, dropout keys and cache
    slice are the scanned inputs; its cache the scanned output."""
    L = self.cfg.num_layers
    # Each drawing dropout layer advances its stream once per call, like an unrolled
    # block's, and every layer gets its own key from that draw.
    keys = [jax.random.split(layer.rngs(), L) for layer in _drawing_dropouts(self.blocks)]
    graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)

    def body(x_BTD, layer):
      params_l, keys_l, cache_l = layer
      block = nnx.merge(graphdef, params_l, rest)
      for dropout, key in zip(_drawing_dropouts(block), keys_l, strict=True):
        dropout.rngs = nnx.RngStream(key, tag="dropout")
      return block(x_BTD, angles, cache_l, cache_index, mask_B1TS)

    policy = self.cfg.resolved_remat_policy
    if cache is None and policy != "none":
      # prevent_cse=False: the scan already keeps XLA from merging the recomputation away.
      body = jax.checkpoint(body, policy=checkpoint_policy(policy), prevent_cse=False)
    return jax.lax.scan(body, x_BTD, (params, keys, cache))

  def _check_cache(self, cache) -> int:
    """S, the cache's length; UserError for a cache of the other layer layout."""
    stacked = isinstance(cache, KVCache)
    if stacked != self.cfg.scan_layers:
      raise UserError(f"the cache is {'stacked' if stacked else 'a list of layers'}, but the "
                      f"model has model.scan_layers={self.cfg.scan_layers}: make it with "
                      "this model's init_cache")
    return cache.k_BSKH.shape[2] if stacked else cache[0].k_BSKH.shape[1]

  def init_cache(self, batch: int, max_len: int) -> list[KVCache] | KVCache:
    """An empty KV cache: per layer, k and v of shape [batch, max_len, K, H]; with
    scan_layers one KVCache whose k and v hold all layers, [L, batch, max_len, K, H]."""
    cfg = self.cfg
    make = lambda: init_kv_cache(batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim,
                                 DTYPES[cfg.dtype])
    if cfg.scan_layers:
      return jax.tree.map(lambda s: jnp.zeros((cfg.num_layers, *s.shape), s.dtype),
                          jax.eval_shape(make))
    return [make() for _ in range(cfg.num_layers)]


def _dropout_layers(model: nnx.Module) -> list[nnx.Dropout]:
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout) and m.rate > 0]


def detach_dropout_rngs(model: nnx.Module) -> nnx.Module:
  """`model`, changed in place: its dropout layers hold no key stream, so the state of
  `nnx.split(model)` is its parameters alone. For pure steps that merge the model from a
  parameter dict inside `jax.jit` (`train.steps.make_supervised_step`): build the graphdef
  from the detached model, and call `train_with_key` on the merged one."""
  for layer in _dropout_layers(model):
    layer.rngs = None
  return model


def train_with_key(model: nnx.Module, key: jax.Array) -> None:
  """Training mode for a model merged from parameters alone inside a pure step: every
  dropout layer (rate > 0) is switched on and draws from its own stream, folded from `key`
  (the step's key). With no dropout anywhere it does nothing, and the step draws nothing."""
  for i, layer in enumerate(_dropout_layers(model)):
    layer.rngs = nnx.RngStream(jax.random.fold_in(key, i), tag="dropout")
    layer.deterministic = False
