import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax import Transformer, TransformerConfig
from aigc_jax.nn.attention import (
  CAUSAL_QUERY_BLOCKS,
  MIN_QUERY_BLOCK,
  blockwise_causal_attention,
  einsum_attention,
  query_block_bounds,
)


def qkv(B, T, N, K, H, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, T, K, H), dtype),
          jax.random.normal(kv, (B, T, K, H), dtype))


@pytest.mark.parametrize("T", [1, 15, 16, 31, 32, 64, 70, 257])
def test_query_blocks_cover_the_sequence_in_order(T):
  bounds = query_block_bounds(T)
  assert bounds[0] == 0 and bounds[-1] == T
  sizes = np.diff(bounds)
  assert 1 <= len(sizes) <= CAUSAL_QUERY_BLOCKS and (sizes > 0).all()
  assert len(sizes) == 1 or sizes.min() >= MIN_QUERY_BLOCK
  assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("B,T,N,K,H", [(2, 64, 4, 4, 8), (3, 70, 6, 2, 16), (1, 33, 2, 1, 4),
                                       (2, 8, 4, 2, 8)])
def test_blockwise_equals_full_causal_attention_and_its_gradients(B, T, N, K, H):
  q, k, v = qkv(B, T, N, K, H)
  w = jax.random.normal(jax.random.PRNGKey(9), (B, T, N, H))
  full = jax.jit(lambda q, k, v: einsum_attention(q, k, v))
  block = jax.jit(blockwise_causal_attention)
  np.testing.assert_allclose(block(q, k, v), full(q, k, v), atol=2e-6, rtol=0)
  loss = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
  for g_block, g_full in zip(loss(blockwise_causal_attention)(q, k, v),
                             loss(einsum_attention)(q, k, v), strict=True):
    np.testing.assert_allclose(g_block, g_full, atol=2e-5, rtol=0)


def test_blockwise_is_causal():
  q, k, v = qkv(2, 48, 4, 2, 8)
  out = blockwise_causal_attention(q, k, v)
  changed = [x.at[:, 30:].set(-x[:, 30:]) for x in (q, k, v)]
  out_changed = blockwise_causal_attention(*changed)
  np.testing.assert_array_equal(out[:, :30], out_changed[:, :30])
  assert not np.allclose(out[:, 30:], out_changed[:, 30:])


def test_blockwise_bfloat16_keeps_dtype_and_matches_float32():
  q, k, v = qkv(2, 64, 4, 2, 16)
  out = blockwise_causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), einsum_attention(q, k, v), atol=0.05,
                             rtol=0)


def test_model_with_blockwise_attention_equals_einsum_attention():
  kw = dict(vocab_size=61, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
            mlp_dim=48, max_seq_len=80)
  blockwise = Transformer(TransformerConfig(**kw, attention="blockwise"), rngs=nnx.Rngs(0))
  einsum = Transformer(TransformerConfig(**kw, attention="einsum"), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 80), 0, 61)
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(blockwise, tokens),
                             nnx.jit(lambda m, t: m(t))(einsum, tokens), atol=1e-5, rtol=0)
