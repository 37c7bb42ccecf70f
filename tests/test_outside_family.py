"""A family defined outside aigc_jax (tests/outside_family.py, named by dotted path)
trains, checkpoints, resumes bit-identically and evaluates through our loop and CLI."""

import json
import re

import jax
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.train import family as family_lib
from aigc_jax.train.loop import open_run, prepare_config
from tests import outside_family
from tests.conftest import DIFFUSION_CONFIG, GAN_CONFIG, TINY_CONFIG, VAE_CONFIG, run_cli

CONFIG = """
from tests.outside_family import default_config

def get_config():
  return default_config()
"""


def test_outside_family_follows_the_protocol(tmp_path):
  module = family_lib.load_family("tests.outside_family")
  assert module is outside_family
  family = module.Family(module.default_config(), str(tmp_path))
  assert isinstance(family, family_lib.Family)
  assert isinstance(family.train_data, family_lib.BatchSource)
  state = jax.jit(family.init_state)(jax.random.PRNGKey(0))
  new_state, metrics = jax.jit(family.train_step)(state, next(family.train_data))
  assert int(new_state.step) == 1 and set(metrics) >= {"loss", "grad_norm", "lr", "accuracy"}


@pytest.mark.parametrize("path", [TINY_CONFIG, GAN_CONFIG, VAE_CONFIG, DIFFUSION_CONFIG])
def test_built_in_families_follow_the_same_protocol(path):
  config = config_from_file(path)
  family = family_lib.load_family(config.family).Family(config, None)
  assert isinstance(family, family_lib.Family)
  assert isinstance(family.train_data, family_lib.BatchSource)


def _final_params(workdir):
  cfg = config_from_file(str(workdir / "config.py"))
  run = open_run(cfg, str(workdir), for_training=False)
  return int(run.state.step), [np.asarray(x) for x in jax.tree.leaves(run.state.params)]


def test_outside_family_trains_resumes_and_evaluates_through_the_cli(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir in (straight, resumed):
    workdir.mkdir()
    (workdir / "config.py").write_text(CONFIG)
  runs = [(straight, 60), (resumed, 30), (resumed, 60)]  # 30 steps, then resume to 60
  for workdir, steps in runs:
    proc = run_cli("train", "--config", str(workdir / "config.py"), "--workdir",
                   str(workdir), f"--config.train.steps={steps}")
    assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert summary["start_step"] == 30 and summary["steps"] == 60

  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == 60
  for a, b in zip(params_a, params_b, strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical

  proc = run_cli("eval", "--workdir", str(straight))
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads(proc.stdout.strip().splitlines()[-1])
  # 60 Adam steps of a 32-unit MLP: far above chance (0.1) on held-out digits.
  assert metrics["step"] == 60 and metrics["accuracy"] > 0.85, metrics
  records = [json.loads(line) for line in open(straight / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[-1] < 0.5 * losses[0], losses

  proc = run_cli("sample", "--workdir", str(straight))
  assert proc.returncode == 0, proc.stderr[-3000:]
  pairs = [p.split("/") for p in proc.stdout.split()]
  assert len(pairs) == 32 and sum(p == t for p, t in pairs) > 24


@pytest.mark.parametrize("family, message", [
    ("tests.no_such_family", "no module 'tests.no_such_family' can be imported"),
    ("tests.conftest", "is not a model family: it lacks default_config, validate, Family"),
    ("lmm", "unknown family 'lmm' (did you mean 'lm'?)"),
    ("", "must be a family name or a dotted module path"),
    (".lm", "must be a family name or a dotted module path"),
])
def test_bad_family_names_the_problem(family, message):
  with pytest.raises(UserError, match=re.escape(message)):
    family_lib.load_family(family)


def test_cli_reports_a_family_that_cannot_be_imported(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(CONFIG + "\n_get = get_config\n"
                    "def get_config():\n  c = _get()\n  c.family = 'nowhere.family'\n"
                    "  return c\n")
  proc = run_cli("train", "--config", str(config), "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config 'family' 'nowhere.family': no module 'nowhere' can be imported; check "
      "the dotted path and that its package is on PYTHONPATH")


def test_a_family_whose_own_import_fails_keeps_its_error(tmp_path, monkeypatch):
  package = tmp_path / "user_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "family_v2.py").write_text("import user_pkg.family_helpers  # missing\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError, match="user_pkg.family_helpers"):
    family_lib.load_family("user_pkg.family_v2")  # a bug in the family, not a bad path


def test_a_family_module_given_to_the_loop_must_be_the_one_the_config_names():
  config = outside_family.default_config()
  assert prepare_config(config, outside_family) is outside_family
  config.family = "lm"
  with pytest.raises(UserError, match="set config.family = 'tests.outside_family'"):
    prepare_config(config, outside_family)
