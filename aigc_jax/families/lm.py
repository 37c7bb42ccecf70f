"""The transformer language model as a family on the shared loop: config, data,
init, step, eval (loss, perplexity, bits per byte) and text samples."""

from __future__ import annotations

import codecs
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from aigc_jax.config import require, require_finite_range, require_positive
from aigc_jax.data import text as text_data
from aigc_jax.data.abc_tokenizer import AbcTokenizer
from aigc_jax.data.chorale_tokenizer import ChoraleTokenizer
from aigc_jax.data.tokenizers import BpeTokenizer, ByteTokenizer, load_tokenizer
from aigc_jax.errors import UserError
from aigc_jax.families.lm_text import TextLm
from aigc_jax.models.sampling import SAMPLING_KEYS, check_sampling
from aigc_jax.models.transformer import (
  ATTENTION_IMPLEMENTATIONS,
  DTYPES,
  REMAT_POLICIES,
  Transformer,
  TransformerConfig,
  detach_dropout_rngs,
  train_with_key,
)
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.optim import adamw, validate_optim
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_supervised_step


def default_config() -> ml_collections.ConfigDict:
  """Every key an LM run config may set, with its default (nanoGPT's CPU shape)."""
  c = ml_collections.ConfigDict()
  c.family = "lm"
  c.seed = 0
  c.model = dict(
      vocab_size=0,  # 0: the tokenizer's vocabulary size
      num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=128,
      mlp_dim=344,  # SwiGLU width with the FLOPs of a 4x GELU MLP
      head_dim=0,  # 0: embed_dim // num_heads
      max_seq_len=0,  # longest context for generation; 0: data.seq_len
      dropout=0.0, tie_embeddings=True, rope_base=10000.0, norm_eps=1e-6,
      dtype="float32",  # compute dtype; parameters are always float32
      # auto (cudnn on GPU, blockwise on CPU, einsum elsewhere) | blockwise | einsum |
      # xla | cudnn | jax
      attention="auto",
      # Per-block rematerialisation: none | full | dots_saveable |
      # dots_with_no_batch_dims_saveable | nothing_saveable | everything_saveable
      # (jax.checkpoint_policies); remat=True (older configs) means 'full'.
      remat=False, remat_policy="none",
      scan_layers=False,  # stacked blocks under lax.scan: compile time flat in depth
      logits_chunk=0)  # positions whose logits a loss forms at once (0: all; nn.cross_entropy)
  c.data = dict(
      # stdlib (Python's own source) | text (data.path) | tfds | abc (ABC folk tunes) |
      # chorales (Bach's, as event words; data.tokenizer='chorale')
      name="stdlib",
      path="",  # text only: a text file (split by lines) or a folder (split by file)
      val_path="",  # any source: validation text, instead of splitting off val_fraction
      val_fraction=0.05,  # without val_path only
      # The codec data.path and data.val_path are decoded with (any name Python's codecs
      # know, e.g. 'latin-1'); files that do not decode are errors. Only reading uses it:
      # documents are tokenized from the decoded text, which the byte tokenizer encodes as
      # UTF-8 (and bits per byte count UTF-8 bytes), whatever the files' encoding.
      encoding="utf-8",
      limit_files=0,  # stdlib only: use the first N files (0: all)
      seq_len=64,
      # byte | bpe | abc (ABC music's units, with a byte fallback) | chorale (the chorales'
      # event words); bpe and abc are trained on the training split; all saved with the run
      tokenizer="byte",
      bpe_vocab_size=4096,
      # abc only: a folder of .abc files (default: music21's corpus, or
      # $AIGC_JAX_ABC_CORPUS), the corpus's collections to read (default: its three folk
      # collections), whether a malformed tune is an error (default: skipped, counted),
      # and header fields every tune kept must have (('M:6/8',) or ('R:jig',): one type).
      abc_path="", abc_collections=(), abc_strict=False, abc_fields=(),
      # tfds only:
      tfds_name="", tfds_split="train", tfds_text_key="text", tfds_data_dir="")
  c.train = dict(steps=1000, batch_size=12, grad_accum_steps=1, log_every=50,
                 eval_every=500, eval_batches=16, checkpoint_every=500, keep_checkpoints=3,
                 **guard.DEFAULTS)
  c.optim = dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, b1=0.9,
                 b2=0.95, eps=1e-8, grad_clip=1.0)
  # Samples written at each evaluation (num=0: none), and the CLI's sampling defaults.
  c.sample = dict(prompt="def ", num=2, max_new_tokens=200, temperature=0.8, top_k=0,
                  top_p=0.95, repetition_penalty=1.0)  # 1.0: no penalty
  # Music runs (data.tokenizer='abc') only: at each evaluation, sample eval_samples tunes
  # prompted with held-out tunes' headers, each up to eval_max_new_tokens new tokens (0:
  # the context less the prompt), and report their validity, key consistency and
  # histogram overlaps with the held-out tunes (evaluation/music_eval.py); 0: none.
  c.music = dict(eval_samples=0, eval_max_new_tokens=0)
  c.mesh = mesh_lib.default_mesh_config()
  return c


def validate(c) -> None:
  check_sampling("config 'sample'", **{key: c.sample[key] for key in SAMPLING_KEYS})
  require_finite_range(c, "sample.max_new_tokens", 0, integer=True)
  require_finite_range(c, "sample.num", 0, integer=True)
  validate_optim(c)
  m, d, t = c.model, c.data, c.train
  require_positive(c, "model.num_layers", "model.num_heads", "model.num_kv_heads",
                   "model.embed_dim", "model.mlp_dim", "data.seq_len", "train.steps",
                   "train.batch_size", "train.grad_accum_steps", "train.log_every",
                   "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                   "train.keep_checkpoints")
  require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: from the tokenizer)")
  require(m.logits_chunk >= 0, "model.logits_chunk", "must be >= 0 (0: all positions at once)")
  require(m.head_dim >= 0, "model.head_dim", "must be >= 0 (0: embed_dim // num_heads)")
  require(m.max_seq_len >= 0, "model.max_seq_len", "must be >= 0 (0: data.seq_len)")
  require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
          f"must divide model.num_heads={m.num_heads}, got {m.num_kv_heads}")
  if m.head_dim == 0:
    require(m.embed_dim % m.num_heads == 0, "model.embed_dim",
            f"must be divisible by model.num_heads={m.num_heads} (or set model.head_dim)")
  head_dim = m.head_dim or m.embed_dim // m.num_heads
  require(head_dim % 2 == 0, "model.head_dim",
          f"must be even for rotary embeddings, got {head_dim}")
  require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  require(m.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}, got {m.dtype!r}")
  require(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
          f"must be one of {list(REMAT_POLICIES)}, got {m.remat_policy!r}")
  require(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
          f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention!r}")
  if m.attention == "cudnn":
    require(jax.default_backend() == "gpu", "model.attention",
            f"'cudnn' needs a GPU, but JAX's backend is {jax.default_backend()!r}: use 'auto'")
    require(m.dtype in ("bfloat16", "float16"), "model.attention",
            "'cudnn' needs model.dtype bfloat16 or float16")
  require(d.tokenizer in ("byte", "bpe", "abc", "chorale"), "data.tokenizer",
          f"must be 'byte', 'bpe', 'abc' or 'chorale', got {d.tokenizer!r}")
  require((d.tokenizer == "chorale") == (d.name == "chorales"), "data.tokenizer",
          f"is {d.tokenizer!r} with data.name={d.name!r}: the chorales' event words are "
          "read with data.tokenizer='chorale', which reads nothing else")
  require(d.tokenizer == "bpe" or d.bpe_vocab_size == default_config().data.bpe_vocab_size,
          "data.bpe_vocab_size", f"is set but data.tokenizer is {d.tokenizer!r}: set "
          "data.tokenizer='bpe', or unset data.bpe_vocab_size")
  require(d.bpe_vocab_size >= 300, "data.bpe_vocab_size", "must be at least 300")
  require(d.name in ("stdlib", "text", "tfds", "abc", "chorales"), "data.name",
          f"must be 'stdlib', 'text', 'tfds', 'abc' or 'chorales', got {d.name!r}")
  require(d.name != "text" or bool(d.path), "data.path",
          "is required with data.name='text': a text file or a folder of text files")
  for field in ("path", "val_path", "abc_path"):
    require(not d[field] or os.path.exists(os.path.expanduser(d[field])), f"data.{field}",
            f"{d[field]!r} does not exist")
  require(d.name != "tfds" or bool(d.tfds_name), "data.tfds_name",
          "is required with data.name='tfds'")
  require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
  # Settings the chosen source does not read would be silently ignored: refuse them.
  for field, (value, _, fix) in _unread_data_settings(d).items():
    require(False, f"data.{field}", f"is set ({value!r}) but {fix}")
  try:  # LookupError for unknown names and for byte-to-byte codecs (hex, base64, rot13);
    # not b"": decoding nothing skips the codec lookup.
    b"\n".decode(d.encoding, "replace")
    known = True
  except (LookupError, UnicodeError, TypeError):
    known = False
  require(known, "data.encoding", "must be a text encoding Python knows (e.g. 'utf-8', "
          f"'latin-1', 'cp1252'), got {d.encoding!r}")
  require(codecs.lookup(d.encoding).name == "utf-8" or d.name == "text" or bool(d.val_path),
          "data.encoding",
          f"is set ({d.encoding!r}) but data.name is {d.name!r} and data.val_path is unset, "
          "so no file is read with it: set data.name='text' and data.path (or "
          "data.val_path), or unset data.encoding")
  require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
          f"must divide train.batch_size={t.batch_size}")
  validate_music(c, d.tokenizer == "abc", f"data.tokenizer is {d.tokenizer!r}: music "
                 "figures need an ABC music run (data.tokenizer='abc')")


def validate_music(c, music_data: bool, why_not: str) -> None:
  """The `music` section: sampled-tune figures need a music run (`music_data`; else
  `why_not` says what the run is)."""
  if "music" not in c:  # a config built by hand may lack the section
    return
  samples, max_new = c.music.eval_samples, c.music.eval_max_new_tokens
  require_finite_range(c, "music.eval_samples", 0, integer=True)
  require_finite_range(c, "music.eval_max_new_tokens", 0, integer=True)
  require(samples == 0 or music_data, "music.eval_samples",
          f"is {samples}, but {why_not}; set music.eval_samples=0")
  require(max_new == 0 or samples > 0, "music.eval_max_new_tokens",
          f"is {max_new}, but music.eval_samples is 0, so no tune is sampled: set "
          "music.eval_samples, or unset music.eval_max_new_tokens")


def _unread_data_settings(d) -> dict[str, tuple]:
  """{field: (value, default, why it is unread and the fix)} for the data settings that
  `d.name`'s source does not read (text.load_documents is the reader; val_path serves
  every source) and that differ from their defaults."""
  defaults = default_config().data
  uses = {"text": "to train on data.path", "stdlib": "to read the standard library",
          "tfds": "to read a tfds dataset", "abc": "to read ABC tunes"}
  out = {}
  for field, source in (("path", "text"), ("limit_files", "stdlib"), ("tfds_name", "tfds"),
                        ("tfds_split", "tfds"), ("tfds_text_key", "tfds"),
                        ("tfds_data_dir", "tfds"), ("abc_path", "abc"),
                        ("abc_collections", "abc"), ("abc_strict", "abc"),
                        ("abc_fields", "abc")):
    default = defaults[field]
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # JSON holds lists
    if d.get("name") != source and as_list(d.get(field, default)) != as_list(default):
      undo = f"unset data.{field}" if default == "" else f"set data.{field}={default!r}"
      out[field] = (d[field], default, f"data.name is {d.get('name')!r}, which does not read "
                    f"it: set data.name={source!r} {uses[source]}, or {undo}")
  if d.get("val_path") and d.get("val_fraction", defaults.val_fraction) != defaults.val_fraction:
    out["val_fraction"] = (d["val_fraction"], defaults.val_fraction,
                           "data.val_path is given, which replaces the split: unset "
                           "data.val_path to split off val_fraction, or set "
                           f"data.val_fraction={defaults.val_fraction!r}")
  return out


def clear_unread_settings(saved: dict) -> dict:
  """A saved run config with the data settings its source never read at their defaults:
  runs saved before they were refused (`validate`) load, resume and compare as what they
  were (the settings had no effect)."""
  data = dict(saved.get("data") or {})
  for field, (_, default, _) in _unread_data_settings(data).items():
    data[field] = default
  return {**saved, "data": data} if "data" in saved else saved


class Family(TextLm):
  """The LM on the shared loop (data, evaluation and samples: `lm_text.TextLm`). Data is
  read lazily, so sampling from a trained run needs only its tokenizer and checkpoint."""

  name = "lm"
  plot_keys = ("loss", "bits_per_byte")

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.tokenizer = self._tokenizer()
    vocab = config.model.vocab_size or self.tokenizer.vocab_size
    if vocab < self.tokenizer.vocab_size:
      raise UserError(f"config 'model.vocab_size'={vocab} is smaller than the tokenizer's "
                      f"{self.tokenizer.vocab_size} ids: set it to 0 (automatic)")
    self.model_cfg = TransformerConfig.from_config(
        config.model, vocab_size=vocab,
        max_seq_len=config.model.max_seq_len or config.data.seq_len)
    abstract_model = nnx.eval_shape(lambda: Transformer(self.model_cfg, rngs=nnx.Rngs(0)))
    # Parameters alone (no dropout keys) in the state; evaluation mode unless a step
    # switches training on (`_loss`).
    self.graphdef = nnx.split(detach_dropout_rngs(abstract_model))[0]
    self._param_names = param_names(abstract_model)
    self.tx, self.schedule = adamw(config.optim, config.train.steps)
    self.train_step = make_supervised_step(self.graphdef, self._loss, self.tx, self.schedule,
                                           config.train.grad_accum_steps)
    self.items_per_step = {"tokens": config.train.batch_size * config.data.seq_len}

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def _documents(self):
    return text_data.load_documents(self.config.data)

  def _tokenizer(self):
    if self.workdir and os.path.exists(os.path.join(self.workdir, "tokenizer.json")):
      return load_tokenizer(self.workdir)
    if self.config.data.tokenizer == "byte":
      tok = ByteTokenizer()
    elif self.config.data.tokenizer == "abc":
      tok = AbcTokenizer.train(t for _, t in self._documents[0])
    elif self.config.data.tokenizer == "chorale":  # a closed word set: nothing to train
      tok = ChoraleTokenizer()
    else:
      tok = BpeTokenizer.train((t for _, t in self._documents[0]),
                               self.config.data.bpe_vocab_size)
    if self.workdir and jax.process_index() == 0:  # every process trains the same one
      tok.save(self.workdir)
    return tok

  # --- model ------------------------------------------------------------------------
  def param_names(self) -> dict:
    """The parameters' logical axis names (a pure dict like the parameters)."""
    return self._param_names

  def check_mesh(self, mesh, rules) -> None:
    """UserError unless heads, MLP width, vocabulary and width split whole on `mesh`."""
    self.model_cfg.check_sharding(lambda name: mesh_lib.shards_of(name, mesh, rules))

  def init_state(self, rng: jax.Array) -> TrainState:
    k_params, k_train = jax.random.split(rng)
    model = Transformer(self.model_cfg, rngs=nnx.Rngs(params=k_params, dropout=0))
    return TrainState.create(nnx.to_pure_dict(nnx.state(model, nnx.Param)), self.tx, k_train)

  def weights(self, state: TrainState) -> dict:
    """What `model` takes: the parameters."""
    return state.params

  def model(self, params) -> Transformer:
    """The model in evaluation mode, its dropout layers without keys (`train_with_key`)."""
    return nnx.merge(self.graphdef, params)

  def _loss(self, model, batch, rng, step):
    del step  # the LM's loss follows no schedule
    train_with_key(model, rng)  # dropout on, from the step's key (nothing if rate 0)
    targets_BT = batch["targets"]
    loss = model.nll_sum(batch["inputs"], targets_BT,
                         jnp.ones(targets_BT.shape)) / targets_BT.size
    return loss, {"perplexity": jnp.exp(loss)}
