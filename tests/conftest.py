"""Strict JAX settings for every test, and shared helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigc_jax.xla_flags import apply_fast_cpu_flags

# The test process runs the programs the CLI runs (aigc_jax itself changes no setting on
# import; entry points opt in), before JAX starts a backend.
apply_fast_cpu_flags()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "lm_tiny.py")
MUSIC_CONFIG = str(ROOT / "configs" / "music_tiny.py")
GAN_CONFIG = str(ROOT / "configs" / "gan_tiny.py")
VAE_CONFIG = str(ROOT / "configs" / "vae_tiny.py")
DIFFUSION_CONFIG = str(ROOT / "configs" / "diffusion_tiny.py")
DIT_CONFIG = str(ROOT / "configs" / "diffusion_dit_tiny.py")


@pytest.fixture
def tiny_config():
  from aigc_jax.config import config_from_file
  return config_from_file(TINY_CONFIG)


def run_cli(*args, env_extra=None, timeout=600):
  """Runs `aigc-jax ARGS` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ, **(env_extra or {}))
  env.setdefault("PYTHONPATH", str(ROOT))
  return subprocess.run([sys.executable, "-m", "aigc_jax.cli", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout)


def run_python(code: str, env_extra=None, timeout=600, args=()):
  """Runs `python -c CODE ARGS` in a fresh process from the repository root."""
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=timeout)
