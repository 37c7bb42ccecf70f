import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aigc_jax.data.images import load_fashion_mnist, to_unit_range
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
  images = nnx.jit(lambda g, z: g(z))(g, jnp.ones((3, 16)))
  assert images.shape == (3, size, size, channels)
  assert float(jnp.abs(images).max()) <= 1.0
  logits = nnx.jit(lambda d, x: d(x))(d, images)
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
    conv(jnp.zeros((1, 8, 8, 1)))  # training mode (as built): each call stores u
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
  critic = lambda x: d(x)
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


def batch_stats(module) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, nnx.BatchStat))]


def test_spectral_norm_follows_the_module_mode():
  """train(): each call stores the power iteration's u; eval() and nnx.view(...,
  use_running_average=True) read u only; the output is the same in every mode."""
  cfg = GanConfig(image_size=8, z_dim=4, width=4, d_norm="spectral", depth=1)
  _, d = build_gan(cfg, nnx.Rngs(4))
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1), minval=-1, maxval=1)
  u0 = batch_stats(d)
  frozen = nnx.view(d, use_running_average=True)
  d.eval()
  y_eval = d(x)
  np.testing.assert_allclose(nnx.jit(lambda d, x: d(x))(frozen, x), y_eval, rtol=1e-5)
  assert all(np.array_equal(a, b) for a, b in zip(u0, batch_stats(d), strict=True))
  d.train()
  np.testing.assert_array_equal(d(x), y_eval)
  assert all(not np.array_equal(a, b) for a, b in zip(u0, batch_stats(d), strict=True))


def test_wgan_gp_with_a_spectral_norm_critic_in_training_mode():
  """The penalty takes the critic module in training mode: finite, equal to the same critic
  read without updates, leaves u as the two plain calls left it, and a step trains D."""
  cfg = GanConfig(image_size=8, z_dim=4, width=4, d_norm="spectral", depth=1)
  _, d = build_gan(cfg, nnx.Rngs(3))
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  real = jax.random.uniform(k1, (6, 8, 8, 1), minval=-1, maxval=1)
  fake = jax.random.uniform(k2, (6, 8, 8, 1), minval=-1, maxval=1)
  frozen = nnx.view(d, use_running_average=True)
  reference = float(gradient_penalty(lambda x: frozen(x), real, fake, k3))
  u0 = batch_stats(d)
  penalty = float(gradient_penalty(d, real, fake, k3))  # eager, in training mode
  assert np.isfinite(penalty) and penalty > 0
  np.testing.assert_allclose(penalty, reference, rtol=1e-6)
  assert all(np.array_equal(a, b) for a, b in zip(u0, batch_stats(d), strict=True))
  with pytest.raises(UserError, match=r"pass the module itself, e.g. gradient_penalty\(d"):
    gradient_penalty(lambda x: d(x), real, fake, k3)  # a closure would write u in jax.grad

  plain = nnx.clone(d)
  nnx.jit(lambda d: (d(real), d(fake)))(plain)  # u after the critic's own two calls
  optimizer = nnx.Optimizer(d, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(d, optimizer):
    def loss_fn(d):
      gp = gradient_penalty(d, real, fake, k3)
      return d_loss("wgan", d(real), d(fake)) + 10.0 * gp, gp
    (_, gp), grads = nnx.value_and_grad(loss_fn, has_aux=True)(d)
    optimizer.update(d, grads)
    return gp

  gps = [float(step(d, optimizer))]
  u1 = batch_stats(d)
  assert all(not np.allclose(a, b, atol=1e-3) for a, b in zip(u0, u1, strict=True))
  for a, b in zip(batch_stats(plain), u1, strict=True):  # the penalty wrote nothing
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  gps += [float(step(d, optimizer)) for _ in range(20)]
  assert all(np.isfinite(gps)) and gps[0] == pytest.approx(penalty, rel=1e-5)
  assert gps[-1] < 0.5 * gps[0]  # the penalty's gradient reaches D's parameters


def test_a_users_own_loop_trains_the_gan_on_fashion_mnist():
  """Our modules and losses in a user's loop (nnx.Optimizer, nnx.jit, the mode set by
  train() / eval()) on 512 real Fashion-MNIST images: D learns to tell held-out real
  images from fakes, each G update lowers G's loss against D, and the BatchNorm running
  statistics move in training mode only."""
  data = load_fashion_mnist()
  train_NHWC = to_unit_range(data.train_images[:512])
  held_out_BHWC = to_unit_range(data.test_images[:256])
  B, Z = 32, 32
  g, d = build_gan(GanConfig(image_size=28, z_dim=Z, width=16), nnx.Rngs(0))
  g_optimizer = nnx.Optimizer(g, optax.adam(2e-4, b1=0.5), wrt=nnx.Param)
  d_optimizer = nnx.Optimizer(d, optax.adam(2e-4, b1=0.5), wrt=nnx.Param)

  @nnx.jit
  def d_step(g, d, d_optimizer, real_BHWC, z_BZ):
    fake_BHWC = jax.lax.stop_gradient(g(z_BZ))
    loss_fn = lambda d: d_loss("nonsaturating", d(real_BHWC), d(fake_BHWC))
    loss, grads = nnx.value_and_grad(loss_fn)(d)
    d_optimizer.update(d, grads)
    return loss

  @nnx.jit
  def g_step(g, d, g_optimizer, z_BZ):
    loss_fn = lambda g, d: g_loss("nonsaturating", d(g(z_BZ)))
    loss, grads = nnx.value_and_grad(loss_fn)(g, d)
    g_optimizer.update(g, grads)
    return loss, loss_fn(g, d)  # G's loss on the same noise, before and after its update

  @nnx.jit
  def accuracy(g, d, real_BHWC, z_BZ):
    return 0.5 * (jnp.mean(d(real_BHWC) > 0) + jnp.mean(d(g(z_BZ)) < 0))

  z_eval = jax.random.normal(jax.random.PRNGKey(99), (256, Z))

  def evaluate():
    g.eval()
    d.eval()
    stats = batch_stats(g)
    acc = float(accuracy(g, d, held_out_BHWC, z_eval))
    assert all(np.array_equal(a, b) for a, b in zip(stats, batch_stats(g), strict=True))
    g.train()
    d.train()
    return acc

  initial_stats, acc_before = batch_stats(g), evaluate()
  rng, key = np.random.default_rng(0), jax.random.PRNGKey(0)
  d_losses, g_before, g_after = [], [], []
  for i in range(40):
    k_d, k_g = jax.random.split(jax.random.fold_in(key, i))
    real_BHWC = train_NHWC[rng.choice(len(train_NHWC), B, replace=False)]
    d_losses.append(float(d_step(g, d, d_optimizer, real_BHWC, jax.random.normal(k_d, (B, Z)))))
    before, after = g_step(g, d, g_optimizer, jax.random.normal(k_g, (B, Z)))
    g_before.append(float(before))
    g_after.append(float(after))
  acc_after = evaluate()
  assert acc_after > max(0.6, acc_before + 0.15), (acc_before, acc_after)
  assert np.mean(d_losses[-3:]) < np.mean(d_losses[:3]) - 0.2, d_losses
  assert np.mean(np.array(g_after) < np.array(g_before)) >= 0.9, (g_before, g_after)
  trained_stats = batch_stats(g)
  assert all(not np.allclose(a, b) for a, b in zip(initial_stats, trained_stats, strict=True))

  g.eval()
  y_eval = nnx.jit(lambda g, z: g(z))(g, z_eval[:B])
  g.train()
  y_train = nnx.jit(lambda g, z: g(z))(g, z_eval[:B])  # batch statistics, then an update
  assert float(jnp.abs(y_train - y_eval).mean()) > 1e-3
  assert all(not np.array_equal(a, b)
             for a, b in zip(trained_stats, batch_stats(g), strict=True))


def test_penalties_refuse_a_critic_with_batch_statistics():
  class BatchNormCritic(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)
      self.out = nnx.Linear(4 * 8 * 8, 1, rngs=rngs)

    def __call__(self, x_BHWC):
      h = self.norm(self.conv(x_BHWC))
      return self.out(h.reshape(x_BHWC.shape[0], -1))[:, 0]

  critic = BatchNormCritic(nnx.Rngs(0))
  real = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  with pytest.raises(UserError, match="BatchNorm at norm in training mode"):
    gradient_penalty(critic, real, -real, jax.random.PRNGKey(1))
  with pytest.raises(UserError, match="pass critic.eval"):
    r1_penalty(critic, real)
  critic.eval()  # running averages: examples independent, the penalty is defined
  assert np.isfinite(float(r1_penalty(critic, real)))
