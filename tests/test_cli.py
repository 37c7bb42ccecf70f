"""The CLI end to end, in fresh processes: train, resume, sample, eval, and clear errors."""

import json

import pytest

from tests.conftest import TINY_CONFIG, run_cli, run_python


@pytest.mark.sharded
def test_train_resume_sample_eval(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                  "--config.train.steps=10", "--config.sample.num=0")
  assert first.returncode == 0, first.stderr[-3000:]
  assert json.loads(first.stdout)["start_step"] == 0

  resumed = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                    "--config.train.steps=20")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout)
  assert summary["start_step"] == 10 and summary["steps"] == 20

  sample = run_cli("sample", "--workdir", workdir, "--prompt", "import ", "--prompt", "class ",
                   "--num", "2", "--max-new-tokens", "12", "--temperature", "0.7",
                   "--top-k", "20", "--top-p", "0.9", "--seed", "3")
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert sample.stdout.count("=== sample") == 4
  assert "import " in sample.stdout and "class " in sample.stdout

  evaluation = run_cli("eval", "--workdir", workdir)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  metrics = json.loads(evaluation.stdout.strip().splitlines()[-1])
  assert metrics["step"] == 20
  assert metrics["val_loss"] == summary["val_loss"]
  assert {"val_bits_per_byte", "val_perplexity"} <= set(metrics)


def test_user_errors_are_one_line_with_status_2(tmp_path):
  cases = [
      (["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "a"),
        "--config.model.num_layer=3"], "num_layers"),
      (["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "b"),
        "--config.model.num_heads=0"], "'model.num_heads' must be positive"),
      (["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "c"),
        "--config.data.name=text", "--config.data.path=/no/such/corpus"], "does not exist"),
      (["train", "--config", "configs/none.py", "--workdir", str(tmp_path / "d")],
       "cannot load --config"),
      (["eval", "--workdir", str(tmp_path / "missing")], "no config.json"),
      (["train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "e"),
        "--num_processes=2"], "--num_processes set without --distributed"),
  ]
  for args, message in cases:
    proc = run_cli(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert message in proc.stderr, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr


def test_sigterm_checkpoints_the_current_step_and_exits_75(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time

  from aigc_jax.train import Checkpointer
  from tests.conftest import ROOT

  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "aigc_jax.cli", "train", "--config", TINY_CONFIG, "--workdir",
       str(workdir), "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
       "--config.train.eval_every=100000", "--config.sample.num=0"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 75, stderr[-2000:]
  assert "preempted: stopped by SIGTERM at step" in stderr
  step = int(stderr.split("at step ")[1].split(";")[0])
  assert step >= 10 and Checkpointer(str(workdir / "checkpoints")).latest_step() == step

  resumed = run_cli("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                    f"--config.train.steps={step + 2}", "--config.train.checkpoint_every=100000",
                    "--config.train.eval_every=100000", "--config.sample.num=0")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert json.loads(resumed.stdout)["start_step"] == step


UNRAISABLE = """
from aigc_jax import cli
cli._quiet_background_failures()

class Finalizer:
  def __del__(self):
    raise ValueError("a host's own failure in __del__")

Finalizer()  # its __del__ raises: an unraisable exception
"""


def test_the_cli_keeps_other_unraisable_exceptions_visible():
  """The CLI hides only Orbax's write-callback noise after a failed save (tests/
  test_faults.py); any other exception raised where it cannot propagate still prints."""
  proc = run_python(UNRAISABLE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ValueError: a host's own failure in __del__" in proc.stderr
