import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax import Transformer, TransformerConfig, UserError, generate, sample_logits
from aigc_jax.models.sampling import GENERATE_STATIC_ARGNAMES, generate_arrays, left_pad

CFG = TransformerConfig(vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16,
                        mlp_dim=32, max_seq_len=40)


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(3))


def greedy_reference(model, prompt, n, repetition_penalty=1.0):
  """Greedy decoding by full recomputation of the whole sequence at every step (right
  padding to one fixed length is harmless: the model is causal); the repetition penalty
  written out in NumPy."""
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.zeros((1, 16), jnp.int32).at[0, :len(seq)].set(jnp.asarray(seq))
    logits = np.asarray(_forward(model, padded)[0, len(seq) - 1], np.float32)
    seen = np.isin(np.arange(len(logits)), seq)
    logits = np.where(seen & (logits > 0), logits / repetition_penalty, logits)
    logits = np.where(seen & (logits < 0), logits * repetition_penalty, logits)
    seq.append(int(np.argmax(logits)))
  return seq[len(prompt):]


@nnx.jit
def _forward(model, t):
  return model(t)


def test_greedy_generation_equals_full_recomputation_for_batched_prompts(model):
  prompts = [np.array([3, 4, 5, 6, 7]), np.array([9]), np.array([1, 2])]
  out = generate(model, prompts, max_new_tokens=6, key=jax.random.PRNGKey(0), temperature=0)
  for p, o in zip(prompts, out, strict=True):
    assert list(o) == greedy_reference(model, p, 6)


def test_repetition_penalty_equals_a_direct_computation_for_batched_prompts(model):
  # Left padding (id 0) must not count as seen: the short prompts have padding before them.
  prompts = [np.array([3, 4, 5, 6, 7]), np.array([9]), np.array([1, 2])]
  plain = generate(model, prompts, max_new_tokens=8, key=jax.random.PRNGKey(0), temperature=0)
  out = generate(model, prompts, max_new_tokens=8, key=jax.random.PRNGKey(0), temperature=0,
                 repetition_penalty=3.0)
  for p, o in zip(prompts, out, strict=True):
    assert list(o) == greedy_reference(model, p, 8, repetition_penalty=3.0)
  assert any(list(a) != list(b) for a, b in zip(plain, out, strict=True))  # it acts
  repeats = lambda outs: sum(len(o) - len(set(o)) for o in outs)
  assert repeats(out) < repeats(plain), (plain, out)


def test_generation_stops_at_eos(model):
  prompt = np.array([3, 4, 5])
  ref = greedy_reference(model, prompt, 8)
  eos = ref[3]
  out = generate(model, [prompt], max_new_tokens=8, key=jax.random.PRNGKey(0),
                 temperature=0, eos_id=eos)[0]
  assert list(out) == ref[:ref.index(eos)]


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  draw = jax.jit(jax.vmap(lambda k, t, kk, p: sample_logits(logits, k, 1.0, kk, p)[0],
                          in_axes=(0, None, None, None)), static_argnums=(1, 2, 3))
  assert set(np.asarray(draw(keys, 1.0, 2, 1.0)).tolist()) == {0, 1}
  # top_p=0.7: 0.5 alone is below 0.7, 0.5+0.3 reaches it: ids {0, 1}
  assert set(np.asarray(draw(keys, 1.0, 0, 0.7)).tolist()) == {0, 1}
  assert set(np.asarray(draw(keys, 1.0, 0, 0.4)).tolist()) == {0}
  assert set(np.asarray(draw(keys, 1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
  assert int(sample_logits(logits, keys[0], 0.0, 0, 1.0)[0]) == 0


def test_sampling_is_seeded(model):
  kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
  a = generate(model, [np.array([1, 2])], key=jax.random.PRNGKey(5), **kw)[0]
  b = generate(model, [np.array([1, 2])], key=jax.random.PRNGKey(5), **kw)[0]
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("prompts, kw, message", [
    ([np.array([1, 60])], {}, "outside the vocabulary"),
    ([np.arange(35) % 50], {"max_new_tokens": 10}, "context"),
    ([np.array([], np.int32)], {}, "at least one token"),
    ([np.array([1])], {"top_p": 0.0}, "top_p"),
    ([np.array([1])], {"repetition_penalty": 0.0}, "repetition_penalty > 0"),
])
def test_bad_generation_requests(model, prompts, kw, message):
  kw = {"max_new_tokens": 4, "key": jax.random.PRNGKey(0), **kw}
  with pytest.raises(UserError, match=message):
    generate(model, prompts, **kw)


PROMPTS = [np.array([3, 4, 5, 6, 7]), np.array([9]), np.array([1, 2])]


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9),
                                dict(temperature=0.0, repetition_penalty=2.0)],
                         ids=["greedy", "sampled", "penalty"])
def test_jitted_generate_arrays_equals_the_list_generate(model, kw):
  """Arrays in (left-padded prompts of different lengths), arrays out, under jax.jit; an
  end-of-sequence id that stops one row early shows in the lengths and the padding."""
  key = jax.random.PRNGKey(4)
  N = 7
  free = generate(model, PROMPTS, max_new_tokens=N, key=key, **kw)
  eos = int(free[0][2])  # row 0 stops after two new ids
  want = generate(model, PROMPTS, max_new_tokens=N, key=key, eos_id=eos, **kw)
  tokens_BP, lengths_B = left_pad(PROMPTS)
  assert tokens_BP.shape == (3, 5) and list(lengths_B) == [5, 1, 2]
  run = jax.jit(generate_arrays, static_argnames=GENERATE_STATIC_ARGNAMES)
  new_BN, new_lengths_B = run(model, jnp.asarray(tokens_BP), jnp.asarray(lengths_B), key,
                              max_new_tokens=N, eos_id=eos, **kw)
  assert new_BN.shape == (3, N) and new_BN.dtype == jnp.int32
  assert list(np.asarray(new_lengths_B)) == [len(w) for w in want]
  assert len(want[0]) <= 2
  for row, n, w in zip(np.asarray(new_BN), np.asarray(new_lengths_B), want, strict=True):
    assert list(row[:n]) == list(w)
    assert (row[n:] == eos).all()


def test_generate_arrays_composes_into_a_users_jitted_function(model):
  @jax.jit
  def continue_and_score(model, tokens_BP, lengths_B, key):
    new_BN, _ = generate_arrays(model, tokens_BP, lengths_B, key, max_new_tokens=4,
                                temperature=0.0)
    return new_BN, model(new_BN).max(axis=-1)

  tokens_BP, lengths_B = left_pad(PROMPTS)
  new_BN, score_BN = continue_and_score(model, tokens_BP, lengths_B, jax.random.PRNGKey(0))
  want = generate(model, PROMPTS, max_new_tokens=4, key=jax.random.PRNGKey(0), temperature=0)
  np.testing.assert_array_equal(new_BN, np.stack(want))
  assert score_BN.shape == (3, 4)


def test_generation_is_deterministic_in_training_mode():
  """generate runs with dropout off whatever the model's mode."""
  m = Transformer(dataclasses.replace(CFG, dropout=0.5), rngs=nnx.Rngs(3))
  kw = dict(max_new_tokens=6, key=jax.random.PRNGKey(0), temperature=0.0)
  evaluated = generate(m, PROMPTS, **kw)
  m.train()
  for out in (generate(m, PROMPTS, **kw), generate(m, PROMPTS, **kw)):
    for a, b in zip(out, evaluated, strict=True):
      np.testing.assert_array_equal(a, b)


def test_generate_arrays_checks_its_inputs(model):
  tokens_BP, lengths_B = left_pad(PROMPTS)
  kw = dict(max_new_tokens=4)
  with pytest.raises(UserError, match=r"prompt lengths must be in \[1, 5\]"):
    generate_arrays(model, tokens_BP, np.array([5, 0, 2]), jax.random.PRNGKey(0), **kw)
  with pytest.raises(UserError, match=r"lengths must be integers of shape \[batch\]"):
    generate_arrays(model, tokens_BP, lengths_B[:2], jax.random.PRNGKey(0), **kw)
  with pytest.raises(UserError, match="context"):
    generate_arrays(model, tokens_BP, lengths_B, jax.random.PRNGKey(0), max_new_tokens=36)


def test_traced_generate_arrays_gives_invalid_rows_no_tokens():
  cfg = TransformerConfig(vocab_size=50, num_layers=1, num_heads=2, num_kv_heads=2,
                          embed_dim=16, mlp_dim=32, max_seq_len=32)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  jitted = jax.jit(generate_arrays, static_argnames=GENERATE_STATIC_ARGNAMES)
  tokens_BP = np.array([[0, 3, 4, 5], [0, 0, 7, 8], [1, 2, 3, 4], [0, 99, 3, 4]], np.int32)
  lengths_B = np.array([3, 0, 5, 3], np.int32)  # rows 1-2: bad lengths; row 3: id 99 >= V
  new_BN, new_lengths_B = jitted(model, tokens_BP, lengths_B, jax.random.PRNGKey(0),
                                 max_new_tokens=4, temperature=0.0)
  assert new_lengths_B.tolist() == [4, 0, 0, 0]
  assert (np.asarray(new_BN)[1:] == -1).all() and (np.asarray(new_BN)[0] >= 0).all()
  eager = generate(model, [tokens_BP[0, 1:]], max_new_tokens=4, key=jax.random.PRNGKey(0),
                   temperature=0.0)
  np.testing.assert_array_equal(eager[0], new_BN[0])  # valid rows are unaffected
  with pytest.raises(UserError, match="lengths must be integers"):
    jitted(model, tokens_BP, lengths_B.astype(np.float32), jax.random.PRNGKey(0),
           max_new_tokens=4, temperature=0.0)
