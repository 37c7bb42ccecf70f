"""Shared layers: attention with a KV cache (einsum, blockwise, XLA/cuDNN), rotary
embeddings, SwiGLU, the LoRA-capable Linear, 2x up-sampling, the chunked output-layer
cross-entropy. Names load lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aigc_jax._lazy import lazy_exports

_EXPORTS = {
    "Attention": "aigc_jax.nn.attention",
    "KVCache": "aigc_jax.nn.attention",
    "init_kv_cache": "aigc_jax.nn.attention",
    "linear_cross_entropy": "aigc_jax.nn.cross_entropy",
    "SwiGLU": "aigc_jax.nn.mlp",
    "apply_rope": "aigc_jax.nn.rope",
    "UpConv2x": "aigc_jax.nn.upsample",
    "conv_transpose_2x": "aigc_jax.nn.upsample",
    "Linear": "aigc_jax.nn.linear",
    "LoraAdapter": "aigc_jax.nn.linear",
    "add_lora": "aigc_jax.nn.linear",
    "merge_lora": "aigc_jax.nn.linear",
    "annotate": "aigc_jax.nn.partitioning",
    "constrain": "aigc_jax.nn.partitioning",
    "param_names": "aigc_jax.nn.partitioning",
    "activation_sharding": "aigc_jax.nn.partitioning",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # what static type checkers and IDEs see (re-exports)
  # ruff: noqa: F401
  from aigc_jax.nn.attention import Attention, KVCache, init_kv_cache
  from aigc_jax.nn.cross_entropy import linear_cross_entropy
  from aigc_jax.nn.linear import Linear, LoraAdapter, add_lora, merge_lora
  from aigc_jax.nn.mlp import SwiGLU
  from aigc_jax.nn.partitioning import activation_sharding, annotate, constrain, param_names
  from aigc_jax.nn.rope import apply_rope
  from aigc_jax.nn.upsample import UpConv2x, conv_transpose_2x
