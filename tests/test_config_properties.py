"""Property tests for config parsing (hypothesis): any config whose values keep their
defaults' kinds passes the key/type check and survives the workdir's JSON round trip; any
value of another kind, or any unknown key, is one UserError naming the field."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc_jax.config import check_against_defaults, differing_fields, load_config, save_config
from aigc_jax.errors import UserError
from aigc_jax.families import gan, lm, vae

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
  assert differing_fields(cfg.to_dict(), load_config(str(tmp_path)).to_dict()) == []


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
