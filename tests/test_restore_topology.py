"""Checkpoints restore onto whatever mesh the current run has: a run saved under one
(data, fsdp, tensor) layout reopens under another with every array bit-identical and laid
out by the new run's shardings, and the checksums that verify it (on-device fingerprints)
do not depend on the layout. Needs 8 devices: `make test-8dev` (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax.config import config_from_file
from aigc_jax.train import checkpoint as checkpoint_lib
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train import train_and_evaluate
from aigc_jax.train.loop import open_run
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.sharded

# Dimensions that split over tensor=2 and fsdp up to 8 (vocab 264 = 8 x 33); one layer
# has every kind of parameter and keeps the compilations short.
TINY = {"model.vocab_size": 264, "model.num_layers": 1, "model.num_heads": 4,
        "model.num_kv_heads": 2, "train.steps": 4, "train.checkpoint_every": 2,
        "train.eval_every": 4, "train.eval_batches": 1, "sample.num": 0}
FSDP8 = {"mesh.data": 1, "mesh.fsdp": 8}
ONE_DEVICE = {"mesh.num_devices": 1, "mesh.data": 1}
DATA2_FSDP4 = {"mesh.data": 2, "mesh.fsdp": 4}
TENSOR2_FSDP4 = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}


def _need_8_devices():
  # Checked when the test runs, not at collection: `make test` (1 device) skips these.
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _config(mesh: dict):
  return config_from_file(TINY_CONFIG, {**TINY, **mesh})


def _host_copy(state) -> dict:
  """{path: numpy copy} of the parameters and optimizer state, one leaf at a time."""
  leaves = jax.tree_util.tree_flatten_with_path({"params": state.params,
                                                 "opt_state": state.opt_state})[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _train_capturing_saves(workdir, mesh: dict, monkeypatch) -> dict:
  """Trains the tiny LM under `mesh`; returns host copies of the state the loop handed
  to the last checkpoint save (what restoring must reproduce, read before any restore)."""
  saved = {}
  original = checkpoint_lib.Checkpointer.save

  def save(self, step, state, data_state, config):
    saved[step] = _host_copy(state)  # before the save: the state is donated afterwards
    return original(self, step, state, data_state, config)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save)
  train_and_evaluate(_config(mesh), str(workdir), progress=False)
  monkeypatch.undo()
  assert sorted(saved) == [2, 4]
  return saved[4]


def _assert_restores_exactly(workdir, mesh: dict, expected: dict) -> None:
  run = open_run(_config(mesh), str(workdir), for_training=False)
  assert run.mesh.shape == {"data": mesh.get("mesh.data", 1), "fsdp": mesh.get("mesh.fsdp", 1),
                            "tensor": mesh.get("mesh.tensor", 1)}
  assert int(jax.device_get(run.state.step)) == 4
  restored = _host_copy(run.state)
  assert restored.keys() == expected.keys()
  for path in expected:
    assert restored[path].dtype == expected[path].dtype, path
    np.testing.assert_array_equal(restored[path], expected[path], err_msg=path, strict=True)
  # Laid out as the new run lays out its state, not as the saving run did.
  shardings = run.state_sharding
  pairs = list(zip(jax.tree.leaves((run.state.params, run.state.opt_state)),
                   jax.tree.leaves((shardings.params, shardings.opt_state)), strict=True))
  for leaf, sharding in pairs:
    assert leaf.sharding == sharding, (leaf.shape, leaf.sharding, sharding)
  split = [leaf for leaf, s in pairs if s.num_devices > 1 and not s.is_fully_replicated]
  assert bool(split) == (run.mesh.size > 1 and mesh.get("mesh.data", 1) < run.mesh.size)
  run.checkpointer.close()


def test_saved_under_fsdp8_restores_on_one_device_and_on_data2_fsdp4(tmp_path, monkeypatch):
  _need_8_devices()
  expected = _train_capturing_saves(tmp_path, FSDP8, monkeypatch)
  _assert_restores_exactly(tmp_path, ONE_DEVICE, expected)
  _assert_restores_exactly(tmp_path, DATA2_FSDP4, expected)


def test_saved_on_one_device_restores_under_tensor2_fsdp4(tmp_path, monkeypatch):
  _need_8_devices()
  expected = _train_capturing_saves(tmp_path, ONE_DEVICE, monkeypatch)
  _assert_restores_exactly(tmp_path, TENSOR2_FSDP4, expected)


def test_fingerprint_is_the_same_under_every_sharding_and_sees_one_bit():
  _need_8_devices()
  host = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
  fsdp8 = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  tensor2 = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  layouts = {
      "one device": jax.device_put(host, jax.devices()[0]),
      "replicated x8": jax.device_put(host, NamedSharding(fsdp8, P())),
      "fsdp=8 rows": jax.device_put(host, NamedSharding(fsdp8, P("fsdp"))),
      "fsdp=8 columns": jax.device_put(host, NamedSharding(fsdp8, P(None, "fsdp"))),
      "tensor=2, fsdp=4": jax.device_put(host, NamedSharding(tensor2, P("fsdp", "tensor"))),
      "fsdp=4, tensor=2": jax.device_put(host, NamedSharding(tensor2, P("tensor", "fsdp"))),
  }
  assert layouts["fsdp=8 rows"].addressable_shards[0].data.shape == (8, 48)  # really split
  sums = {name: checkpoint_lib.fingerprint(x) for name, x in layouts.items()}
  assert len(set(sums.values())) == 1, sums
  flipped = host.view(np.uint32).copy()
  flipped[37, 11] ^= 1 << 3
  flipped = jnp.asarray(flipped.view(np.float32))
  for mesh, spec in ((fsdp8, P("fsdp")), (tensor2, P("fsdp", "tensor"))):
    changed = checkpoint_lib.fingerprint(jax.device_put(flipped, NamedSharding(mesh, spec)))
    assert changed != sums["one device"], spec
  # One tree over meshes with the devices in another order (one jit cannot take both).
  reversed_mesh = Mesh(np.array(jax.devices()[::-1]).reshape(1, 8, 1), mesh_lib.MESH_AXES)
  tree = [layouts["fsdp=8 rows"], jax.device_put(host, NamedSharding(reversed_mesh, P("fsdp"))),
          layouts["one device"], host]
  assert checkpoint_lib.fingerprints(tree) == [sums["one device"]] * 4
