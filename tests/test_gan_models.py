import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.gan import GanConfig, build_gan, upsampling_plan
from aigc_jax.models.gan_losses import d_loss, g_loss, gradient_penalty, r1_penalty


@pytest.mark.parametrize("size, channels, arch, d_norm, depth", [
    (28, 1, "dcgan", "none", 0), (32, 3, "dcgan", "spectral", 1), (64, 3, "dcgan", "layer", 1),
    (8, 1, "dcgan", "none", 2), (28, 1, "mlp", "none", 0)])
def test_shapes(size, channels, arch, d_norm, depth):
  cfg = GanConfig(arch=arch, image_size=size, channels=channels, z_dim=16, width=8,
                  d_norm=d_norm, depth=depth)
  g, d = build_gan(cfg, nnx.Rngs(0))
  images = nnx.jit(lambda g, z: g(z, train=True))(g, jnp.ones((3, 16)))
  assert images.shape == (3, size, size, channels)
  assert float(jnp.abs(images).max()) <= 1.0
  logits = nnx.jit(lambda d, x: d(x, train=True))(d, images)
  assert logits.shape == (3,)
  if arch == "dcgan":  # depth adds one 3x3 conv per resolution to each player
    k = upsampling_plan(size)[1]
    count = lambda m: sum(isinstance(x, nnx.Conv) for _, x in nnx.iter_graph(m))
    assert count(g) == k * depth and count(d) == k * (1 + depth)


def test_plans_and_bad_configs():
  assert upsampling_plan(28) == (7, 2) and upsampling_plan(64) == (4, 4)
  with pytest.raises(UserError, match="image_size"):
    GanConfig(image_size=30)
  with pytest.raises(UserError, match="'model.d_norm' must be one of"):
    GanConfig(d_norm="batch")
  with pytest.raises(UserError, match="did you mean 'hinge'"):
    d_loss("hinje", jnp.zeros(2), jnp.zeros(2))


def test_spectral_norm_bounds_the_kernel_gain():
  cfg = GanConfig(image_size=8, z_dim=4, width=4, d_norm="spectral")
  _, d = build_gan(cfg, nnx.Rngs(1))
  conv = d.convs[0]
  for _ in range(30):  # power iteration converges to the top singular vector
    conv(jnp.zeros((1, 8, 8, 1)), True)
  w = conv.conv.kernel[...].reshape(-1, 4)
  normalize = lambda v: v / jnp.linalg.norm(v)
  v = normalize(w @ conv.u[...])
  sigma = float(v @ w @ conv.u[...])
  np.testing.assert_allclose(sigma, np.linalg.svd(np.asarray(w), compute_uv=False)[0],
                             rtol=1e-3)


def test_losses_react_to_real_and_fake_as_the_objectives_say():
  confident = (jnp.full(4, 5.0), jnp.full(4, -5.0))  # D says: real is real, fake is fake
  fooled = (jnp.full(4, -5.0), jnp.full(4, 5.0))
  for name in ("nonsaturating", "hinge", "wgan"):
    assert d_loss(name, *confident) < d_loss(name, *fooled), name
    assert g_loss(name, confident[1]) > g_loss(name, fooled[1]), name
  assert float(d_loss("hinge", *confident)) == 0.0
  np.testing.assert_allclose(d_loss("nonsaturating", jnp.zeros(2), jnp.zeros(2)),
                             2 * np.log(2), rtol=1e-6)
  smoothed = d_loss("nonsaturating", jnp.full(2, 20.0), jnp.full(2, -20.0), 0.1)
  np.testing.assert_allclose(smoothed, 0.1 * 20, rtol=1e-3)  # 0.1 * softplus(20)


def test_gradient_penalty_equals_a_direct_computation():
  cfg = GanConfig(image_size=8, z_dim=4, width=4, d_norm="layer")
  _, d = build_gan(cfg, nnx.Rngs(2))
  critic = lambda x: d(x, train=True)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  real = jax.random.uniform(k1, (5, 8, 8, 1), minval=-1, maxval=1)
  fake = jax.random.uniform(k2, (5, 8, 8, 1), minval=-1, maxval=1)
  penalty = gradient_penalty(critic, real, fake, k3)
  eps = jax.random.uniform(k3, (5, 1, 1, 1))
  direct = []
  for b in range(5):  # one example at a time: no reliance on batch independence
    x = eps[b] * real[b] + (1 - eps[b]) * fake[b]
    grad = jax.grad(lambda x: critic(x[None])[0])(x)
    direct.append((np.linalg.norm(np.asarray(grad)) - 1) ** 2)
  np.testing.assert_allclose(penalty, np.mean(direct), rtol=1e-4)
  # A linear critic has gradient w everywhere: the penalty is (||w|| - 1)^2 exactly.
  w = jax.random.normal(k1, (8, 8, 1))
  linear = lambda x: jnp.sum(x * w[None], axis=(1, 2, 3))
  np.testing.assert_allclose(gradient_penalty(linear, real, fake, k3),
                             (np.linalg.norm(np.asarray(w)) - 1) ** 2, rtol=1e-4)
  np.testing.assert_allclose(r1_penalty(linear, real), np.sum(np.asarray(w) ** 2), rtol=1e-5)
