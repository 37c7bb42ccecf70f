"""The memory planner: per-device state bytes equal to what a real run allocates, the
compiled step's figures equal to the loop's, batch shapes equal to the families' real
batches, fit checks that name the bytes, and an 8B model planned on 64 fake devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train import plan as plan_lib
from aigc_jax.train import sharding as sharding_lib
from aigc_jax.train.family import load_family
from aigc_jax.train.loop import open_run, prepare_config
from tests.conftest import DIFFUSION_CONFIG, GAN_CONFIG, ROOT, TINY_CONFIG, VAE_CONFIG, run_python

# LM dimensions that split over 8 devices (the byte tokenizer's 257 ids padded to 264).
LM_DIMS = {"model.vocab_size": 264, "model.num_heads": 8, "model.num_kv_heads": 8,
           "model.embed_dim": 64, "model.mlp_dim": 128, "train.batch_size": 8}


def _gib_text(n):
  return f"{n / plan_lib.GiB:.2f} GiB \\({n:,} bytes\\)"


class FakeDevice:
  """A device whose memory_stats() reports `limit` bytes, `in_use` of them taken."""

  def __init__(self, limit, in_use=0):
    self.stats = None if limit is None else {"bytes_limit": limit, "bytes_in_use": in_use}

  def memory_stats(self):
    return self.stats

  def __str__(self):
    return "FakeDevice(id=0)"


# Replicated (data over every device) and FSDP (state split over every device): in the
# 8-device pass, data=8 and fsdp=8.
MESHES = [pytest.param({"mesh.data": -1, "mesh.fsdp": 1}, id="data", marks=pytest.mark.sharded),
          pytest.param({"mesh.data": 1, "mesh.fsdp": -1}, id="fsdp", marks=pytest.mark.sharded)]


@pytest.mark.parametrize("mesh_overrides", MESHES)
def test_plan_equals_what_a_run_allocates_and_compiles(tmp_path, mesh_overrides):
  cfg = config_from_file(TINY_CONFIG, {**LM_DIMS, **mesh_overrides})
  prepare_config(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  plan = plan_lib.plan_memory(cfg, mesh, keep_compiled=True)
  run = open_run(cfg, str(tmp_path), for_training=True)
  state = run.state
  assert plan["devices"] == jax.device_count()
  assert plan["params"] == sum(x.size for x in jax.tree.leaves(state.params))
  assert plan["param_bytes"] == sharding_lib.max_device_bytes(state.params)
  assert plan["optimizer_bytes"] == sharding_lib.max_device_bytes(state.opt_state)
  assert plan["state_bytes"] == sharding_lib.max_device_bytes(state)
  if mesh.shape["fsdp"] > 1:  # the split is real: each device holds 1/8 of every matrix
    whole = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert plan["param_bytes"] < whole / 4
  # The planner compiles the loop's program: the same figures as the step the run compiles.
  batch = run.put_batch(next(run.family.train_data))
  compiled = run.compile_train_step(batch)
  expected = plan_lib.compiled_memory(compiled)
  for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes"):
    assert plan[key] == expected[key], key
  assert plan["total_bytes"] > plan["state_bytes"] > 0 and plan["complete"]
  # The planned executable runs on the real state and batch: a loop may use it as its step.
  copy = jax.tree.map(jnp.copy, run.state)
  planned, metrics = plan["compiled"](run.state, batch)
  reference, _ = compiled(copy, batch)
  assert int(planned.step) == 1 and np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(planned), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(a, b)
  run.checkpointer.close()


@pytest.mark.parametrize("path", [TINY_CONFIG, GAN_CONFIG, VAE_CONFIG, DIFFUSION_CONFIG])
def test_batch_spec_matches_the_familys_real_batch(path):
  cfg = config_from_file(path)
  family = load_family(cfg.family).Family(cfg, None)
  real = next(family.train_data)
  spec = plan_lib.batch_spec(family, cfg)
  assert spec.keys() == real.keys()
  for key, value in real.items():
    assert (spec[key].shape, spec[key].dtype) == (value.shape, value.dtype), key


def test_a_plan_over_a_too_small_device_is_refused_with_its_figures(tiny_config):
  prepare_config(tiny_config)
  plan = plan_lib.plan_memory(tiny_config, mesh_lib.make_mesh(tiny_config.mesh),
                              compile_step=False)
  needed = plan["total_bytes"]
  assert not plan["complete"] and needed == plan["state_bytes"] + plan["batch_bytes"]
  with pytest.raises(UserError) as info:
    plan_lib.check_fits(plan, FakeDevice(limit=needed + 1000, in_use=2000))
  message = str(info.value)
  assert f"{needed:,} bytes" in message and f"{needed - 1000:,} bytes" in message
  assert "mesh.fsdp" in message and "train.batch_size" in message and "remat" in message
  plan_lib.check_fits(plan, FakeDevice(limit=needed + 1000))  # fits exactly: no error
  # Once the state is on the device, its bytes are in bytes_in_use: counted once.
  resident = plan["state_bytes"]
  plan_lib.check_fits(plan, FakeDevice(limit=needed, in_use=resident), resident=resident)
  with pytest.raises(UserError, match=f"needs {_gib_text(needed - resident)} more"):
    plan_lib.check_fits(plan, FakeDevice(limit=needed - 1, in_use=resident),
                        resident=resident)
  plan_lib.check_fits(plan, FakeDevice(limit=None))  # a CPU: nothing to check
  with pytest.raises(UserError, match="needs"):
    plan_lib.preflight(tiny_config, mesh_lib.make_mesh(tiny_config.mesh),
                       mesh_lib.rules_from_config(tiny_config.mesh), None,
                       devices=[FakeDevice(limit=needed // 2)])


def test_fits_compares_with_the_usable_share_of_an_accelerator():
  plan = {"total_bytes": 20 * plan_lib.GiB}
  assert not plan_lib.fits(plan, "v5e") and plan_lib.fits(plan, "h100")
  edge = {"total_bytes": plan_lib.usable_bytes("v4")}
  assert plan_lib.fits(edge, "v4") and plan_lib.usable_bytes("v4") < 32 * plan_lib.GiB
  assert not plan_lib.fits({"total_bytes": edge["total_bytes"] + 1}, "v4")
  with pytest.raises(UserError, match="unknown accelerator 'h900'"):
    plan_lib.fits(plan, "h900")


def test_an_unknown_familys_batch_names_the_fix():
  class Outside:
    name = "diffusion"

  with pytest.raises(UserError, match="batch_spec"):
    plan_lib.batch_spec(Outside(), config_from_file(TINY_CONFIG))


@pytest.mark.slow
def test_llama_8b_on_64_fake_devices_plans_its_fsdp_shard(tmp_path):
  out = tmp_path / "plan.json"
  code = "import sys; from benchmarks.plan import main; main(sys.argv[1:])"
  proc = run_python(code, timeout=1800, args=[
      "--config", str(ROOT / "configs" / "lm_llama_8b.py"), "--mesh", "data=1,fsdp=64,tensor=1",
      "--json", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert plan["devices"] == 64 and plan["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  assert plan["params"] == pytest.approx(8.03e9, rel=1e-3)
  # float32 parameters + AdamW's two float32 moments: 12 bytes a parameter, split 64 ways.
  per_device = plan["param_bytes"] + plan["optimizer_bytes"]
  assert per_device == pytest.approx(plan["params"] * 12 / 64, rel=0.01)
  assert plan["complete"] and plan["temp_bytes"] > 0
  assert plan["total_bytes"] == (plan["argument_bytes"] + plan["output_bytes"]
                                 - plan["alias_bytes"] + plan["temp_bytes"]
                                 + plan["code_bytes"])
  assert set(plan["accelerators"]) == {"h100", "h200", "v5e", "v5p"}


def test_a_run_that_cannot_fit_the_accelerator_stops_before_its_state_is_allocated(
    tiny_config, tmp_path, monkeypatch):
  from aigc_jax.train import loop
  small = FakeDevice(limit=100_000)  # the tiny LM's state alone needs ~1.2 MB
  check = plan_lib.check_fits
  monkeypatch.setattr(plan_lib, "reports_memory", lambda mesh: True)
  monkeypatch.setattr(plan_lib, "check_fits", lambda plan, device=None, **kw: check(
      plan, small, **kw))
  allocated = []
  monkeypatch.setattr(loop.ShardedInit, "state", lambda self: allocated.append(1))
  with pytest.raises(UserError, match=r"needs .* per device .* but FakeDevice\(id=0\) has .* "
                                      r"free: split the state over more devices"):
    loop.open_run(tiny_config, str(tmp_path), for_training=True)
  assert not allocated
