"""Fault injection with real processes and real signals: a run killed with SIGKILL at an
arbitrary moment (saves every 2 steps, so often mid-save) and restarted with the same
command ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.train import Checkpointer
from tests.conftest import GAN_CONFIG, ROOT, TINY_CONFIG, VAE_CONFIG
from tests.test_train import _final_params

STEPS, EVERY = 120, 2
TRAIN = """
import json, sys
from aigc_jax.config import config_from_file
from aigc_jax.train import train
workdir, path, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
train(config_from_file(path, overrides), workdir, progress=False)
"""
CASES = [pytest.param(TINY_CONFIG, {"model.dropout": 0.1, "sample.num": 0}, id="lm"),
         pytest.param(GAN_CONFIG, {"fid.samples": 0}, id="gan", marks=pytest.mark.slow),
         pytest.param(VAE_CONFIG, {"iwae.k": 0, "iwae.final_k": 0}, id="vae",
                      marks=pytest.mark.slow)]


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
