"""Verified checkpoints: bytes flipped on disk are caught by the recorded checksums, and
restore falls back to the newest good checkpoint instead of returning wrong values."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.train.checkpoint import Checkpointer


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
