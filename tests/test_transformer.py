import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aigc_jax import Transformer, TransformerConfig, UserError
from aigc_jax.models.transformer import detach_dropout_rngs, train_with_key

CFG = TransformerConfig(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                        mlp_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, t):
  return model(t)


@nnx.jit
def cached_forward(model, t, positions, cache, cache_index, start):
  return model(t, positions, cache=cache, cache_index=cache_index, start_B=start)


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


def test_shapes_and_param_count(model):
  logits = forward(model, tokens((3, 11)))
  assert logits.shape == (3, 11, CFG.vocab_size) and logits.dtype == jnp.float32
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == CFG.num_params()


def test_causal(model):
  t = tokens((2, 16))
  changed = t.at[:, 9:].set((t[:, 9:] + 5) % CFG.vocab_size)
  a, b = forward(model, t), forward(model, changed)
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert not np.allclose(a[:, 9:], b[:, 9:])


def test_kv_cache_decoding_equals_full_recomputation(model):
  t = tokens((2, 20), seed=1)
  full = forward(model, t)
  cache = model.init_cache(2, 20)
  start = jnp.zeros((2,), jnp.int32)
  prefill_pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  logits, cache = cached_forward(model, t[:, :7], prefill_pos, cache, jnp.int32(0), start)
  steps = [logits]
  for i in range(7, 20):
    pos = jnp.full((2, 1), i, jnp.int32)
    logits, cache = cached_forward(model, t[:, i:i + 1], pos, cache, jnp.int32(i), start)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_left_padded_rows_match_unpadded(model):
  """A row left-padded by 5 slots (masked, positions from its start) gives the logits the
  unpadded sequence gives."""
  t = tokens((1, 10), seed=2)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), t], axis=1)
  positions = jnp.maximum(jnp.arange(15)[None] - 5, 0)
  cache = model.init_cache(1, 15)
  logits, _ = cached_forward(model, padded, positions, cache, jnp.int32(0), jnp.array([5]))
  np.testing.assert_allclose(logits[:, 5:], forward(model, t), atol=1e-5, rtol=0)


def test_grouped_query_attention_shapes():
  cfg = TransformerConfig(vocab_size=11, num_layers=1, num_heads=6, num_kv_heads=1,
                          embed_dim=24, mlp_dim=16, tie_embeddings=False)
  m = Transformer(cfg, rngs=nnx.Rngs(1))
  assert m.blocks[0].attn.k_proj.kernel[...].shape == (24, 4)
  assert forward(m, tokens((1, 5)) % 11).shape == (1, 5, 11)


def test_bfloat16_compute_keeps_float32_params():
  cfg = TransformerConfig(vocab_size=97, num_layers=1, num_heads=2, num_kv_heads=2,
                          embed_dim=16, mlp_dim=32, dtype="bfloat16")
  m = Transformer(cfg, rngs=nnx.Rngs(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  out = forward(m, tokens((1, 4)))
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_remat_gives_same_gradients(dropout):
  base = dict(vocab_size=97, num_layers=2, num_heads=2, num_kv_heads=2, embed_dim=16,
              mlp_dim=32, dropout=dropout)
  t = tokens((2, 8))
  grads = []
  for remat in (False, True):
    m = Transformer(TransformerConfig(**base, remat=remat), rngs=nnx.Rngs(0))
    m.train()  # the same dropout masks: same streams, drawn in the same order
    g = nnx.jit(nnx.grad(lambda m: m(t).mean()))(m)
    grads.append(jax.tree.leaves(nnx.state(g)))
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (np.array([[1, 2, 97]]), "outside the vocabulary"),
    (np.array([[-1, 2]]), "outside the vocabulary"),
    (np.array([1, 2, 3]), "shape"),
    (np.array([[1.0, 2.0]]), "integer"),
])
def test_bad_tokens_raise_clear_errors(model, bad, message):
  with pytest.raises(UserError, match=message):
    model(jnp.asarray(bad))


def test_flops_count_matches_matmul_shapes():
  # One layer, no attention cost at seq_len=0: forward FLOPs = 2 * (params in matmuls).
  cfg = TransformerConfig(vocab_size=50, num_layers=1, num_heads=2, num_kv_heads=1,
                          embed_dim=8, mlp_dim=12)
  matmul_params = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 12 + 50 * 8
  assert cfg.flops_per_token(0, training=False) == 2 * matmul_params
  assert cfg.flops_per_token(0, training=True) == 6 * matmul_params


@pytest.mark.parametrize("seq_len,head_dim,base", [(64, 32, 1e4), (300, 64, 1e5)])
def test_constant_rope_angles_equal_the_computed_ones(seq_len, head_dim, base):
  from aigc_jax.nn.rope import rope_angles, rope_angles_from_zero
  const = rope_angles_from_zero(seq_len, head_dim, base)
  traced = jax.jit(rope_angles, static_argnums=(1, 2))(
      jnp.arange(seq_len)[None], head_dim, base)
  assert const.sin_BTF.shape == const.cos_BTF.shape == (1, seq_len, head_dim // 2)
  # The traced angles are rounded to float32 before sin/cos: ~1e-7 x angle (<= 300 rad).
  for a, b in zip(const, traced, strict=True):
    np.testing.assert_allclose(a, b, atol=seq_len * 2e-7, rtol=0)


DROPOUT_CFG = dataclasses.replace(CFG, dropout=0.3)


def test_eval_mode_is_deterministic_and_train_mode_applies_dropout():
  model = Transformer(DROPOUT_CFG, rngs=nnx.Rngs(0))
  t = tokens((2, 12))
  first = forward(model, t)  # a new model is in evaluation mode
  np.testing.assert_array_equal(forward(model, t), first)
  np.testing.assert_array_equal(model(t), model(t))  # eager too (jit rounds differently)
  model.train()
  a, b = forward(model, t), forward(model, t)  # nnx.jit carries the streams' counts out
  assert float(jnp.abs(a - b).max()) > 1e-3 and float(jnp.abs(a - first).max()) > 1e-3
  assert float(jnp.abs(model(t) - a).max()) > 1e-3
  model.eval()
  np.testing.assert_array_equal(forward(model, t), first)
  nnx.reseed(model, dropout=7)  # the streams are tagged 'dropout'
  model.train()
  c = forward(model, t)
  nnx.reseed(model, dropout=7)
  np.testing.assert_array_equal(forward(model, t), c)


def test_dropout_needs_a_key_stream():
  with pytest.raises(UserError, match="needs a 'dropout' key stream"):
    Transformer(DROPOUT_CFG, rngs=nnx.Rngs(params=0))
  Transformer(DROPOUT_CFG, rngs=nnx.Rngs(params=0, dropout=1))
  Transformer(CFG, rngs=nnx.Rngs(params=0))  # no dropout: no stream needed


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pure_step_merges_parameters_alone_and_takes_the_key(dropout):
  """The families' pattern: a graphdef whose state is the parameters alone, merged inside
  jit from a pure dict; `train_with_key` turns dropout on with the step's key."""
  model = Transformer(dataclasses.replace(CFG, dropout=dropout), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(detach_dropout_rngs(model))
  params = nnx.to_pure_dict(state)
  assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  t = tokens((2, 12))

  def logits(params, key, train):
    m = nnx.merge(graphdef, params)
    if train:
      train_with_key(m, key)
    return m(t)

  run = jax.jit(logits, static_argnums=2)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  evaluated = run(params, k1, False)
  np.testing.assert_array_equal(run(params, k1, True), run(params, k1, True))
  hlo = run.lower(params, k1, True).as_text()
  if dropout:
    assert float(jnp.abs(run(params, k1, True) - run(params, k2, True)).max()) > 1e-3
    assert float(jnp.abs(run(params, k1, True) - evaluated).max()) > 1e-3
    assert "threefry" in hlo
  else:  # nothing drops out: the same program as evaluation, no random draws
    np.testing.assert_array_equal(run(params, k1, True), evaluated)
    assert "threefry" not in hlo and "rng" not in hlo


def test_a_users_own_loop_trains_on_real_text():
  """nnx.Optimizer + nnx.jit, dropout on in training and off in evaluation, on the bytes
  of a standard-library module: the held-out loss falls clearly."""
  import textwrap

  data = np.frombuffer(open(textwrap.__file__, "rb").read(), np.uint8).astype(np.int32)
  split = len(data) * 9 // 10
  T, B = 32, 16
  cfg = TransformerConfig(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                          embed_dim=64, mlp_dim=128, max_seq_len=T, dropout=0.1)
  model = Transformer(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  eval_loss = nnx.jit(loss_fn)
  rng = np.random.default_rng(0)
  starts = np.arange(split, len(data) - T - 1, T)[:32]
  held_x = np.stack([data[i:i + T] for i in starts])
  held_y = np.stack([data[i + 1:i + T + 1] for i in starts])
  model.eval()
  before = float(eval_loss(model, held_x, held_y))
  for _ in range(100):
    idx = rng.integers(0, split - T - 1, B)
    model.train()
    train_step(model, optimizer, np.stack([data[i:i + T] for i in idx]),
               np.stack([data[i + 1:i + T + 1] for i in idx]))
  model.eval()
  after = float(eval_loss(model, held_x, held_y))
  assert before > 5.0 and after < before - 2.0, (before, after)
