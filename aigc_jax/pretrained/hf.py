"""Hugging Face Llama checkpoints (`config.json` + `*.safetensors`): import and export.

Hugging Face stores Q/K in the "rotate half" layout our rotary embeddings use, so the
weights map one to one (transposed: files hold [out, in]). Checkpoints sharded over
several `.safetensors` files are read whole. A `tokenizer.json` (and the chat template in
`tokenizer_config.json`) beside the weights is read too and written on export.

  model, tokenizer = load_hf("path/to/llama_dir")
  export_hf("out_dir", cfg, params, tokenizer)
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.models.transformer import TransformerConfig
from aigc_jax.pretrained import llama
from aigc_jax.pretrained.tokenizer import PretrainedTokenizer

SUPPORTED_MODEL_TYPES = ("llama",)


def _safetensors():
  try:
    from safetensors import numpy as st_numpy
    from safetensors import safe_open
  except ImportError as e:
    raise UserError("Hugging Face checkpoints need the `safetensors` package: "
                    "pip install 'aigc_jax[pretrained]'") from e
  return safe_open, st_numpy


def read_hf_config(directory: str) -> TransformerConfig:
  """The TransformerConfig of a Hugging Face Llama folder's config.json (UserError when
  the folder or architecture does not fit)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"no config.json in {directory!r}: not a Hugging Face checkpoint folder")
  try:
    with open(path) as f:
      c = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from e
  if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"model_type {c.get('model_type')!r} in {path} is not supported: only "
                    f"{SUPPORTED_MODEL_TYPES} (Llama-family decoders)")
  unsupported = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                 "hidden_act": "silu"}
  for key, wanted in unsupported.items():
    if c.get(key, wanted) != wanted:
      raise UserError(f"{path} sets {key}={c[key]!r}, which aigc_jax's transformer does not "
                      f"implement (it needs {wanted!r})")
  missing = [k for k in ("vocab_size", "num_hidden_layers", "num_attention_heads",
                         "hidden_size", "intermediate_size") if k not in c]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}: not a complete Llama config")
  heads = int(c["num_attention_heads"])
  head_dim = int(c.get("head_dim") or 0)
  if head_dim * heads == int(c["hidden_size"]):
    head_dim = 0  # the default: hidden_size // heads
  return TransformerConfig(
      vocab_size=int(c["vocab_size"]), num_layers=int(c["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
      embed_dim=int(c["hidden_size"]), mlp_dim=int(c["intermediate_size"]),
      head_dim=head_dim,
      max_seq_len=int(c.get("max_position_embeddings", 2048)),
      pretrained_max_seq_len=int(c.get("max_position_embeddings", 2048)),
      rope_base=float(c.get("rope_theta", 10000.0)),
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def read_hf(directory: str) -> tuple[TransformerConfig, dict]:
  """(config, params as float32 pure dict) from a Hugging Face Llama folder."""
  cfg = read_hf_config(directory)
  safe_open, _ = _safetensors()
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise UserError(f"no *.safetensors file in {directory!r}")
  where = {}
  for file in files:
    try:
      with safe_open(file, framework="np") as f:
        where.update({name: file for name in f.keys()})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise UserError(f"{file} is not a readable safetensors file ({e})") from e

  def tensor(name: str) -> np.ndarray:
    if name not in where:
      raise UserError(f"tensor {name!r} is missing from the safetensors files in "
                      f"{directory!r}")
    with safe_open(where[name], framework="np") as f:
      return np.asarray(f.get_tensor(name), np.float32)

  return cfg, llama.params_from_tensors(cfg, "hf", tensor)


def hf_tokenizer(directory: str) -> PretrainedTokenizer | None:
  """The folder's `tokenizer.json` (None when there is none)."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  extra = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      extra = json.load(f)
  return PretrainedTokenizer.from_file(path, bos=extra.get("bos_token"),
                                       eos=extra.get("eos_token"),
                                       chat_template=extra.get("chat_template") or "")


def load_hf(directory: str, **config_overrides):
  """(Transformer with the folder's weights, its tokenizer or None)."""
  cfg, params = read_hf(directory)
  model = llama.build_model(cfg, params, f"the checkpoint in {directory!r}", **config_overrides)
  return model, hf_tokenizer(directory)


def export_hf(directory: str, cfg: TransformerConfig, params: dict,
              tokenizer: PretrainedTokenizer | None = None, dtype: str = "float32") -> str:
  """Writes config.json + model.safetensors (+ tokenizer files) that Hugging Face
  `transformers` loads as LlamaForCausalLM; returns the weights' path. The context length
  written (`max_position_embeddings`) is the pretrained file's when the model came from
  one (`cfg.pretrained_max_seq_len`), not the shorter `max_seq_len` it may run with."""
  _, st_numpy = _safetensors()
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"export dtype must be float32, bfloat16 or float16, got {dtype!r}")
  import ml_dtypes

  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  os.makedirs(directory, exist_ok=True)
  tensors = {name: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
             for name, v in llama.tensors_from_params(cfg, "hf", params).items()}
  weights = os.path.join(directory, "model.safetensors")
  st_numpy.save_file(tensors, weights, metadata={"format": "pt"})
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "head_dim": cfg.resolved_head_dim,
      "max_position_embeddings": cfg.pretrained_max_seq_len or cfg.max_seq_len,
      "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
      "torch_dtype": dtype}
  if tokenizer is not None:
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tokenizer.save(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return weights

