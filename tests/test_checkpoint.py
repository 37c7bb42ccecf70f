"""Verified checkpoints: bytes flipped on disk are caught by the recorded checksums, and
restore falls back to the newest good checkpoint instead of returning wrong values.
Checksums are on-device fingerprints; checkpoints from before them (CRC-32 of host bytes,
no algorithm tag) still verify. Fingerprints across meshes: tests/test_restore_topology.py."""

import json
import pathlib
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.train.checkpoint import (
  ALGORITHM,
  FINGERPRINT_V1,
  Checkpointer,
  fingerprint,
  fingerprints,
)
from aigc_jax.train.state import TrainState


def _state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(128, 128)), jnp.float32),
          "step": jnp.asarray(seed, jnp.int32)}


def _save_steps(directory, steps) -> Checkpointer:
  ckpt = Checkpointer(str(directory), keep=5, async_save=False)
  for step in steps:
    ckpt.save(step, _state(step), {"position": step}, {"seed": 0})
  ckpt.wait()
  return ckpt


def _flip_bytes(directory, step: int, count: int = 64) -> None:
  """Inverts `count` bytes in the middle of the largest file of that step's state."""
  files = [p for p in (pathlib.Path(directory) / str(step) / "state").rglob("*") if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  target.write_bytes(bytes(data))


def _tamper_checksum(directory, step: int) -> None:
  """Changes the recorded checksum of "w": what a silently corrupted array looks like."""
  path = pathlib.Path(directory) / str(step) / "checksums" / "metadata"
  sums = json.loads(path.read_text())
  sums["['w']"] ^= 1
  path.write_text(json.dumps(sums))


def _assert_restores_step(checkpointer: Checkpointer, expected: int) -> None:
  state, data, step = checkpointer.restore(_state(0))
  assert step == expected and data == {"position": expected}
  np.testing.assert_array_equal(state["w"], _state(expected)["w"])


def test_a_good_checkpoint_restores_exactly(tmp_path):
  _assert_restores_step(_save_steps(tmp_path, [1, 2]), 2)


def test_flipped_bytes_on_disk_fall_back_to_the_previous_checkpoint(tmp_path, capsys):
  # Depending on where the bytes land, Orbax fails to read the file or (as measured
  # upstream) restores wrong values silently; either way step 1 must come back exactly.
  ckpt = _save_steps(tmp_path, [1, 2])
  _flip_bytes(tmp_path, 2)
  _assert_restores_step(Checkpointer(str(tmp_path), keep=5), 1)
  assert "checkpoint at step 2" in capsys.readouterr().err
  ckpt.close()


def test_a_checksum_mismatch_is_moved_aside_and_falls_back(tmp_path, capsys):
  ckpt = _save_steps(tmp_path, [1, 2])
  _tamper_checksum(tmp_path, 2)
  _assert_restores_step(Checkpointer(str(tmp_path), keep=5), 1)
  warning = capsys.readouterr().err
  assert "checkpoint at step 2" in warning and "checksum mismatch" in warning
  # The damaged step is kept aside, and training can save that step again.
  assert (tmp_path / "2.damaged").is_dir()
  again = Checkpointer(str(tmp_path), keep=5, async_save=False)
  assert again.all_steps() == [1]
  again.save(2, _state(2), {"position": 2}, {"seed": 0})
  again.wait()
  _assert_restores_step(again, 2)
  ckpt.close()


def test_no_good_checkpoint_is_one_clear_error(tmp_path):
  _save_steps(tmp_path, [1, 2]).close()
  _flip_bytes(tmp_path, 1)
  _flip_bytes(tmp_path, 2)
  with pytest.raises(UserError, match=r"no usable checkpoint.*step 2: .*step 1: "):
    Checkpointer(str(tmp_path), keep=5).restore(_state(0))


DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint32, np.int8, np.uint8,
          np.bool_]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fingerprint_sees_one_flipped_bit_and_moved_elements(dtype):
  rng = np.random.default_rng(0)
  values = rng.normal(size=(8, 33)) * 50
  host = values > 0 if dtype is np.bool_ else values.astype(dtype)
  base = fingerprint(jnp.asarray(host))
  assert fingerprint(host) == base == fingerprint(jnp.asarray(host.copy()))
  bits = host.view(f"u{host.itemsize}").copy()
  for flat in (0, 137, bits.size - 1):  # first, middle and last element
    flipped = bits.copy()
    flipped.flat[flat] ^= 1 << (flat % (8 * host.itemsize) if dtype != np.bool_ else 0)
    assert fingerprint(jnp.asarray(flipped.view(dtype))) != base, flat
  other = int(np.flatnonzero(bits.ravel() != bits.ravel()[0])[0])
  swapped = host.copy().ravel()
  swapped[[0, other]] = swapped[[other, 0]]  # same values elsewhere: the index is hashed
  assert fingerprint(jnp.asarray(swapped.reshape(host.shape))) != base


def test_fingerprints_are_per_leaf_and_64_bit():
  tree = {"a": jnp.arange(10, dtype=jnp.float32), "b": jnp.zeros((3, 4), jnp.bfloat16),
          "key": jax.random.key(0), "scalar": jnp.int32(7)}
  sums = fingerprints(tree)
  assert len(sums) == 4 and len(set(sums)) == 4
  assert all(0 <= s < 2**64 for s in sums) and max(sums) >= 2**32
  assert sums[0] == fingerprint(tree["a"])


def _checksums_file(directory, step: int) -> pathlib.Path:
  return pathlib.Path(directory) / str(step) / "checksums" / "metadata"


def test_checksums_record_the_algorithm_and_each_arrays_fingerprint(tmp_path):
  _save_steps(tmp_path, [1]).close()
  sums = json.loads(_checksums_file(tmp_path, 1).read_text())
  assert sums[ALGORITHM] == FINGERPRINT_V1
  assert sums["['w']"] == fingerprint(_state(1)["w"])
  assert sums["['step']"] == fingerprint(_state(1)["step"])


def _make_legacy(directory, step: int, state, tamper: bool = False) -> None:
  """Rewrites a step's checksums as aigc_jax wrote them before fingerprints (the code of
  then, copied): CRC-32 of each array's host bytes and one over the frozen arrays, no
  algorithm tag. `tamper`: the array checksums off by one bit."""
  path = _checksums_file(directory, step)
  sums = json.loads(path.read_text())
  del sums[ALGORITHM]
  saved = state.replace(frozen={}) if isinstance(state, TrainState) else state
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(saved))
  sums.update({jax.tree_util.keystr(p): zlib.crc32(np.ascontiguousarray(leaf).tobytes())
               ^ int(tamper) for p, leaf in leaves})
  if isinstance(state, TrainState):
    crc = 0
    for leaf in jax.tree.leaves(state.frozen):
      crc = zlib.crc32(np.ascontiguousarray(jax.device_get(leaf)), crc)
    sums["<frozen>"] = crc
  path.write_text(json.dumps(sums))


def test_a_checkpoint_from_before_fingerprints_verifies_by_crc32(tmp_path, capsys):
  ckpt = _save_steps(tmp_path, [1, 2, 3])
  _make_legacy(tmp_path, 3, _state(3))
  _assert_restores_step(Checkpointer(str(tmp_path), keep=5), 3)
  # Its CRC-32s are checked, not skipped: a wrong one is a mismatch, as before.
  _make_legacy(tmp_path, 2, _state(2), tamper=True)
  with pytest.raises(UserError, match="step 2: checksum mismatch"):
    Checkpointer(str(tmp_path), keep=5).restore(_state(0), step=2)
  assert (tmp_path / "2.damaged").is_dir()
  ckpt.close()


def test_an_unknown_checksum_algorithm_is_one_clear_error(tmp_path):
  ckpt = _save_steps(tmp_path, [1, 2])
  path = _checksums_file(tmp_path, 2)
  path.write_text(json.dumps({**json.loads(path.read_text()), ALGORITHM: "fingerprint-v9"}))
  with pytest.raises(UserError, match=r"'fingerprint-v9'.*upgrade aigc_jax"):
    Checkpointer(str(tmp_path), keep=5).restore(_state(0))
  # Neither moved aside nor skipped for step 1: training on would bury the newer step.
  assert (tmp_path / "2").is_dir() and not (tmp_path / "2.damaged").exists()
  ckpt.close()


def _train_state(frozen_seed: int) -> TrainState:
  rng = np.random.default_rng(frozen_seed)
  frozen = {"base": {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)}}
  return TrainState(step=jnp.int32(1), params={"lora": jnp.ones((8, 2))},
                    opt_state={"mu": jnp.zeros((8, 2))}, rng=jnp.zeros(2, jnp.uint32),
                    frozen=frozen)


@pytest.mark.parametrize("legacy", [False, True], ids=["fingerprint", "legacy-crc32"])
def test_restoring_onto_other_frozen_weights_is_refused(tmp_path, legacy):
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
  ckpt.save(1, _train_state(0), {"position": 1}, {"seed": 0})
  ckpt.close()
  if legacy:
    _make_legacy(tmp_path, 1, _train_state(0))
  restored, _, _ = Checkpointer(str(tmp_path)).restore(_train_state(0))
  np.testing.assert_array_equal(restored.frozen["base"]["w"], _train_state(0).frozen["base"]["w"])
  with pytest.raises(UserError, match="trained on other frozen"):
    Checkpointer(str(tmp_path)).restore(_train_state(1))
