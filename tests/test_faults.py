"""Fault injection with real processes, real signals and real write failures: a run killed
with SIGKILL at an arbitrary moment (saves every 2 steps, so often mid-save) and restarted
with the same command ends bit-identical to an uninterrupted run; a save that cannot be
written (the file-size limit standing in for a full disk) is one clear error and the
previous checkpoint stays usable; SIGTERM to one process of a multi-process run stops every
process after the same step."""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.train import Checkpointer
from tests.conftest import (
    DIFFUSION_CONFIG,
    GAN_CONFIG,
    MUSIC_CONFIG,
    ROOT,
    TINY_CONFIG,
    VAE_CONFIG,
)
from tests.test_train import _final_params

STEPS, EVERY = 40, 2
TRAIN = """
import json, sys
from aigc_jax.config import config_from_file
from aigc_jax.train import train_and_evaluate
workdir, path, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
train_and_evaluate(config_from_file(path, overrides), workdir, progress=False)
"""
CASES = [pytest.param(TINY_CONFIG, {"model.dropout": 0.1, "sample.num": 0}, id="lm"),
         pytest.param(GAN_CONFIG, {"fid.samples": 0}, id="gan", marks=pytest.mark.slow),
         pytest.param(VAE_CONFIG, {"iwae.k": 0, "iwae.final_k": 0}, id="vae",
                      marks=pytest.mark.slow),
         pytest.param(DIFFUSION_CONFIG, {"fid.samples": 0}, id="diffusion",
                      marks=pytest.mark.slow),
         pytest.param(MUSIC_CONFIG, {"music.eval_samples": 0, "music.eval_max_new_tokens": 0,
                                     "sample.num": 0}, id="music", marks=pytest.mark.slow)]


def _start(workdir: str, config: str, overrides: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", TRAIN, workdir, config, json.dumps(overrides)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _finish(workdir: str, config: str, overrides: dict) -> None:
  proc = _start(workdir, config, overrides)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("config, overrides", CASES)
def test_sigkill_at_any_moment_then_rerun_is_bit_identical(tmp_path, config, overrides):
  overrides = {"train.steps": STEPS, "train.checkpoint_every": EVERY, "train.eval_every": 1000,
               "train.log_every": 10, "train.keep_checkpoints": 2, **overrides}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _finish(straight, config, overrides)

  proc = _start(killed, config, overrides)
  checkpoints = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # wait for training to be underway
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    steps = [int(d) for d in names if d.isdigit()]
    if steps and max(steps) >= 10:
      break
    time.sleep(0.005)
  time.sleep(np.random.default_rng().uniform(0.0, 0.3))  # an arbitrary moment after that
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = Checkpointer(checkpoints).latest_step()
  assert killed_at is not None and killed_at < STEPS

  _finish(killed, config, overrides)  # the same command again resumes and finishes
  cfg = config_from_file(config, overrides)
  for x, y in zip(_final_params(straight, cfg), _final_params(killed, cfg), strict=True):
    np.testing.assert_array_equal(x, y)


def _limit_file_size(max_bytes: int):
  """preexec_fn: files may not grow past max_bytes, and writes beyond it fail with EFBIG
  instead of killing the process — what a full disk looks like to the writer."""
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  return apply


def test_a_failed_save_surfaces_and_the_previous_checkpoint_stays_usable(tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "aigc_jax.cli", "train", "--config", TINY_CONFIG,
          "--workdir", workdir, "--config.sample.num=0", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=100"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda steps, **kw: subprocess.run([*args, f"--config.train.steps={steps}"],
                                           capture_output=True, text=True, cwd=ROOT, env=env,
                                           timeout=600, **kw)
  first = run(4)
  assert first.returncode == 0, first.stderr[-3000:]
  # A checkpoint's data files are ~100-400 kB here: the next save cannot be written.
  full = run(8, preexec_fn=_limit_file_size(50_000))
  assert full.returncode == 2, full.stderr[-3000:]
  # One error line from aigc_jax; Orbax's writer threads do not repeat the failure, and
  # nothing prints a traceback (no --verbose).
  error = "error: writing the checkpoint of step 8"
  lines = [line for line in full.stderr.splitlines() if line.startswith(error)]
  assert len(lines) == 1 and full.stderr.count(error) == 1, full.stderr[-3000:]
  assert "the checkpoint of step 4 is intact" in lines[0]
  assert "Traceback" not in full.stderr and "orbax" not in full.stderr.replace(
      "orbax-checkpoint-tmp", ""), full.stderr[-3000:]
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 4

  resumed = run(8)  # space again: the same command resumes from step 4
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.loads(resumed.stdout)["start_step"] == 4
  assert Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [4, 8]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_processes(workdir: str, steps: int, num: int = 2) -> list[subprocess.Popen]:
  """A run of `num` processes (one CPU device each) through the CLI's --distributed."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # one device per process
  return [subprocess.Popen(
      [sys.executable, "-m", "aigc_jax.cli", "train", "--config", TINY_CONFIG, "--workdir",
       workdir, "--distributed", f"--coordinator_address=localhost:{port}",
       f"--num_processes={num}", f"--process_id={i}", f"--config.train.steps={steps}",
       "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000",
       "--config.train.log_every=1", "--config.sample.num=0", "--config.model.dropout=0.1"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(num)]


def _communicate(procs) -> list[tuple[int, str]]:
  """(exit status, stderr) of each process, once it has ended."""
  errors = [p.communicate(timeout=600)[1] for p in procs]
  return [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]


def test_sigterm_to_one_process_of_a_multi_process_run_stops_all_at_one_step(tmp_path):
  """SIGTERM reaches one process of two: JAX's preemption sync point makes both
  checkpoint the same step and exit 75; the same commands resume, and the result is
  bit-identical to an uninterrupted two-process run."""
  steps = 60  # ~10 steps/s: the signal comes at step 3, the stop a few steps later
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  procs = _start_processes(stopped, steps)
  metrics = os.path.join(stopped, "metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 3):
    assert all(p.poll() is None for p in procs) and time.time() < deadline, \
        [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  results = _communicate(procs)
  assert [code for code, _ in results] == [75, 75], [err[-2000:] for _, err in results]
  stopped_at = {int(re.search(r"at step (\d+)", err).group(1)) for _, err in results}
  assert len(stopped_at) == 1, stopped_at  # the same step on both
  step = stopped_at.pop()
  assert 3 <= step < steps and Checkpointer(stopped + "/checkpoints").latest_step() == step

  resumed = _communicate(_start_processes(stopped, steps))
  assert [code for code, _ in resumed] == [0, 0], [err[-2000:] for _, err in resumed]
  assert [code for code, _ in _communicate(_start_processes(straight, steps))] == [0, 0]
  cfg = config_from_file(TINY_CONFIG, {"train.steps": steps, "model.dropout": 0.1})
  for x, y in zip(_final_params(straight, cfg), _final_params(stopped, cfg), strict=True):
    np.testing.assert_array_equal(x, y)
