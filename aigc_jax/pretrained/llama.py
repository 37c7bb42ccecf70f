"""The Llama tensor layout shared by the GGUF and Hugging Face loaders.

Each of our parameter paths has one tensor name in Hugging Face checkpoints and one in
GGUF files. Files store linear weights as [out, in]; our kernels are [in, out].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.models.block_layout import require_unrolled
from aigc_jax.models.transformer import TransformerConfig

# our path inside a block -> (Hugging Face name, GGUF name), after the layer prefix.
LAYER_TENSORS = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "attn_norm.weight"),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", "attn_q.weight"),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", "attn_k.weight"),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", "attn_v.weight"),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "ffn_down.weight"),
}
LAYER_PREFIX = ("model.layers.{i}.", "blk.{i}.")
TOP_TENSORS = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "token_embd.weight"),
    ("final_norm", "scale"): ("model.norm.weight", "output_norm.weight"),
}
LM_HEAD = {("lm_head", "kernel"): ("lm_head.weight", "output.weight")}
FORMATS = ("hf", "gguf")


def tensor_names(cfg: TransformerConfig, fmt: str) -> dict[tuple, str]:
  """{our path (tuple of keys, block index as int): the file's tensor name}."""
  col = FORMATS.index(fmt)
  names = {path: pair[col] for path, pair in TOP_TENSORS.items()}
  if not cfg.tie_embeddings:
    names.update({path: pair[col] for path, pair in LM_HEAD.items()})
  for i in range(cfg.num_layers):
    prefix = LAYER_PREFIX[col].format(i=i)
    names.update({("blocks", i, *path): prefix + pair[col]
                  for path, pair in LAYER_TENSORS.items()})
  return names


def params_from_tensors(cfg: TransformerConfig, fmt: str,
                        tensor: Callable[[str], np.ndarray]) -> dict:
  """Our pure-dict parameters from a function name -> float32 array [out, in]."""
  params: dict = {}
  for path, name in tensor_names(cfg, fmt).items():
    value = tensor(name)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.T if path[-1] == "kernel" else value
  return params


def tensors_from_params(cfg: TransformerConfig, fmt: str, params: dict) -> dict[str, np.ndarray]:
  """{file tensor name: array [out, in]}: the inverse of `params_from_tensors`."""
  require_unrolled(cfg, "exporting to Hugging Face / GGUF")
  out = {}
  for path, name in tensor_names(cfg, fmt).items():
    value = params
    for key in path:
      value = value[key]
    value = np.asarray(value)
    out[name] = value.T if path[-1] == "kernel" else value
  return out


def check_shapes(expected: dict, got: dict, source: str, prefix: str = "") -> None:
  """Every parameter of `expected` (arrays or shape structs) is in `got` with its shape."""
  for key, value in expected.items():
    name = f"{prefix}{key}"
    if key not in got:
      raise UserError(f"{source} has no weights for {name!r}")
    if isinstance(value, dict):
      check_shapes(value, got[key], source, name + ".")
    elif tuple(value.shape) != tuple(got[key].shape):
      raise UserError(f"weight {name!r} has shape {tuple(got[key].shape)} in {source} but "
                      f"its config needs {tuple(value.shape)}: the weights do not match the "
                      "config")


def build_model(cfg: TransformerConfig, params: dict, source: str, **overrides):
  """A `Transformer` holding `params` (shapes checked against `cfg` first), in evaluation
  mode; its dropout layers (with a `dropout` override > 0) draw from keys of seed 0
  (`nnx.reseed(model, dropout=seed)` changes them). `cfg.pretrained_max_seq_len` keeps the
  file's context length when `max_seq_len` is overridden."""
  from flax import nnx

  from aigc_jax.models.transformer import Transformer

  cfg = dataclasses.replace(cfg, **overrides)
  require_unrolled(cfg, "loading pretrained GGUF / Hugging Face weights")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  check_shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)), params, source)
  nnx.update(model, params)
  nnx.reseed(model, dropout=0)  # concrete keys in place of eval_shape's abstract ones
  return model
