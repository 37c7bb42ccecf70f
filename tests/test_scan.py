"""scan_layers: the stacked blocks under lax.scan compute what the unrolled blocks compute
(same weights via stack_blocks), with remat policies, dropout, the KV cache, generate and
the training loop; the traced program does not grow with depth."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aigc_jax import Transformer, TransformerConfig, UserError
from aigc_jax.config import config_from_file
from aigc_jax.families import lm
from aigc_jax.models.block_layout import require_unrolled, stack_blocks, unstack_blocks
from aigc_jax.models.sampling import generate
from aigc_jax.models.transformer import REMAT_POLICIES, checkpoint_policy
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import train_and_evaluate
from aigc_jax.train.loop import open_run
from tests.conftest import TINY_CONFIG

CFG = TransformerConfig(vocab_size=97, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=32,
                        mlp_dim=64, max_seq_len=64)


def pair(cfg=CFG, seed=0):
  """(unrolled, scanned) models holding the same weights."""
  unrolled = Transformer(cfg, rngs=nnx.Rngs(seed))
  scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(seed + 1))
  nnx.update(scanned, stack_blocks(params_of(unrolled)))
  return unrolled, scanned


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


@nnx.jit
def forward(model, t):
  return model(t)


@nnx.jit
def grads(model, t):
  """d mean(log_softmax(logits)) / d params, as a pure dict in the unrolled layout."""
  g = nnx.grad(lambda m: jax.nn.log_softmax(m(t)).mean())(model)
  g = nnx.to_pure_dict(g)
  return unstack_blocks(g) if model.cfg.scan_layers else g


@nnx.jit
def cached_forward(model, t, positions, cache, cache_index, start):
  return model(t, positions, cache=cache, cache_index=cache_index, start_B=start)


def assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_scanned_equals_unrolled_logits_and_gradients():
  unrolled, scanned = pair()
  t = tokens((2, 16))
  np.testing.assert_allclose(forward(scanned, t), forward(unrolled, t), atol=1e-6, rtol=0)
  assert_trees_close(grads(scanned, t), grads(unrolled, t), atol=1e-5)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(scanned, nnx.Param)))
  assert n == CFG.num_params()


def test_stacked_parameters_carry_an_unsplit_layer_axis():
  unrolled, scanned = pair()
  names, params = param_names(scanned), params_of(scanned)
  leaves = jax.tree.leaves(params)
  named = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
  assert len(named) == len(leaves)
  for n, x in zip(named, leaves, strict=True):
    assert len(n) == x.ndim
  block_names = param_names(unrolled)["blocks"][0]
  expected = jax.tree.map(lambda n: (None, *n), block_names,
                          is_leaf=lambda x: isinstance(x, tuple))
  assert names["blocks"] == expected
  assert params["blocks"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 32)


def test_stack_and_unstack_are_inverse_and_check_the_layout():
  unrolled, scanned = pair()
  p = jax.device_get(params_of(unrolled))
  stacked = stack_blocks(p)
  assert isinstance(stacked["blocks"]["mlp"]["up"]["kernel"], np.ndarray)  # stays on host
  assert_trees_close(unstack_blocks(stacked), p, atol=0)
  with pytest.raises(UserError, match="unrolled layout"):
    stack_blocks(stacked)
  with pytest.raises(UserError, match="scan_layers layout"):
    unstack_blocks(p)


# Each layout with remat off, the older switch or 'full', and a named policy (the names
# are only looked up in jax.checkpoint_policies; the test checks what applying one does).
@pytest.mark.parametrize("scan, policies", [
    (False, ("none", "remat=True", "dots_saveable")),
    (True, ("none", "full", "dots_with_no_batch_dims_saveable")),
])
def test_remat_policies_give_the_same_gradients(scan, policies):
  """Rematerialised blocks give the gradients of stored ones, dropout on."""
  base = dataclasses.replace(CFG, dropout=0.1, num_layers=2, scan_layers=scan)
  t = tokens((2, 8))
  results = []
  for policy in policies:
    cfg = (dataclasses.replace(base, remat=True) if policy == "remat=True"
           else dataclasses.replace(base, remat_policy=policy))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.train()  # the same dropout masks: same streams, drawn in the same order
    results.append(grads(model, t))
  for g in results[1:]:
    assert_trees_close(g, results[0], atol=1e-6)


def test_scanned_dropout_gives_each_layer_its_own_key():
  """A scanned call draws one key from the stacked blocks' stream and splits it per layer:
  the unrolled model with those keys in its blocks gives the same outputs."""
  unrolled, scanned = pair(dataclasses.replace(CFG, dropout=0.3))
  unrolled.train()
  scanned.train()
  stream = scanned.blocks.dropout.rngs
  keys = jax.random.split(jax.random.fold_in(stream.key[...], stream.count[...]), CFG.num_layers)
  for block, key in zip(unrolled.blocks, keys, strict=True):
    block.dropout.rngs = nnx.RngStream(key, tag="dropout")
  unrolled.embed_dropout.rngs = nnx.RngStream(scanned.embed_dropout.rngs.key[...], tag="dropout")
  t = tokens((2, 12))
  out = forward(scanned, t)
  np.testing.assert_allclose(out, forward(unrolled, t), atol=1e-6, rtol=0)
  assert not np.allclose(out, forward(scanned, t))  # the stream moved on
  scanned.eval()
  np.testing.assert_array_equal(forward(scanned, t), forward(scanned, t))


def test_scanned_cached_decoding_equals_recomputation():
  _, model = pair()
  t = tokens((2, 20), seed=1)
  full = forward(model, t)
  cache = model.init_cache(2, 20)
  assert cache.k_BSKH.shape == (3, 2, 20, 2, 8)
  start = jnp.zeros((2,), jnp.int32)
  logits, cache = cached_forward(model, t[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)),
                                 cache, jnp.int32(0), start)
  steps = [logits]
  for i in range(7, 20):
    logits, cache = cached_forward(model, t[:, i:i + 1], jnp.full((2, 1), i, jnp.int32), cache,
                                   jnp.int32(i), start)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)


def test_generate_gives_the_unrolled_tokens():
  unrolled, scanned = pair()
  prompts = [np.array([1, 2, 3]), np.array([5, 6, 7, 8, 9, 10])]
  a, b = (generate(m, prompts, max_new_tokens=12, key=jax.random.PRNGKey(3), temperature=0.8,
                   top_k=20) for m in (unrolled, scanned))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


def _dot_count(num_layers: int, scan: bool) -> int:
  cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan,
                            remat_policy="dots_saveable")
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  loss = lambda p, t: nnx.merge(graphdef, p)(t).mean()
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jax.ShapeDtypeStruct((2, 8), jnp.int32))
  return str(jaxpr).count("dot_general")


def test_the_traced_training_program_does_not_grow_with_depth():
  assert _dot_count(2, scan=True) == _dot_count(8, scan=True)
  assert _dot_count(8, scan=False) > 2 * _dot_count(2, scan=False)


def test_errors_name_the_field_and_the_fix():
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  with pytest.raises(UserError, match=r"LoRA.*model\.scan_layers.*unstack_blocks"):
    require_unrolled(scanned_cfg, "LoRA")
  require_unrolled(CFG, "LoRA")  # the unrolled layout passes
  with pytest.raises(UserError, match=r"model\.remat_policy.*dots_saveable"):
    dataclasses.replace(CFG, remat_policy="dots")
  for name in REMAT_POLICIES[1:]:  # every name is a policy of this JAX
    assert name == "full" or callable(checkpoint_policy(name))
  assert dataclasses.replace(CFG, remat=True).resolved_remat_policy == "full"
  assert dataclasses.replace(CFG, remat=True,
                             remat_policy="dots_saveable").resolved_remat_policy == "dots_saveable"
  config = lm.default_config()
  config.model.remat_policy = "everything"
  with pytest.raises(UserError, match=r"model\.remat_policy.*nothing_saveable"):
    lm.validate(config)
  unrolled, scanned = pair()
  t = tokens((1, 4))
  for model, other in ((scanned, unrolled), (unrolled, scanned)):
    with pytest.raises(UserError, match=r"model\.scan_layers.*init_cache"):
      model(t, cache=other.init_cache(1, 8), cache_index=jnp.int32(0))


@pytest.mark.sharded
def test_scanned_lm_trains_through_the_loop(tmp_path):
  """lm_tiny with stacked blocks, remat and dropout, FSDP over every device: the loss falls
  and the stacked kernels are sharded by their names (layer axis whole)."""
  cfg = config_from_file(TINY_CONFIG, {
      "model.scan_layers": True, "model.remat_policy": "dots_with_no_batch_dims_saveable",
      "model.dropout": 0.1, "mesh.data": 1, "mesh.fsdp": -1, "train.steps": 20,
      "train.log_every": 5, "train.eval_every": 20, "train.checkpoint_every": 20,
      "sample.num": 0})
  summary = train_and_evaluate(cfg, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
  assert np.isfinite(summary["val_loss"])
  run = open_run(cfg, str(tmp_path), for_training=False)
  kernel = run.state.params["blocks"]["attn"]["q_proj"]["kernel"]
  assert kernel.shape == (2, 64, 64)
  spec = tuple(kernel.sharding.spec) + (None,) * 3  # a spec may leave trailing axes out
  assert spec[0] is None
  if jax.device_count() > 1:
    assert spec[1] == "fsdp", spec


def test_pretrained_import_and_export_refuse_the_stacked_layout(tmp_path):
  from aigc_jax.pretrained.llama import build_model, tensors_from_params
  cfg = dataclasses.replace(CFG, scan_layers=True)
  with pytest.raises(UserError, match="exporting to Hugging Face / GGUF.*scan_layers"):
    tensors_from_params(cfg, "hf", {})
  with pytest.raises(UserError, match="loading pretrained.*scan_layers"):
    build_model(CFG, {}, "a file", scan_layers=True)
