"""The diffusion transformer: patches in and out, a zero start (adaLN-Zero), conditioning
on the noise level and the label, positions, bfloat16 compute, and one error per bad
setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.dit import DiT, DiTConfig, patchify, sincos_positions, unpatchify
from tests.test_unet import perturb

TINY = dict(image_size=8, channels=1, patch_size=2, dim=32, depth=2, head_dim=8, mlp_dim=64)


def build(seed=0, **overrides):
  """(forward, params): a jitted pure forward(params, x, noise, labels, key) of a DiT."""
  cfg = DiTConfig(**{**TINY, **overrides})
  graphdef, params = nnx.split(DiT(cfg, rngs=nnx.Rngs(seed)))
  forward = jax.jit(lambda p, x, noise, labels=None, key=None:
                    nnx.merge(graphdef, p)(x, noise, labels, key))
  return forward, params


def test_patches_are_row_major_and_unpatchify_inverts_them():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  tokens = patchify(x, 2)
  assert tokens.shape == (2, 6, 12)  # (4 / 2) * (6 / 2) patches of 2 * 2 * 3 values
  # Token 4 is patch row 1, column 1: pixels rows 2-3, columns 2-3, every channel.
  np.testing.assert_array_equal(tokens[1, 4], x[1, 2:4, 2:4, :].reshape(-1))
  np.testing.assert_array_equal(unpatchify(tokens, 2, (4, 6, 3)), x)


def test_positions_differ_per_patch_and_fill_the_width():
  table = sincos_positions(4, 32)
  assert table.shape == (16, 32)
  assert len({tuple(np.round(row, 6)) for row in table}) == 16  # every patch its own
  # Row features depend on the patch row only: patches 0 and 1 share their first half.
  np.testing.assert_allclose(table[0, :16], table[1, :16])
  assert np.abs(table[0, 16:] - table[1, 16:]).max() > 0.1


def test_shapes_zero_start_and_conditioning():
  forward, params = build(num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  noise, null = jnp.array([10.0, 10.0]), jnp.array([3, 3])
  out = forward(params, x, noise, null)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0  # adaLN-Zero: every gate and the output at zero
  params = perturb(params)
  out = forward(params, x, noise, null)
  assert float(jnp.abs(out).max()) > 1e-2
  other_noise = forward(params, x, jnp.array([10.0, 500.0]), null)
  np.testing.assert_allclose(other_noise[0], out[0], atol=1e-5)  # per image
  assert float(jnp.abs(other_noise[1] - out[1]).max()) > 1e-3
  labelled = forward(params, x, noise, jnp.array([0, 1]))
  assert float(jnp.abs(labelled - out).max(axis=(1, 2, 3)).min()) > 1e-3
  np.testing.assert_array_equal(forward(params, x, noise), out)  # no labels: the null label
  # Attention mixes patches: changing one patch changes the output of the others.
  moved = forward(params, x.at[:, :2, :2].add(1.0), noise, null)
  assert float(jnp.abs(moved[:, 4:, 4:] - out[:, 4:, 4:]).max()) > 1e-4


def test_dropout_is_keyed_and_bfloat16_follows_float32():
  forward, params = build(dropout=0.3)
  params = perturb(params)
  x, noise = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1)), jnp.full((4,), 100.0)
  key = jax.random.PRNGKey(2)
  np.testing.assert_array_equal(forward(params, x, noise, None, key),
                                forward(params, x, noise, None, key))
  assert float(jnp.abs(forward(params, x, noise, None, key) - forward(params, x, noise)).max()) \
      > 1e-3
  reference = forward(params, x, noise)
  forward16, _ = build(dropout=0.3, dtype="bfloat16")
  low = forward16(params, x, noise)
  assert low.dtype == jnp.float32
  cosine = jnp.sum(low * reference) / (jnp.linalg.norm(low) * jnp.linalg.norm(reference))
  assert float(cosine) > 0.99


def test_unconditional_rejects_labels_and_bad_shapes():
  model = DiT(DiTConfig(**TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="labels_B must be None"):
    model(jnp.zeros((2, 8, 8, 1)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"DiT input must be \[B, 8, 8, 1\]"):
    model(jnp.zeros((2, 8, 8, 3)), jnp.zeros(2))


@pytest.mark.parametrize("overrides, message", [
    (dict(patch_size=3), "'model.image_size'=8 is not divisible by model.patch_size=3"),
    (dict(head_dim=12), "'model.head_dim'=12 does not divide model.dim=32"),
    (dict(depth=0), "'model.depth' must be positive"),
    (dict(dropout=1.0), "'model.dropout' must be in"),
    (dict(attention="cudnn"), "needs model.dtype bfloat16"),
])
def test_bad_settings(overrides, message):
  with pytest.raises(UserError, match=message):
    DiTConfig(**{**TINY, **overrides})
