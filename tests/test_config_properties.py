"""Property tests for config parsing (hypothesis): any config whose values keep their
defaults' kinds passes the key/type check and survives the workdir's JSON round trip; any
value of another kind, or any unknown key, is one UserError naming the field. Any number
(NaN, infinities, huge, tiny, negative) given to a sampling or optimizer setting is either
refused by one UserError naming the setting, or accepted and finite in effect."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc_jax.config import check_against_defaults, differing_fields, load_config, save_config
from aigc_jax.errors import UserError
from aigc_jax.families import gan, lm, vae
from aigc_jax.models.sampling import SAMPLING_KEYS, check_sampling, penalize_repeats, sample_logits
from aigc_jax.train.optim import adamw

FAMILIES = {"lm": lm, "gan": gan, "vae": vae}


def _leaves(cfg, prefix=""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _set(cfg, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    cfg = cfg[p]
  cfg[leaf] = value


def _same_kind_value(default):
  if isinstance(default, bool):
    return st.booleans()
  if isinstance(default, int):
    return st.integers(-10**6, 10**6)
  if isinstance(default, float):
    return st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-1000, 1000)
  return st.text(max_size=12)


def _other_kind_value(default):
  if isinstance(default, bool):
    return st.integers(2, 10) | st.text(min_size=1, max_size=5)
  if isinstance(default, (int, float)):
    return st.text(max_size=5) | st.booleans() | st.lists(st.integers(), max_size=2)
  return st.integers() | st.booleans()


@st.composite
def _edits(draw, family: str, kind):
  defaults = FAMILIES[family].default_config()
  fields = [(k, v) for k, v in _leaves(defaults) if v is not None and k != "family"
            and not isinstance(v, (list, tuple))]
  chosen = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=4,
                         unique_by=lambda f: f[0]))
  return [(k, draw(kind(v))) for k, v in chosen]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_values_of_the_default_kind_pass_and_round_trip(tmp_path, family, data):
  cfg = FAMILIES[family].default_config()
  for field, value in data.draw(_edits(family, _same_kind_value)):
    _set(cfg, field, value)
  check_against_defaults(cfg, FAMILIES[family].default_config())
  save_config(cfg, str(tmp_path))
  expected = cfg.to_dict()
  module = FAMILIES[family]
  if hasattr(module, "clear_unread_settings"):  # loading resets what the run never read
    expected = module.clear_unread_settings(expected)
  assert differing_fields(expected, load_config(str(tmp_path)).to_dict()) == []


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_value_of_another_kind_names_its_field(family, data):
  # As plain nested dicts (e.g. from JSON): a ConfigDict refuses or converts such an
  # assignment itself.
  cfg = FAMILIES[family].default_config().to_dict()
  field, value = data.draw(_edits(family, _other_kind_value))[0]
  _set(cfg, field, value)
  with pytest.raises(UserError, match=f"config '{field}' must be"):
    check_against_defaults(cfg, FAMILIES[family].default_config())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=40, deadline=None)
@given(key=st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True))
def test_an_unknown_key_is_refused(family, key):
  cfg = FAMILIES[family].default_config()
  if key in cfg.train:
    return
  cfg.train[key] = 1
  with pytest.raises(UserError, match=f"unknown config key 'train.{key}'"):
    check_against_defaults(cfg, FAMILIES[family].default_config())


# Any number: every float (NaN, +-inf, subnormals, huge), big and small integers, and the
# values just past float32's limits (0 there, 1 there, inf there).
ANY_NUMBER = (st.floats() | st.integers(-10**40, 10**40)
              | st.sampled_from([0, 0.0, -0.0, 1, 1.0, 1e-50, 5e-324, 0.99999999, 1e39,
                                 3e38, 1.2e-38, float("nan"), float("inf"), -float("inf")]))
LOGITS_1V = jnp.array([[2.0, 0.0, -1.0, 5.0, 0.5, -3.0, 0.0, 1.0]])
SEEN_1V = jnp.array([[True, True, False, True, False, False, False, True]])


@settings(max_examples=100, deadline=None, derandomize=True)  # the same examples in CI
@given(key=st.sampled_from((*SAMPLING_KEYS, "max_new_tokens")), value=ANY_NUMBER)
def test_any_sampling_value_is_refused_by_name_or_finite_in_effect(key, value):
  s = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, key: value}
  try:
    check_sampling("config 'sample'", **s)
  except UserError as e:
    assert str(e).startswith("config 'sample': ")
    assert f"{key} must be " in str(e) and repr(value) in str(e)
    return
  assert math.isfinite(value) and math.isfinite(np.float32(value))
  if key == "max_new_tokens":
    assert isinstance(value, int) and value >= 0
    return
  penalized_1V = penalize_repeats(LOGITS_1V, SEEN_1V, s["repetition_penalty"])
  assert not jnp.isnan(penalized_1V).any()
  ids = [int(sample_logits(penalized_1V, jax.random.PRNGKey(i), s["temperature"], s["top_k"],
                           s["top_p"])[0]) for i in range(4)]
  # A real id, and one the logits allow: never a NaN's pick or an all -inf row's id 0 when
  # id 0 is not the most likely (its penalized logit 2 / r is below the 5 / r of id 3).
  assert all(0 <= i < LOGITS_1V.shape[1] for i in ids)
  if key == "top_p" and value < 0.5 or key == "top_k" and value == 1:
    assert ids == [3] * 4  # only the most likely id is kept
  if key == "temperature" and 0 < value < 1e-3:
    assert ids == [3] * 4  # (near-)greedy


def _adam_effect_lm(c):
  tx, schedule = adamw(c.optim, c.train.steps)
  values = [schedule(step) for step in (0, min(c.optim.warmup_steps, c.train.steps), c.train.steps)]
  return tx, values


def _adam_effect_gan(c):
  # The GAN family's Adam (gan.Family), its settings as floats.
  o = c.optim
  return optax.adam(float(o.g_lr), b1=float(o.b1), b2=float(o.b2)), [np.float32(o.d_lr)]


OPTIMIZER_FAMILIES = {"lm": (lm, _adam_effect_lm), "gan": (gan, _adam_effect_gan)}


@pytest.mark.parametrize("family", sorted(OPTIMIZER_FAMILIES))
@settings(max_examples=100, deadline=None, derandomize=True)  # the same examples in CI
@given(data=st.data(), value=ANY_NUMBER)
def test_any_optimizer_value_is_refused_by_name_or_finite_in_effect(family, data, value):
  module, effect = OPTIMIZER_FAMILIES[family]
  field = data.draw(st.sampled_from(sorted(module.default_config().optim.keys())))
  raw = module.default_config().to_dict()
  raw["optim"][field] = value
  c = ml_collections.ConfigDict(raw)  # as from JSON: any number, whatever the default's type
  try:
    module.validate(c)
  except UserError as e:
    assert f"config 'optim.{field}' must be " in str(e) and repr(value) in str(e)
    return
  assert math.isfinite(value) and math.isfinite(np.float32(value))
  tx, schedule_values = effect(c)
  assert all(np.isfinite(v) for v in schedule_values)
  # One update: zero gradients on a zero matrix (0 / (0 + eps) needs eps > 0 in float32),
  # unit gradients on a vector (bias corrections need b1, b2 < 1 in float32).
  params = {"w": jnp.zeros((2, 2)), "b": jnp.ones(2)}
  grads = {"w": jnp.zeros((2, 2)), "b": jnp.ones(2)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
