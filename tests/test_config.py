import ml_collections
import pytest

from aigc_jax.config import config_from_file, differing_fields, load_config, save_config
from aigc_jax.errors import UserError
from aigc_jax.train.loop import prepare_config
from tests.conftest import TINY_CONFIG


def test_tiny_config_is_valid(tiny_config):
  assert prepare_config(tiny_config).__name__ == "aigc_jax.families.lm"


@pytest.mark.parametrize("key, value, message", [
    ("model.num_layers", 0, "'model.num_layers' must be positive"),
    ("model.embed_dim", -8, "'model.embed_dim' must be positive"),
    ("model.num_kv_heads", 3, "'model.num_kv_heads' must divide"),
    ("model.dtype", "float64", "'model.dtype' must be one of"),
    ("model.attention", "flash", "'model.attention' must be one of"),
    ("model.dropout", 1.5, "'model.dropout'"),
    ("model.logits_chunk", -1, "'model.logits_chunk' must be >= 0"),
    ("sample.repetition_penalty", 0.0, "config 'sample': need temperature >= 0"),
    ("data.name", "imagenet", "'data.name'"),
    ("data.path", "/no/such/file.txt", "does not exist"),
    ("train.batch_size", 0, "'train.batch_size' must be positive"),
    ("train.grad_accum_steps", 3, "must divide train.batch_size"),
])
def test_bad_values_name_the_field(tiny_config, key, value, message):
  section, leaf = key.split(".")
  with tiny_config.unlocked():
    tiny_config[section][leaf] = value
  with pytest.raises(UserError, match=message):
    prepare_config(tiny_config)


def test_wrong_type_names_the_field(tiny_config):
  # ConfigDict type-checks assignments; a config file can still build a section wrongly.
  tiny_config.model = ml_collections.ConfigDict({**tiny_config.model.to_dict(),
                                                 "num_layers": "four"})
  with pytest.raises(UserError, match="'model.num_layers' must be of type int"):
    prepare_config(tiny_config)


def test_unknown_key_suggests_the_right_one(tiny_config):
  with tiny_config.unlocked():
    tiny_config.model.num_layer = 3
  with pytest.raises(UserError, match=r"unknown config key 'model.num_layer'.*did you mean "
                     r"'num_layers'"):
    prepare_config(tiny_config)


def test_overrides_and_diffs():
  cfg = config_from_file(TINY_CONFIG, {"train.steps": 7})
  assert cfg.train.steps == 7
  with pytest.raises(UserError, match="did you mean 'steps'"):
    config_from_file(TINY_CONFIG, {"train.step": 7})
  other = config_from_file(TINY_CONFIG, {"model.num_layers": 5})
  assert differing_fields(cfg.model, other.model) == ["num_layers: 2 -> 5"]


def test_a_saved_config_from_before_a_new_setting_loads_with_its_default(tiny_config,
                                                                          tmp_path):
  """A run saved by an older version (no `model.logits_chunk`) still samples and resumes."""
  with tiny_config.unlocked():
    del tiny_config.model["logits_chunk"]
  save_config(tiny_config, str(tmp_path))
  loaded = load_config(str(tmp_path))
  assert loaded.model.logits_chunk == 0
  assert loaded.model.embed_dim == tiny_config.model.embed_dim
  assert "logits_chunk" not in (tmp_path / "config.json").read_text()
