"""The dense matmul with a hand-written backward pass equals JAX's own, and nnx.Linear
takes it as a drop-in dot_general."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.nn.dense import dense, dense_dot_general


def _reference(x, w):
  return jnp.einsum("...d,df->...f", x, w)


def test_values_and_gradients_match_jax():
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w = jax.random.normal(kx, (2, 5, 8)), jax.random.normal(kw, (8, 3))
  target = jax.random.normal(ky, (2, 5, 3))
  loss = lambda f: lambda x, w: ((f(x, w) - target) ** 2 * jnp.arange(3.0)[None, None]).sum()
  np.testing.assert_allclose(dense(x, w), _reference(x, w), rtol=1e-6)
  ours = jax.grad(loss(dense), argnums=(0, 1))(x, w)
  theirs = jax.grad(loss(_reference), argnums=(0, 1))(x, w)
  for a, b in zip(ours, theirs, strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
  x, w = jnp.ones((4, 6), jnp.bfloat16), jnp.ones((6, 2), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: dense(x, w).astype(jnp.float32).sum(), argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dw, jnp.full((6, 2), 4.0, jnp.bfloat16))


def test_linear_with_dense_dot_general_matches_the_default_linear():
  ours = nnx.Linear(8, 4, dot_general=dense_dot_general, rngs=nnx.Rngs(0))
  default = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 8))
  np.testing.assert_allclose(ours(x), default(x), rtol=1e-6)
  grad = lambda m: nnx.grad(lambda m: (m(x) ** 2).sum())(m)
  np.testing.assert_allclose(grad(ours)["kernel"][...], grad(default)["kernel"][...],
                             rtol=1e-5)


def test_other_contractions_fall_back_to_lax():
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(dense_dot_general(a, b, batched),
                                jax.lax.dot_general(a, b, batched))
