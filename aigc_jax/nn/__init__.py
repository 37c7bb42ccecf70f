"""Shared layers: rotary embeddings, attention with a KV cache, MLPs."""

from aigc_jax.nn.attention import Attention, KVCache, init_kv_cache
from aigc_jax.nn.mlp import SwiGLU
from aigc_jax.nn.rope import apply_rope

__all__ = ["Attention", "KVCache", "SwiGLU", "apply_rope", "init_kv_cache"]
