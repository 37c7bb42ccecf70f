"""Damaged or changed run files, with real processes and real files: a corrupt or
hand-edited config.json, a checkpoint item removed, a training corpus changed under a
run, a workdir the reader cannot write, a checkpoint rotated away under a reader, a
Ctrl-C while a resumed run starts, a batch that cannot fit in memory. Each ends in a
working command or one error line (exit 2), never a traceback, a hang or a checkpoint
wrongly moved aside."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.train import Checkpointer
from tests.conftest import ROOT, TINY_CONFIG, run_cli
from tests.test_train import _final_params

# A constant learning rate, so that a run of 10 steps continued to 20 takes the steps of
# a run of 20 (the schedule's length is train.steps).
FLAGS = ["--config.train.checkpoint_every=10", "--config.train.eval_every=1000",
         "--config.train.log_every=5", "--config.sample.num=0",
         "--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0"]
OVERRIDES = {"sample.num": 0, "optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0}


def _train(workdir, steps, *extra, timeout=300):
  return run_cli("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                 f"--config.train.steps={steps}", *FLAGS, *extra, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def _one_error(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  return line


def _assert_same_params(workdir_a, workdir_b, steps):
  cfg = config_from_file(TINY_CONFIG, {"train.steps": steps, **OVERRIDES})
  for a, b in zip(_final_params(str(workdir_a), cfg), _final_params(str(workdir_b), cfg),
                  strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A run trained 10 steps (checkpoint 10) and one trained straight to 20."""
  root = tmp_path_factory.mktemp("runs")
  for name, steps in (("ten", 10), ("straight", 20)):
    result = _train(root / name, steps)
    assert result.returncode == 0, result.stderr[-3000:]
  return root


def _copy(runs, tmp_path, name="ten"):
  target = tmp_path / name
  shutil.copytree(runs / name, target, ignore=shutil.ignore_patterns(".lock"))
  return target


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "removed"])
def test_a_corrupt_config_json_falls_back_to_the_checkpoints_copy(runs, tmp_path, damage):
  workdir = _copy(runs, tmp_path)
  config_json = workdir / "config.json"
  if damage == "truncated":  # a crash or a full disk mid-write by hand or by a tool
    config_json.write_bytes(config_json.read_bytes()[:100])
  elif damage == "overwritten":  # e.g. another tool's config.json written over the run's
    config_json.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  else:
    config_json.unlink()

  evaluated = run_cli("eval", "--workdir", str(workdir), timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads(evaluated.stdout)["step"] == 10
  warnings = [line for line in evaluated.stderr.splitlines() if "config.json" in line]
  assert len(warnings) == 1 and "using the copy of the config saved with the checkpoint of " \
      "step 10" in warnings[0], evaluated.stderr[-3000:]
  assert "Traceback" not in evaluated.stderr

  resumed = _train(workdir, 20)  # rewrites config.json; bit-identical to a straight run
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.loads(config_json.read_text())["family"] == "lm"
  _assert_same_params(runs / "straight", workdir, 20)


def test_a_corrupt_config_json_without_any_checkpoint_copy_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  line = _one_error(run_cli("eval", "--workdir", str(tmp_path), timeout=120))
  assert "config.json is not valid JSON" in line and "no checkpoint holds a copy" in line


def test_a_hand_edited_config_json_is_named_and_no_checkpoint_is_called_damaged(runs,
                                                                                tmp_path):
  workdir = _copy(runs, tmp_path)
  config_json = workdir / "config.json"
  edited = json.loads(config_json.read_text())
  edited["model"]["embed_dim"] = 32
  config_json.write_text(json.dumps(edited))
  line = _one_error(run_cli("eval", "--workdir", str(workdir), timeout=300))
  assert "differs from the config saved with the checkpoint of step 10" in line, line
  assert "model.embed_dim: 64 -> 32" in line and "delete config.json" in line, line
  # A training run whose config matches the edited config.json is refused by the
  # checkpoint's own copy, before anything is moved.
  line = _one_error(_train(workdir, 20, "--config.model.embed_dim=32"))
  assert "model.embed_dim: 64 -> 32" in line and "step 10's checkpoint" in line, line
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  config_json.unlink()  # the fix the message gives
  assert run_cli("eval", "--workdir", str(workdir), timeout=300).returncode == 0


def test_a_removed_checksums_item_is_damage_not_an_older_version(runs, tmp_path):
  workdir = _copy(runs, tmp_path)
  _train(workdir, 20)  # checkpoints 10 and 20
  shutil.rmtree(workdir / "checkpoints" / "20" / "checksums")
  evaluated = run_cli("eval", "--workdir", str(workdir), timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads(evaluated.stdout)["step"] == 10  # never the unverified step 20
  assert "item checksums listed in its metadata missing" in evaluated.stderr
  assert "older aigc_jax" not in evaluated.stderr
  resumed = _train(workdir, 20)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "moved to 20.damaged" in resumed.stderr
  _assert_same_params(runs / "straight", workdir, 20)


def _write_corpus(path, seed):
  words = np.random.default_rng(seed).choice(["alpha", "beta", "gamma", "delta", "(x)",
                                              "return", "def", "\n"], size=6000)
  path.write_text(" ".join(words))


def test_a_changed_training_corpus_stops_the_resume_a_moved_one_does_not(tmp_path):
  corpus, moved = tmp_path / "corpus.txt", tmp_path / "moved.txt"
  _write_corpus(corpus, 0)
  workdir = tmp_path / "run"
  text = ["--config.data.name=text", f"--config.data.path={corpus}",
          "--config.data.limit_files=0"]
  assert _train(workdir, 10, *text).returncode == 0

  shutil.copy(corpus, moved)  # the same data elsewhere: the fingerprint agrees
  _write_corpus(corpus, 1)  # same path, other text
  line = _one_error(_train(workdir, 20, *text))
  assert "the training data differ from the data the run" in line, line
  assert "then: blake2b" in line and "now: blake2b" in line, line
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [10]

  resumed = _train(workdir, 20, *text[:1], f"--config.data.path={moved}", text[2])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.loads(resumed.stdout)["start_step"] == 10


def test_a_run_saved_with_data_settings_refused_since_still_loads_and_resumes():
  """A run saved before unread data settings were refused (the tiny config's limit_files
  with data.name='text') loads as what it was; a resume that clears the setting, or names
  the corpus's encoding, builds the same run."""
  from aigc_jax.config import complete_config
  from aigc_jax.families import lm
  from aigc_jax.train.loop import fixed_differences
  saved = config_from_file(TINY_CONFIG, {"data.name": "text", "data.path": TINY_CONFIG})
  assert saved.data.limit_files == 40  # as such runs were saved
  loaded = complete_config(saved.to_dict())
  lm.validate(loaded)  # eval and sample of the old run
  assert loaded.data.limit_files == 0
  resumed = config_from_file(TINY_CONFIG, {"data.name": "text", "data.path": TINY_CONFIG,
                                           "data.limit_files": 0, "data.encoding": "latin-1"})
  assert fixed_differences(loaded, resumed) == []
  changed = config_from_file(TINY_CONFIG, {"data.name": "text", "data.path": TINY_CONFIG,
                                           "data.limit_files": 0, "data.seq_len": 16})
  assert fixed_differences(loaded, changed) == ["data.seq_len: 32 -> 16"]


def _read_only(path):
  """Makes `path` unwritable for this process: a read-only bind mount onto itself as
  root (whom permissions do not stop), the write bits removed otherwise. Returns an undo
  function."""
  if os.geteuid() != 0:
    modes = {p: os.stat(p).st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
      os.chmod(p, modes[p] & ~0o222)
    return lambda: [os.chmod(p, mode) for p, mode in reversed(list(modes.items()))]
  bound = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
  if bound.returncode != 0:
    pytest.skip(f"cannot make a read-only folder as root here: {bound.stderr.decode()}")
  subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
  return lambda: subprocess.run(["umount", str(path)], check=True)


def test_eval_and_sample_run_on_a_workdir_they_cannot_write(runs, tmp_path):
  workdir = _copy(runs, tmp_path)
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  undo = _read_only(workdir)
  try:
    with pytest.raises(OSError):
      (workdir / "probe").write_text("x")
    evaluated = run_cli("eval", "--workdir", str(workdir), timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["step"] == 10
    sampled = run_cli("sample", "--workdir", str(workdir), "--num", "1",
                      "--max-new-tokens", "8", timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert "=== sample 0 ===" in sampled.stdout
    for result in (evaluated, sampled):
      assert "Traceback" not in result.stderr and "warning" not in result.stderr.lower()
  finally:
    undo()
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_samples_that_cannot_be_written_stop_the_run_after_its_checkpoint(runs, tmp_path):
  workdir = _copy(runs, tmp_path)
  shutil.rmtree(workdir / "samples", ignore_errors=True)
  (workdir / "samples").write_text("")  # a file where the folder goes: a real OSError
  line = _one_error(run_cli("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                            "--config.train.steps=20", "--config.sample.num=1",
                            *[f for f in FLAGS if "sample.num" not in f], timeout=300))
  assert f"cannot write the samples of step 20 to {workdir / 'samples'}" in line, line
  assert "the checkpoint of step 20 is saved" in line, line
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == 20


def _params(value):
  return {"params": {"w": jnp.full((4, 3), value, jnp.float32)}, "step": jnp.int32(value)}


def test_a_reader_that_loses_a_race_with_checkpoint_rotation_reads_the_newest(tmp_path):
  """A reader lists steps 1 and 2, the training run then saves 3 and 4 and rotates 1 and
  2 away (keep=2): the reader restores step 4, reporting no damage."""
  writer = Checkpointer(str(tmp_path), keep=2, async_save=False)
  for step in (1, 2):
    writer.save(step, _params(step), {"next_index": step, "seed": 0}, {})
  reader = Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == [1, 2]
  for step in (3, 4):
    writer.save(step, _params(step), {"next_index": step, "seed": 0}, {})
  writer.close()
  assert reader.all_steps() == [1, 2]  # its listing is stale
  state, data, step = reader.restore(_params(0))
  assert step == 4 and int(state["step"]) == 4 and data["next_index"] == 4


def test_ctrl_c_while_a_resumed_run_starts_never_crashes_and_the_resume_is_exact(runs,
                                                                                 tmp_path):
  """SIGINT at several moments of a resume's start-up (flags, JAX's start, restore,
  compile): one line and exit 75 every time (was: a segmentation fault, or a Ctrl-C that
  a JAX callback swallowed and the run carried on); the next run resumes exactly. eval
  interrupted ends at once with 130."""
  workdir = _copy(runs, tmp_path)
  args = [sys.executable, "-m", "aigc_jax.cli", "train", "--config", TINY_CONFIG,
          "--workdir", str(workdir), "--config.train.steps=20", *FLAGS]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  for delay in (0.3, 1.0, 2.0, 3.5, 5.0):
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    if '"steps": 20' in stdout:  # the run had finished: the signal came as it exited
      assert delay > 1.0 and Checkpointer(str(workdir / "checkpoints")).latest_step() == 20
      break
    assert proc.returncode == 75, (delay, proc.returncode, stderr[-3000:])
    assert ("preempted: stopped by SIGINT during start-up" in stderr
            or "preempted: stopped by SIGINT at step 1" in stderr), stderr[-3000:]
  # A second Ctrl-C while the run starts ends it at once (nothing to wait for).
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  # 75: the first ended it already; 130: the second ended it at once, while it started or
  # exited; -SIGINT: the second came in Python's last teardown, after its handlers are
  # gone (a shell reports that as 130 too).
  assert proc.returncode in (75, 130, -signal.SIGINT), stderr[-3000:]
  if proc.returncode == 130:
    assert ("interrupted again while starting: stopped at once" in stderr
            or "interrupted while exiting" in stderr), stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  proc = subprocess.Popen([sys.executable, "-m", "aigc_jax.cli", "eval", "--workdir",
                           str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130 and stderr.strip() == ("interrupted: nothing of the run "
                                                       "was changed"), stderr[-3000:]
  resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _assert_same_params(runs / "straight", workdir, 20)


def test_a_batch_that_cannot_fit_in_memory_is_one_line_before_it_runs(tmp_path):
  """~650 GB of logits: refused from the compiled program's memory analysis against the
  host's available memory, before an allocation is tried (was: RESOURCE_EXHAUSTED after
  27 s, with a traceback)."""
  result = run_cli("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path),
                   "--config.train.batch_size=8192", "--config.data.seq_len=1024",
                   "--config.train.steps=2", "--config.sample.num=0", timeout=300)
  line = _one_error(result)
  assert "in host memory" in line and "this host has" in line, line
  assert "lower train.batch_size" in line
  assert not os.path.exists(tmp_path / "checkpoints" / "0")
