"""The chunked output-layer cross-entropy equals the plain one, in value and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aigc_jax.models.transformer import Transformer
from aigc_jax.nn.cross_entropy import linear_cross_entropy
from aigc_jax.nn.linear import add_lora
from tests.tiny_llama import tiny_config

B, T, D, V = 3, 12, 16, 101


def _inputs():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  h = jax.random.normal(k[0], (B, T, D))
  w = 0.3 * jax.random.normal(k[1], (D, V))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return h, w, targets, weights


def _plain(h, w, targets, weights):
  logits = jnp.einsum("btd,dv->btv", h, w, precision="highest")
  return (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()


@pytest.mark.parametrize("chunk_len", [1, 5, 12, 40])  # dividing T or not, above T
def test_value_and_gradients_equal_the_plain_cross_entropy(chunk_len):
  h, w, targets, weights = _inputs()

  def chunked(h, w, weights):
    return linear_cross_entropy(h, w, targets, weights, chunk_len)

  want, want_grads = jax.value_and_grad(_plain, argnums=(0, 1, 3))(h, w, targets, weights)
  got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(h, w, weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(chunked)(h, w, weights), want, rtol=1e-6)  # no grad
  for g, ref in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, ref, atol=1e-5)
  assert float(jnp.abs(want_grads[1]).max()) > 1e-3  # the gradients are not trivially zero


def test_frozen_output_weights_cost_no_weight_gradient():
  h, w, targets, weights = _inputs()

  def loss(h, w):
    return 2.0 * linear_cross_entropy(h, w, targets, weights, 5)

  dh = jax.grad(loss)(h, w)
  np.testing.assert_allclose(dh, jax.grad(lambda h: 2.0 * _plain(h, w, targets, weights))(h),
                             atol=1e-5)
  # logits and dh only; the dw matmul appears when w is differentiated too.
  assert jax.jit(jax.grad(loss)).lower(h, w).as_text().count("dot_general") == 2
  assert jax.jit(jax.grad(loss, (0, 1))).lower(h, w).as_text().count("dot_general") == 3


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_nll_sum_chunked_equals_full_logits(tied):
  cfg = tiny_config(96, tied=tied)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  if not tied:  # an adapted output layer is merged for the chunked loss
    add_lora(model, [r"lm_head$"], rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    model.lm_head.lora.b[...] = 0.1 * jnp.ones_like(model.lm_head.lora.b[...])
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 96, (2, 11)).astype(np.int32)
  targets = rng.integers(0, 96, (2, 11)).astype(np.int32)
  weights = (rng.random((2, 11)) > 0.4).astype(np.float32)

  def loss(params, chunk):
    m = nnx.merge(graphdef, params)
    m.cfg = dataclasses.replace(cfg, logits_chunk=chunk)
    return m.nll_sum(tokens, targets, weights)

  want, want_grads = jax.value_and_grad(loss)(params, 0)
  got, got_grads = jax.value_and_grad(loss)(params, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # float32 sums in another order (the merged adapter, the chunks): relative 1e-4
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got_grads,
               want_grads)
  logits = model(tokens)
  direct = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()
  np.testing.assert_allclose(want, direct, rtol=1e-5)
