"""LoRA adapters and parameter partitions on the transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.models.transformer import Transformer
from aigc_jax.nn.linear import add_lora, merge_lora
from aigc_jax.train import partition
from tests.tiny_llama import tiny_config

TARGETS = [r"attn\.(q|v)_proj$", r"mlp\.down$"]


def _model(tied=True, seed=0):
  return Transformer(tiny_config(96, tied=tied), rngs=nnx.Rngs(seed))


def _tokens():
  return np.random.default_rng(1).integers(0, 96, size=(2, 12)).astype(np.int32)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_lora_model_starts_as_the_base_model():
  model = _model()
  base_logits = model(_tokens())
  paths = add_lora(model, TARGETS, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  assert paths == [f"blocks.{i}.{name}" for i in range(2)
                   for name in ("attn.q_proj", "attn.v_proj", "mlp.down")]
  np.testing.assert_array_equal(model(_tokens()), base_logits)
  lora = _params(model)["blocks"][0]["attn"]["q_proj"]["lora"]
  assert lora["a"].shape == (32, 4) and lora["b"].shape == (4, 32)
  assert float(jnp.abs(lora["a"]).sum()) > 0 and float(jnp.abs(lora["b"]).sum()) == 0


@pytest.mark.parametrize("tied", [True, False])
def test_merged_weights_compute_base_plus_adapters(tied):
  model = _model(tied)
  add_lora(model, TARGETS + (["lm_head"] if not tied else []), rank=3, alpha=6.0,
           rngs=nnx.Rngs(1))
  params = _params(model)
  rng = np.random.default_rng(2)
  # Non-zero adapters, as after training.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: rng.normal(scale=0.1, size=x.shape).astype(np.float32)
      if path[-1].key == "b" else x, params)
  nnx.update(model, params)
  lora_logits = model(_tokens())
  merged = merge_lora(params, alpha=6.0)
  assert "lora" not in str(jax.tree_util.tree_structure(merged))
  base = _model(tied, seed=5)
  nnx.update(base, merged)
  np.testing.assert_allclose(base(_tokens()), lora_logits, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(lora_logits - _model(tied)(_tokens())).max()) > 1e-3  # adapters act


def test_lora_dropout_is_random_only_in_training():
  model = _model()
  add_lora(model, TARGETS, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(1))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.ones_like(x) * 0.05 if path[-1].key == "b" else x, _params(model))
  nnx.update(model, params)
  eval_a, eval_b = model(_tokens()), model(_tokens())  # built in evaluation mode
  np.testing.assert_array_equal(eval_a, eval_b)
  model.train()
  train_a, train_b = model(_tokens()), model(_tokens())  # the adapters' streams advance
  assert float(jnp.abs(train_a - train_b).max()) > 1e-4
  assert float(jnp.abs(train_a - eval_a).max()) > 1e-4
  model.eval()
  np.testing.assert_array_equal(model(_tokens()), eval_a)


def test_adapters_start_in_the_models_mode():
  model = _model()
  model.train()
  add_lora(model, TARGETS, rank=2, alpha=4.0, dropout=0.1, rngs=nnx.Rngs(1))
  assert model.blocks[0].attn.q_proj.lora.dropout.deterministic is False
  model = _model()
  add_lora(model, TARGETS, rank=2, alpha=4.0, dropout=0.1, rngs=nnx.Rngs(1))
  assert model.blocks[0].attn.q_proj.lora.dropout.deterministic is True
  with pytest.raises(UserError, match="needs a 'dropout' key stream"):
    add_lora(_model(), TARGETS, rank=2, alpha=4.0, dropout=0.1, rngs=nnx.Rngs(params=1))


def test_target_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(UserError, match=r"LoRA target pattern 'attn\\.qkv' matches nothing; "
                                      "the paths look like: blocks.N.attn.k_proj, "
                                      r"blocks.N.attn.o_proj, blocks.N.attn.q_proj"):
    add_lora(_model(), [r"attn\.qkv"], rank=2, alpha=4.0, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="rank must be >= 1"):
    add_lora(_model(), TARGETS, rank=0, alpha=4.0, rngs=nnx.Rngs(0))


def test_partition_by_patterns_splits_and_joins():
  params = _params(_model())
  chosen = partition.trainable_paths(params, [r"blocks\.1\.", "final_norm"], [r"mlp\.up"])
  assert "blocks.1.attn.q_proj.kernel" in chosen and "final_norm.scale" in chosen
  assert "blocks.1.mlp.up.kernel" not in chosen and "blocks.0.attn.q_proj.kernel" not in chosen
  train, frozen = partition.split(params, chosen)
  assert set(partition.flat_paths(train)) == chosen
  assert not set(partition.flat_paths(frozen)) & chosen
  joined = partition.join(train, frozen)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  with pytest.raises(UserError, match="frozen pattern 'nope' matches nothing"):
    partition.trainable_paths(params, [".*"], ["nope"])
