"""Shared layers: rotary embeddings, attention with a KV cache, MLPs, 2x upsampling, the
chunked output-layer cross-entropy."""

from aigc_jax.nn.attention import Attention, KVCache, init_kv_cache
from aigc_jax.nn.cross_entropy import linear_cross_entropy
from aigc_jax.nn.mlp import SwiGLU
from aigc_jax.nn.rope import apply_rope
from aigc_jax.nn.upsample import UpConv2x, conv_transpose_2x

__all__ = ["Attention", "KVCache", "SwiGLU", "UpConv2x", "apply_rope", "conv_transpose_2x",
           "init_kv_cache", "linear_cross_entropy"]
