"""A step folder emptied by hand: a training run moves it aside, resumes from the step
before and saves that step again (bit-identical to a run that was never damaged); a
read-only command falls back without moving anything."""

import os
import shutil

import numpy as np

from aigc_jax.config import config_from_file
from tests.conftest import TINY_CONFIG, run_cli
from tests.test_train import _final_params

# A constant learning rate, so that a run of 20 steps continued to 30 takes the steps of a
# run of 30 (the schedule's length is train.steps).
FLAGS = ["--config.train.checkpoint_every=10", "--config.train.eval_every=1000",
         "--config.train.log_every=5", "--config.sample.num=0",
         "--config.optim.warmup_steps=0", "--config.optim.min_lr_ratio=1.0"]


def _train(workdir, steps):
  return run_cli("train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                 f"--config.train.steps={steps}", *FLAGS, timeout=300)


def test_an_emptied_step_folder_is_moved_aside_and_the_resume_is_bit_identical(tmp_path):
  straight, damaged = tmp_path / "straight", tmp_path / "damaged"
  assert _train(straight, 30).returncode == 0
  assert _train(damaged, 20).returncode == 0
  step_20 = damaged / "checkpoints" / "20"
  for entry in os.listdir(step_20):  # rm -rf W/checkpoints/20/*
    path = step_20 / entry
    shutil.rmtree(path) if path.is_dir() else path.unlink()

  # Read-only: evaluates step 10 and leaves the folder where it is.
  result = run_cli("eval", "--workdir", str(damaged), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "step 20" in result.stderr and step_20.is_dir()

  result = _train(damaged, 30)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "moved to 20.damaged" in result.stderr
  assert (damaged / "checkpoints" / "20.damaged").is_dir()
  assert {"20", "30"} <= set(os.listdir(damaged / "checkpoints"))
  cfg = config_from_file(TINY_CONFIG, {"train.steps": 30, "sample.num": 0,
                                       "optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0})
  for a, b in zip(_final_params(str(straight), cfg), _final_params(str(damaged), cfg),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_eval_runs_on_fewer_devices_and_a_resume_may_change_runtime_settings(tmp_path):
  workdir = str(tmp_path)
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                   "--config.train.steps=10", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                   "--config.mesh.num_devices=8", *FLAGS, env_extra=eight, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  # A run pinned to 8 devices (fsdp=8) evaluates on 2.
  two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = run_cli("eval", "--workdir", workdir, env_extra=two, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "evaluating on the 2 device(s) here instead" in result.stderr
  # How the same parameters are computed may change on resume; their shapes may not.
  result = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                   "--config.train.steps=20", "--config.model.attention=einsum",
                   "--config.model.remat_policy=full", *FLAGS, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  result = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                   "--config.train.steps=30", "--config.model.scan_layers=True", *FLAGS,
                   timeout=300)
  assert result.returncode == 2 and "model.scan_layers: False -> True" in result.stderr
