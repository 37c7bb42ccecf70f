"""The 2x transposed convolution with the fast CPU weight gradient equals XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.nn.upsample import UpConv2x, conv_transpose_2x


@pytest.mark.parametrize("H, W, c_in, c_out", [(7, 7, 8, 4), (4, 6, 3, 5), (1, 1, 2, 1)])
def test_phases_equal_xla_in_value_and_gradients(H, W, c_in, c_out):
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, H, W, c_in))
  w = jax.random.normal(kw, (4, 4, c_in, c_out))
  dy = jax.random.normal(kd, (2, 2 * H, 2 * W, c_out))

  def grads(impl):
    y, vjp = jax.vjp(lambda x, w: conv_transpose_2x(x, w, impl), x, w)
    return (y, *vjp(dy))

  for ours, ref in zip(grads("phases"), grads("native"), strict=True):
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  ref_lax = jax.lax.conv_transpose(x, w, (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(grads("phases")[0], ref_lax, rtol=1e-6, atol=1e-6)


def test_module_matches_nnx_conv_transpose_with_the_same_parameters():
  ours = UpConv2x(3, 5, rngs=nnx.Rngs(0))
  ref = nnx.ConvTranspose(3, 5, (4, 4), strides=2, padding="SAME", rngs=nnx.Rngs(1))
  ref.kernel[...] = ours.kernel[...]
  ref.bias[...] = jnp.arange(5.0)
  ours.bias[...] = jnp.arange(5.0)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 7, 3))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_unknown_impl():
  with pytest.raises(ValueError, match="unknown impl"):
    conv_transpose_2x(jnp.zeros((1, 2, 2, 1)), jnp.zeros((4, 4, 1, 1)), "fast")
