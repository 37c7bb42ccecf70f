"""Export faults: `aigc-jax export` never writes into a run folder nor over files it did not
write, and is all or nothing: a process killed (SIGKILL) while re-exporting leaves the
previous export complete and loadable; the loader names an interrupted export."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aigc_jax.errors import UserError
from tests.conftest import ROOT, run_cli

pytest.importorskip("safetensors", reason="export tests write HF checkpoints (dev extra)")

from aigc_jax.pretrained import hf  # noqa: E402
from aigc_jax.pretrained.hf import EXPORT_MARKER, check_export_target, load_hf  # noqa: E402
from aigc_jax.train import train_and_evaluate  # noqa: E402
from tests.test_finetune import _config  # noqa: E402
from tests.tiny_llama import write_tiny_hf  # noqa: E402

# Imports the CLI with the file writer slowed: after the weights of the new export are
# written it touches SENTINEL and sleeps, so the test can kill it there.
SLOW_EXPORT = """
import sys, time
from aigc_jax import cli
from aigc_jax.pretrained import hf
sentinel, argv = sys.argv[1], sys.argv[2:]
write = hf._write_file
def slow_write(path, writer):
  write(path, writer)
  if path.endswith("model.safetensors"):
    open(sentinel, "w").close()
    time.sleep(600)
hf._write_file = slow_write
cli.main(["aigc-jax", *argv])
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A finished 2-step LoRA fine-tune of configs/ft_tiny.py on the tiny HF checkpoint."""
  pretrained = tmp_path_factory.mktemp("pretrained")
  write_tiny_hf(pretrained)
  run = tmp_path_factory.mktemp("runs") / "sft"
  config = _config(str(pretrained), **{"train.steps": 2, "train.eval_at_start": False,
                                       "train.eval_every": 2, "train.checkpoint_every": 2,
                                       "data.max_eval_examples": 8})
  train_and_evaluate(config, str(run), progress=False)
  return run


def _export(workdir, out, *extra):
  return run_cli("export", "--workdir", str(workdir), "--out", str(out), *extra)


def _digest(folder) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.iterdir())}


def _siblings(out) -> list[str]:
  return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_export_into_a_run_folder_is_refused(workdir):
  config_before = (workdir / "config.json").read_bytes()
  files_before = sorted(p.name for p in workdir.iterdir())
  result = _export(workdir, workdir)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "is the run folder" in lines[0], result.stderr
  assert "choose a new or empty folder for the export" in lines[0]
  assert (workdir / "config.json").read_bytes() == config_before
  assert sorted(p.name for p in workdir.iterdir()) == files_before
  assert _siblings(workdir) == []
  # Into the run's own entries, or into another run's folder, is refused just the same;
  # a new sub-folder of a run is fine.
  with pytest.raises(UserError, match="lies inside the run folder .*'checkpoints'"):
    check_export_target(str(workdir / "checkpoints" / "export"), str(workdir))
  with pytest.raises(UserError, match=r"is the run folder .* \(config.json \+ checkpoints/\)"):
    check_export_target(str(workdir))
  assert check_export_target(str(workdir / "export"), str(workdir)) == str(
      (workdir / "export").resolve())
  with pytest.raises(UserError, match="holds the run folder"):
    check_export_target(str(workdir.parent / "new"), str(workdir.parent / "new" / "run"))
  assert not (workdir / "export").exists()


def test_re_export_replaces_and_a_killed_one_leaves_the_previous(workdir, tmp_path):
  out = tmp_path / "export"
  first = _export(workdir, out)
  assert first.returncode == 0, first.stderr
  marker = json.loads((out / EXPORT_MARKER).read_text())
  assert marker["dtype"] == "float32" and marker["source"]["step"] == 2
  assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if
                                           p.name != EXPORT_MARKER)
  before = _digest(out)
  model, _ = load_hf(str(out))
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  logits = np.asarray(model(tokens))

  # A re-export in bfloat16, killed after writing its weights.
  sentinel = tmp_path / "weights_written"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(
      [sys.executable, "-c", SLOW_EXPORT, str(sentinel), "export", "--workdir", str(workdir),
       "--out", str(out), "--dtype", "bfloat16"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 120
    while not sentinel.exists():
      if proc.poll() is not None:
        pytest.fail(f"the slowed export ended before writing its weights: "
                    f"{proc.communicate()[1]}")
      assert time.monotonic() < deadline, "the slowed export never wrote its weights"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  leftover = out.parent / f"export.tmp-{proc.pid}"
  assert leftover.is_dir() and (leftover / "model.safetensors").is_file()
  # The previous export is untouched, complete and loads; the half-written one is refused.
  assert _digest(out) == before
  model, _ = load_hf(str(out))
  np.testing.assert_array_equal(np.asarray(model(tokens)), logits)
  with pytest.raises(UserError, match=f"is incomplete: {EXPORT_MARKER}.*is missing"):
    load_hf(str(leftover))

  # The next export replaces the previous one whole and removes the dead one's leftover.
  second = _export(workdir, out, "--dtype", "bfloat16")
  assert second.returncode == 0, second.stderr
  assert _siblings(out) == []
  marker = json.loads((out / EXPORT_MARKER).read_text())
  assert marker["dtype"] == "bfloat16"
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert _digest(out)["model.safetensors"] != before["model.safetensors"]
  model, _ = load_hf(str(out))
  np.testing.assert_allclose(np.asarray(model(tokens)), logits, atol=0.1, rtol=0.05)


def test_a_folder_of_other_files_is_not_overwritten(workdir, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  (out / "config.json").write_text('{"mine": true}')
  result = _export(workdir, out)
  assert result.returncode == 2, result.stderr
  assert "did not write" in result.stderr and "delete this one" in result.stderr
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
  assert (out / "config.json").read_text() == '{"mine": true}'
  assert _siblings(out) == []


def _tiny_export(directory):
  write_tiny_hf(directory)
  return directory


def test_loader_names_an_interrupted_export_and_loads_foreign_folders(tmp_path):
  from safetensors.numpy import load_file, save_file

  ours = _tiny_export(tmp_path / "ours")
  (ours / EXPORT_MARKER).unlink()  # our weights, no marker: never finished
  with pytest.raises(UserError, match="export in .* is incomplete.*re-run the export"):
    load_hf(str(ours))
  # A marker naming a file that is not there.
  ours = _tiny_export(tmp_path / "ours2")
  (ours / "tokenizer.json").unlink()
  with pytest.raises(UserError, match="incomplete: tokenizer.json listed in"):
    load_hf(str(ours))
  # A Hugging Face folder (no marker, weights not ours) loads as before.
  foreign = _tiny_export(tmp_path / "foreign")
  (foreign / EXPORT_MARKER).unlink()
  weights = foreign / "model.safetensors"
  save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
  model, tokenizer = load_hf(str(foreign))
  assert tokenizer is not None and model.cfg.num_layers == 2
  # An export does not replace a folder it did not write, even one that loads.
  with pytest.raises(UserError, match="did not write"):
    check_export_target(str(foreign))


def test_a_previous_export_stranded_by_a_kill_is_put_back(tmp_path):
  """Where paths cannot be exchanged atomically, the old export is moved aside before the
  new one moves in; a kill between the two leaves it at OUT.old-<pid>: the loader names
  it, and the next export puts it back before replacing it."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  out = tmp_path / "export"
  stranded = _tiny_export(tmp_path / f"export.old-{dead.pid}")
  with pytest.raises(UserError, match=f"previous complete one at .*export.old-{dead.pid}"):
    load_hf(str(out))
  assert check_export_target(str(out)) == os.path.realpath(out)
  assert not stranded.exists() and (out / EXPORT_MARKER).is_file()
  load_hf(str(out))


def test_replacing_without_an_atomic_exchange(tmp_path, monkeypatch):
  out = _tiny_export(tmp_path / "export")
  first = _digest(out)
  monkeypatch.setattr(hf, "_exchange", lambda a, b: False)
  write_tiny_hf(out, seed=1)
  assert _digest(out)["model.safetensors"] != first["model.safetensors"]
  assert _siblings(out) == []
  load_hf(str(out))
