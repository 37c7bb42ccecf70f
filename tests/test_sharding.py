"""Sharding by logical axis names: every parameter named, the state's shardings derived
from the rules, sharded training equal to one device's, clear errors for meshes that do
not fit. The tests that need 8 devices run in `make test-8dev` (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.models.dit import DiT, DiTConfig
from aigc_jax.models.gan import GanConfig, build_gan
from aigc_jax.models.transformer import Transformer, TransformerConfig
from aigc_jax.models.vae import VAE, VaeConfig
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train import sharding as sharding_lib
from aigc_jax.train.loop import open_run
from tests.conftest import DIFFUSION_CONFIG, DIT_CONFIG, GAN_CONFIG, ROOT, TINY_CONFIG, VAE_CONFIG

needs_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason="needs 8 devices: `make test-8dev` runs it on 8 fake CPUs")
# LM dimensions every mesh below divides (the byte tokenizer's 257 ids padded to 264).
LM_DIMS = {"model.vocab_size": 264, "model.num_heads": 8, "model.num_kv_heads": 8,
           "model.embed_dim": 64, "model.mlp_dim": 128, "train.batch_size": 8}


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.update(_flat(value, path + ".") if isinstance(value, dict) else {path: value})
  return out


def _lm(**overrides):
  cfg = dict(vocab_size=264, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
             mlp_dim=64, tie_embeddings=False)
  return Transformer(TransformerConfig(**{**cfg, **overrides}), rngs=nnx.Rngs(0))


def test_every_transformer_weight_has_logical_names_that_nnx_reads():
  model = nnx.eval_shape(_lm)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  flat = _flat(specs)
  assert flat["embed.embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  assert flat["lm_head.kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert flat["blocks.0.attn.q_proj.kernel"] == jax.sharding.PartitionSpec("embed", "heads")
  assert flat["blocks.1.attn.k_proj.kernel"] == jax.sharding.PartitionSpec("embed", "kv_heads")
  assert flat["blocks.1.attn.o_proj.kernel"] == jax.sharding.PartitionSpec("heads", "embed")
  assert flat["blocks.0.mlp.down.kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
  assert flat["final_norm.scale"] == jax.sharding.PartitionSpec("norm")
  names = _flat(param_names(model))
  params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert names.keys() == params.keys()
  for path, leaf in params.items():
    assert len(names[path]) == leaf.ndim and all(names[path]), path


def test_lora_adapters_and_conv_nets_are_named_on_every_parameter():
  from aigc_jax.nn.linear import add_lora
  model = _lm()
  add_lora(model, [r"q_proj$", r"down$"], rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  names = _flat(param_names(model))
  assert names["blocks.0.attn.q_proj.lora.a"] == ("embed", "lora_rank")
  assert names["blocks.0.attn.q_proj.lora.b"] == ("lora_rank", "heads")
  assert names["blocks.1.mlp.down.lora.b"] == ("lora_rank", "embed")
  g, d = build_gan(GanConfig(image_size=8, width=16, z_dim=8, d_norm="spectral"), nnx.Rngs(0))
  vae = VAE(VaeConfig(image_size=8, width=8, hidden=32, latent_dim=4), rngs=nnx.Rngs(0))
  dit = DiT(DiTConfig(image_size=8, patch_size=2, dim=16, depth=1, head_dim=8, mlp_dim=32,
                      num_classes=3), rngs=nnx.Rngs(0))
  for module in (g, d, vae, dit):
    names = _flat(param_names(module))
    params = _flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    assert names.keys() == params.keys()
    for path, leaf in params.items():
      assert len(names[path]) == leaf.ndim and any(names[path]), (path, names[path])
  assert _flat(param_names(d))["head.kernel"] == ("dense_in", "out")
  assert _flat(param_names(g))["ups.0.kernel"][-1] == "image_channels"
  # The DiT's attention and MLP are named as the LM's: heads and mlp split over 'tensor'.
  dit_names = _flat(param_names(dit))
  assert dit_names["blocks.0.q.kernel"] == ("embed", "heads")
  assert dit_names["blocks.0.o.kernel"] == ("heads", "embed")
  assert dit_names["blocks.0.mlp.down.kernel"] == ("mlp", "embed")


def test_a_module_with_names_runs_and_trains_with_no_mesh_at_all():
  import optax
  model = _lm()
  tokens = jax.numpy.arange(12, dtype=jax.numpy.int32).reshape(2, 6)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)  # copies the metadata

  def loss(m):
    return m(tokens).mean()

  grads = nnx.grad(loss)(model)
  optimizer.update(model, grads)
  assert model(tokens).shape == (2, 6, 264)


def test_mesh_config_errors_name_the_problem_and_the_fix():
  n = jax.device_count()
  with pytest.raises(UserError, match="multiply to"):
    mesh_lib.axis_sizes({"data": n + 1, "fsdp": 1, "tensor": 1})
  with pytest.raises(UserError, match="at most one"):
    mesh_lib.axis_sizes({"data": -1, "fsdp": -1, "tensor": 1})
  with pytest.raises(UserError, match="unknown logical axis name 'embd'.*embed"):
    mesh_lib.rules_from_config({"rules": {"embd": "fsdp"}})
  with pytest.raises(UserError, match="mesh axes"):
    mesh_lib.rules_from_config({"rules": {"embed": "fsdp,model"}})
  assert mesh_lib.axis_sizes({"data": -1, "fsdp": 1, "tensor": 1}) == {
      "data": n, "fsdp": 1, "tensor": 1}


def test_rules_turn_names_into_specs_and_reject_uneven_splits():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), mesh_lib.MESH_AXES)
  rules = mesh_lib.rules_from_config(None)
  spec = sharding_lib.logical_spec(("embed", "mlp"), (8, 16), mesh, rules, "w")
  assert spec == jax.sharding.PartitionSpec(None, None)  # axes of size 1 split nothing


@needs_8
@pytest.mark.sharded
def test_uneven_splits_and_batches_are_clear_errors(tmp_path):
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  rules = mesh_lib.rules_from_config(None)
  with pytest.raises(UserError, match=r"parameter 'blocks.0.w' dimension 1 \('mlp', size 6\)"):
    sharding_lib.logical_spec(("embed", "mlp"), (8, 6), mesh, rules, "blocks.0.w")
  with pytest.raises(UserError, match="model.num_kv_heads'=2 does not split over the 4"):
    open_run(config_from_file(TINY_CONFIG, {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4,
                                            "model.vocab_size": 264}),
             str(tmp_path / "kv"), for_training=True)
  with pytest.raises(UserError, match=r"train.batch_size=12 is not divisible by the 8"):
    open_run(config_from_file(TINY_CONFIG, {"mesh.data": 2, "mesh.fsdp": 4,
                                            "train.batch_size": 12}),
             str(tmp_path / "batch"), for_training=True)
  with pytest.raises(UserError, match="multiply to 6, but the mesh has 8 devices"):
    mesh_lib.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})


def _train(config_file, overrides, workdir, steps=3):
  """(losses, host params, run) after `steps` compiled steps on the same batch sequence."""
  cfg = config_from_file(config_file, {"train.steps": steps, **overrides})
  run = open_run(cfg, str(workdir), for_training=True)
  state, losses = run.state, []
  step = None
  for _ in range(steps):
    batch = run.put_batch(next(run.family.train_data))
    step = step or run.compile_train_step(batch)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"] if "loss" in metrics else metrics["d_loss"]))
  run.state = state
  return losses, jax.tree.map(np.asarray, state.params), run


def _assert_same_training(reference, other, atol=1e-5):
  np.testing.assert_allclose(other[0], reference[0], rtol=0, atol=atol)
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(reference[1])[0],
                               jax.tree_util.tree_flatten_with_path(other[1])[0], strict=True):
    np.testing.assert_allclose(b, a, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


ONE_DEVICE = {"mesh.num_devices": 1, "mesh.data": 1}


@needs_8
@pytest.mark.sharded
@pytest.mark.parametrize("mesh", [{"data": 8}, {"data": 1, "fsdp": 8},
                                  {"data": 2, "fsdp": 2, "tensor": 2},
                                  {"data": 1, "tensor": 8}],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2", "tensor8"])
def test_lm_training_on_any_mesh_equals_one_device(tmp_path, mesh):
  # Adam's eps far below the gradients' rounding noise would turn summation-order
  # differences of ~1e-9 into whole-lr steps for near-zero gradients: not what is tested.
  dims = {**LM_DIMS, "optim.eps": 1e-6}
  reference = _train(TINY_CONFIG, {**dims, **ONE_DEVICE}, tmp_path / "one")
  sharded = _train(TINY_CONFIG, {**dims, **{f"mesh.{k}": v for k, v in mesh.items()}},
                   tmp_path / "mesh")
  _assert_same_training(reference, sharded)


@needs_8
@pytest.mark.sharded
@pytest.mark.parametrize("config_file, mesh", [
    (GAN_CONFIG, {"fsdp": 8}), (VAE_CONFIG, {"fsdp": 8}), (DIFFUSION_CONFIG, {"fsdp": 8}),
    (DIT_CONFIG, {"fsdp": 4, "tensor": 2})], ids=["gan", "vae", "diffusion", "dit-fsdp4-tensor2"])
def test_image_families_training_sharded_equals_one_device(tmp_path, config_file, mesh):
  reference = _train(config_file, ONE_DEVICE, tmp_path / "one")
  sharded = _train(config_file, {"mesh.data": 1, **{f"mesh.{k}": v for k, v in mesh.items()}},
                   tmp_path / "fsdp")
  _assert_same_training(reference, sharded)
  state = sharded[2].state
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))


@needs_8
@pytest.mark.sharded
def test_fsdp8_holds_an_eighth_of_the_state_per_device_as_the_rules_say(tmp_path):
  _, _, run = _train(TINY_CONFIG, {**LM_DIMS, "mesh.data": 1, "mesh.fsdp": 8}, tmp_path, 1)
  state = run.state
  trained = (state.params, state.opt_state)
  replicated_bytes = sum(x.nbytes for x in jax.tree.leaves(trained))
  assert sharding_lib.max_device_bytes(trained) <= replicated_bytes / 8 * 1.05
  rules = mesh_lib.rules_from_config(run.config.mesh)
  names = _flat(run.family.param_names())
  params = _flat(state.params)
  for path, leaf in params.items():
    expected = sharding_lib.logical_spec(names[path], leaf.shape, run.mesh, rules, path)
    assert leaf.sharding.spec == expected, path
  # Adam's moments inherit their parameter's sharding.
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")][0]
  for moments in (adam.mu, adam.nu):
    for path, leaf in _flat(moments).items():
      assert leaf.sharding.spec == params[path].sharding.spec, path
  assert params["embed.embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


@needs_8
@pytest.mark.sharded
def test_lora_finetuning_under_fsdp4_tensor2_equals_one_device_with_frozen_weights_sharded(
    tmp_path):
  pytest.importorskip("safetensors")
  from tests.tiny_llama import write_tiny_hf
  write_tiny_hf(tmp_path / "pretrained")
  base = {"pretrained.path": str(tmp_path / "pretrained"), "sample.num": 0}
  ft_tiny = str(ROOT / "configs" / "ft_tiny.py")
  reference = _train(ft_tiny, {**base, **ONE_DEVICE}, tmp_path / "one")
  sharded = _train(ft_tiny, {**base, "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2},
                   tmp_path / "mesh")
  _assert_same_training(reference, sharded)
  frozen = _flat(sharded[2].state.frozen)
  assert frozen["blocks.0.attn.q_proj.kernel"].sharding.spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  assert frozen["embed.embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


@needs_8
@pytest.mark.sharded
def test_the_whole_loop_evaluates_samples_and_resumes_on_a_sharded_state(tmp_path):
  from aigc_jax.train.loop import train_and_evaluate
  mesh = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
  cfg = config_from_file(TINY_CONFIG, {**LM_DIMS, **mesh, "train.steps": 4,
                                       "train.eval_every": 4, "train.checkpoint_every": 4})
  summary = train_and_evaluate(cfg, str(tmp_path), progress=False)
  assert np.isfinite(summary["val_loss"])
  samples = (tmp_path / "samples" / "step_0000004.txt").read_text()
  assert samples.count("=== sample") == cfg.sample.num
  # Resumed on another mesh (one device): the same evaluation of the same weights.
  cfg_one = config_from_file(TINY_CONFIG, {**LM_DIMS, **ONE_DEVICE, "train.steps": 4})
  resumed = train_and_evaluate(cfg_one, str(tmp_path), progress=False)
  assert resumed["start_step"] == 4
  assert resumed["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
