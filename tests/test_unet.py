import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.unet import UNet, UNetConfig, timestep_features
from aigc_jax.nn.attention import bidirectional_attention
from aigc_jax.nn.partitioning import param_names

TINY = dict(image_size=8, width=16, channel_mults=(1, 2), blocks_per_level=1,
            attention_levels=(1,), groups=4, head_dim=8)


def build(seed=0, **overrides):
  """(forward, params): a jitted pure forward(params, x, noise, labels, key) of a UNet."""
  cfg = UNetConfig(**{**TINY, **overrides})
  graphdef, params = nnx.split(UNet(cfg, rngs=nnx.Rngs(seed)))
  forward = jax.jit(lambda p, x, noise, labels=None, key=None:
                    nnx.merge(graphdef, p)(x, noise, labels, key))
  return forward, params


def perturb(params, scale=0.2, seed=1):
  """Every parameter plus Gaussian noise, so the zero-initialised convs do something."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32),
                      params)


def images(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("size, channels, mults", [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2, 2))])
def test_shapes_zero_start_and_conditioning(size, channels, mults):
  forward, params = build(image_size=size, channels=channels, channel_mults=mults,
                          attention_levels=(len(mults) - 1,), num_classes=3)
  x = images((2, size, size, channels))
  noise, null = jnp.array([10.0, 10.0]), jnp.array([3, 3])
  out = forward(params, x, noise, null)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0  # the zero-initialised output conv
  params = perturb(params)
  out = forward(params, x, noise, null)
  assert float(jnp.abs(out).max()) > 1e-2
  other_noise = forward(params, x, jnp.array([10.0, 500.0]), null)
  np.testing.assert_allclose(other_noise[0], out[0], atol=1e-6)  # per image
  assert float(jnp.abs(other_noise[1] - out[1]).max()) > 1e-3
  labelled = forward(params, x, noise, jnp.array([0, 1]))
  assert float(jnp.abs(labelled - out).max(axis=(1, 2, 3)).min()) > 1e-3
  swapped = forward(params, x, noise, jnp.array([1, 1]))
  assert float(jnp.abs(swapped[0] - labelled[0]).max()) > 1e-3


def test_no_labels_means_the_null_label():
  forward, params = build(num_classes=3)
  params = perturb(params)
  x, noise = images((2, 8, 8, 1)), jnp.array([3.0, 700.0])
  np.testing.assert_array_equal(forward(params, x, noise), forward(params, x, noise,
                                                                   jnp.array([3, 3])))
  assert float(jnp.abs(forward(params, x, noise, jnp.array([2, 2]))
                       - forward(params, x, noise)).max()) > 1e-3


def test_unconditional_rejects_labels_and_bad_shapes():
  cfg = UNetConfig(**TINY)
  model = UNet(cfg, rngs=nnx.Rngs(0))
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match="labels_B must be None"):
    model(x, jnp.zeros(2), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"U-Net input must be \[B, 8, 8, 1\]"):
    model(jnp.zeros((2, 8, 8, 3)), jnp.zeros(2))
  with pytest.raises(ValueError, match=r"noise_B must have shape \[2\]"):
    model(x, jnp.zeros((2, 1)))


def test_images_do_not_interact_within_a_batch():
  forward, params = build(num_classes=2)
  params = perturb(params)
  x = images((4, 8, 8, 1))
  noise, labels = jnp.array([0.0, 30.0, 300.0, 999.0]), jnp.array([0, 1, 2, 0])
  together = forward(params, x, noise, labels)
  alone = jnp.concatenate([forward(params, x[i:i + 1], noise[i:i + 1], labels[i:i + 1])
                           for i in range(4)])
  np.testing.assert_allclose(together, alone, atol=1e-5, rtol=1e-5)


def test_dropout_is_pure_and_keyed():
  forward, params = build(dropout=0.3)
  params = perturb(params)
  x, noise = images((2, 8, 8, 1)), jnp.array([5.0, 50.0])
  plain = forward(params, x, noise)
  np.testing.assert_array_equal(plain, forward(params, x, noise))
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  a, b = forward(params, x, noise, None, k1), forward(params, x, noise, None, k2)
  np.testing.assert_array_equal(a, forward(params, x, noise, None, k1))
  assert float(jnp.abs(a - b).max()) > 1e-3
  assert float(jnp.abs(a - plain).max()) > 1e-3


def test_bfloat16_compute_float32_params_and_output():
  forward32, params = build()
  forward16, params16 = build(dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  params = perturb(params, scale=0.05)
  x, noise = images((2, 8, 8, 1)), jnp.array([5.0, 50.0])
  jaxpr = str(jax.make_jaxpr(forward16)(params, x, noise))
  for op in ("conv_general_dilated", "dot_general"):
    lines = [line for line in jaxpr.splitlines() if op in line]
    assert lines and any("bf16" in line for line in lines), op
  out16, out32 = forward16(params, x, noise), forward32(params, x, noise)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < 5e-2


def test_every_parameter_has_logical_names():
  cfg = UNetConfig(**{**TINY, "num_classes": 4})
  model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  names = param_names(model)
  shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  named = jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda x: isinstance(x, tuple))
  shaped = jax.tree_util.tree_leaves_with_path(shapes)
  assert [p for p, _ in named] == [p for p, _ in shaped] and len(named) > 50
  for (path, n), (_, s) in zip(named, shaped, strict=True):
    assert len(n) == len(s.shape) and any(a is not None for a in n), (path, n, s.shape)
  assert names["conv_in"]["kernel"] == (None, None, "image_channels", "conv_out")
  assert names["conv_out"]["kernel"] == (None, None, "conv_in", "image_channels")
  assert names["conv_out"]["bias"] == ("image_channels",)
  assert names["label_embed"]["embedding"] == ("classes", "dense_out")


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 9, "model.image_size.*at most 1 entries"),
    ("channels", 0, "model.channels"), ("width", 0, "model.width"),
    ("head_dim", 0, "model.head_dim"), ("blocks_per_level", 0, "model.blocks_per_level"),
    ("channel_mults", (), "model.channel_mults"), ("channel_mults", (1, 0), "model.channel_mults"),
    ("attention_levels", (2,), "model.attention_levels"),
    ("attention_levels", (-1,), "model.attention_levels"),
    ("dropout", 1.0, "model.dropout"), ("dropout", -0.1, "model.dropout"),
    ("num_classes", -1, "model.num_classes"), ("groups", 3, "model.groups"),
    ("head_dim", 10, "model.head_dim"), ("dtype", "float8", "model.dtype"),
    ("attention", "flash", "model.attention"), ("attention", "cudnn", "model.attention")])
def test_bad_config_fields_raise_user_errors(field, value, message):
  with pytest.raises(UserError, match=message):
    UNetConfig(**{**TINY, field: value})


def test_config_sizes_and_lists():
  with pytest.raises(UserError, match="model.image_size'=28.*at most 3 entries"):
    UNetConfig(image_size=28, channel_mults=(1, 2, 2, 2))
  cfg = UNetConfig(**{**TINY, "channel_mults": [1, 2], "attention_levels": [1]})  # from JSON
  assert cfg.channel_mults == (1, 2) and cfg.attention_levels == (1,) and hash(cfg)
  assert UNetConfig(image_size=32, channel_mults=(1, 2, 2, 2)).image_shape == (32, 32, 1)
  assert dataclasses.replace(cfg, width=32, groups=64).norm_groups == 32


def test_timestep_features_span_one_to_ten_thousandth():
  f = np.asarray(timestep_features(jnp.array([0.0, 1.0]), 8))
  np.testing.assert_allclose(f[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  freqs = 10_000.0 ** (-np.arange(4) / 3)
  np.testing.assert_allclose(f[1], np.concatenate([np.sin(freqs), np.cos(freqs)]), rtol=1e-5)


def reference_attention(q, k, v, key_mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v), w


@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_attention_matches_a_softmax_reference(masked):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k, v = (jax.random.normal(key, (2, 5, 3, 4)) for key in (kq, kk, kv))
  mask = jnp.array([[True] * 5, [True, True, False, True, False]]) if masked else None
  want, weights = reference_attention(q, k, v, mask)
  if masked:
    assert weights[1, :, :, [2, 4]].max() == 0.0
    # Values at masked keys do not reach any output.
    v_changed = v.at[1, jnp.array([2, 4])].set(100.0)
    np.testing.assert_allclose(bidirectional_attention(q, k, v_changed, mask),
                               bidirectional_attention(q, k, v, mask), atol=1e-6)
  else:  # not causal: the first query sees the last key
    assert weights[0, 0, 0, -1] > 0
  for impl in ("einsum", "xla"):
    np.testing.assert_allclose(bidirectional_attention(q, k, v, mask, impl), want,
                               atol=1e-5, rtol=1e-5)


def test_xla_attention_unet_equals_einsum():
  forward_e, params = build()
  forward_x, _ = build(attention="xla")
  params = perturb(params)
  x, noise = images((2, 8, 8, 1)), jnp.array([5.0, 50.0])
  np.testing.assert_allclose(forward_x(params, x, noise), forward_e(params, x, noise),
                             atol=1e-5, rtol=1e-5)


def test_a_few_adam_steps_reduce_the_loss():
  forward, params = build(num_classes=2)
  x, noise, labels = images((4, 8, 8, 1)), jnp.array([1.0, 10.0, 100.0, 900.0]), jnp.arange(4) % 3
  target = images((4, 8, 8, 1), seed=7)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean((forward(p, x, noise, labels) - target) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = opt.init(params), []
  for _ in range(8):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0], losses
