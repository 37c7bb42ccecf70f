"""CLI inputs a user can get wrong, in real processes with real files: each ends as one
`error:` line naming the problem and the fix, exit status 2, no traceback. Prompts that are
not UTF-8, `sample --num` below 1, config files that fail to import or give no config,
`--distributed` with no cluster or a coordinator that never answers (bounded, not a hang),
and `sample` on a run directory it cannot write (`--out` instead; no compilation-cache
noise)."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from tests.conftest import GAN_CONFIG, ROOT, TINY_CONFIG, VAE_CONFIG, run_cli


def _one_error(proc, *expected: str) -> str:
  """The single `error:` line of a failed run (status 2, no traceback), containing each of
  `expected`."""
  stderr = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
  assert proc.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, stderr[-3000:]
  for part in expected:
    assert part in lines[0], (part, lines[0])
  return lines[0]


def _train(tmp_path_factory, name: str, config: str, *overrides: str) -> str:
  workdir = str(tmp_path_factory.mktemp(name) / "run")
  proc = run_cli("train", "--config", config, "--workdir", workdir, *overrides, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  return _train(tmp_path_factory, "lm", TINY_CONFIG, "--config.train.steps=4",
                "--config.train.eval_every=4", "--config.sample.num=0")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
  return _train(tmp_path_factory, "gan", GAN_CONFIG)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  return _train(tmp_path_factory, "vae", VAE_CONFIG)


# --- sample: prompts, --num, options --------------------------------------------------
def test_a_prompt_that_is_not_utf8_names_the_byte(lm_run):
  # Bytes in argv, as a shell passes $'ab\xff\xfe': Python decodes them as surrogates.
  argv = [os.fsencode(sys.executable), b"-m", b"aigc_jax.cli", b"sample", b"--workdir",
          os.fsencode(lm_run), b"--prompt", b"ab\xff\xfe"]
  proc = subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  _one_error(proc, "--prompt is not valid UTF-8 (byte 0xff at offset 2): pass UTF-8 text")


@pytest.mark.parametrize("num", ["0", "-3"])
def test_sample_num_below_1_is_refused(gan_run, vae_run, num):
  for workdir in (gan_run, vae_run):
    proc = run_cli("sample", "--workdir", workdir, "--num", num)
    _one_error(proc, f"--num must be at least 1, got {num}")


def test_sample_without_num_draws_the_configs_number_and_text_options_are_refused(gan_run):
  proc = run_cli("sample", "--workdir", gan_run, "--seed", "0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote 16 samples to" in proc.stdout  # gan_tiny's sample.num
  # A GAN draws images: a sampling setting for text would be silently ignored.
  proc = run_cli("sample", "--workdir", gan_run, "--prompt", "x", "--top-k", "3")
  _one_error(proc, "--prompt, --top-k do not apply to a gan run", "drop them")


def test_seed_out_of_range_is_refused(gan_run):
  _one_error(run_cli("sample", "--workdir", gan_run, "--seed", "-1"),
             "--seed must be in [0, 2**32), got -1")


def test_vae_sample_of_one_image_to_out(vae_run, tmp_path):
  out = tmp_path / "pics" / "vae.png"  # the folder is created
  proc = run_cli("sample", "--workdir", vae_run, "--num", "1", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("samples", "reconstructions", "interpolation"):
    assert Image.open(tmp_path / "pics" / f"vae_{name}.png").size[0] > 0
  assert not [f for f in os.listdir(tmp_path / "pics") if ".tmp" in f]  # renamed, none left
  _one_error(run_cli("sample", "--workdir", vae_run, "--out", str(tmp_path / "a.jpg")),
             "--out must name a .png file")


def test_lm_out_writes_the_text_there(lm_run, tmp_path):
  out = tmp_path / "samples.txt"
  proc = run_cli("sample", "--workdir", lm_run, "--prompt", "def ", "--num", "2",
                 "--max-new-tokens", "4", "--out", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == f"wrote samples to {out}"
  assert out.read_text().count("=== sample") == 2
  proc = run_cli("sample", "--workdir", lm_run, "--num", "1", "--max-new-tokens", "4", "--out",
                 str(tmp_path / "no" / "such" / "dir.txt"))
  _one_error(proc, "cannot write --out", "No such file or directory")


# --- sample on a run directory it cannot write ----------------------------------------
def test_sample_on_a_run_it_cannot_write_asks_for_out(gan_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(gan_run, workdir)
  shutil.rmtree(workdir / "samples")
  shutil.rmtree(workdir / "jax_cache", ignore_errors=True)
  if os.geteuid() != 0:
    subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
    reason = "Permission denied"
  else:
    # Root writes through chmod: a file where the folders belong fails for root too (the
    # kernel's own EEXIST), the same path through the code as an unwritable run.
    (workdir / "samples").write_text("")
    (workdir / "jax_cache").write_text("")
    reason = "File exists"
  try:
    proc = run_cli("sample", "--workdir", str(workdir), "--num", "4")
    _one_error(proc, f"cannot write {workdir / 'samples'} ({reason}): pass --out PATH")
    assert "compilation cache" not in proc.stderr, proc.stderr[-3000:]

    out = tmp_path / "grid.png"
    proc = run_cli("sample", "--workdir", str(workdir), "--num", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"wrote 4 samples to {out}"
    assert Image.open(out).size[0] > 0
    assert "compilation cache" not in proc.stderr and "jax_cache" not in proc.stderr
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)


# --- config files that give no config -------------------------------------------------
BAD_CONFIGS = {
    "syntax": ("def get_config(:\n  pass\n", "SyntaxError at line 1", "fix the file"),
    "import": ("import os\nimport no_such_module_for_aigc\n",
               "ModuleNotFoundError at line 2: No module named 'no_such_module_for_aigc'",
               "fix the file"),
    "name": ("x = 1\ny = undefined_name\n",
             "NameError at line 2: name 'undefined_name' is not defined", "fix the file"),
    "raises": ("def get_config():\n  raise RuntimeError('no data for\\nthis')\n",
               "get_config() raised RuntimeError at line 2: no data for this",
               "fix get_config()"),
    "none": ("def get_config():\n  pass\n", "get_config() returned None",
             "return an ml_collections.ConfigDict"),
    "list": ("def get_config():\n  return [1]\n", "get_config() returned list",
             "return an ml_collections.ConfigDict"),
    "no_get_config": ("CONFIG = {}\n", "it defines no get_config()", "add `def get_config():`"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_a_config_file_that_gives_no_config(tmp_path, kind):
  source, problem, fix = BAD_CONFIGS[kind]
  path = tmp_path / f"{kind}.py"
  path.write_text(source)
  proc = run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"),
                 "--config.train.steps=2")
  _one_error(proc, f"cannot load --config {path}: {problem}", fix)
  assert not (tmp_path / "run").exists()


def test_a_missing_config_file(tmp_path):
  proc = run_cli("train", "--config", str(tmp_path / "none.py"), "--workdir",
                 str(tmp_path / "run"))
  _one_error(proc, f"cannot load --config {tmp_path / 'none.py'} (No such file or directory)")


def test_a_config_file_returning_a_plain_dict_is_converted(tmp_path):
  path = tmp_path / "as_dict.py"
  path.write_text(f"import runpy\n\ndef get_config():\n"
                  f"  return runpy.run_path({TINY_CONFIG!r})['get_config']().to_dict()\n")
  proc = run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"),
                 "--config.train.steps=2", "--config.train.eval_every=2",
                 "--config.sample.num=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '"steps": 2' in proc.stdout


# --- --distributed --------------------------------------------------------------------
def _no_cluster_env() -> dict:
  """This environment without the variables JAX reads to find a cluster."""
  prefixes = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_",
              "TPU_", "MEGASCALE_", "CLOUD_TPU")
  env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
  return dict(env, PYTHONPATH=str(ROOT))


def _cli(*args, timeout):
  return subprocess.run([sys.executable, "-m", "aigc_jax.cli", *args], capture_output=True,
                        text=True, cwd=ROOT, env=_no_cluster_env(), timeout=timeout)


def test_distributed_without_a_cluster(tmp_path):
  proc = _cli("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
              "--distributed", timeout=120)
  _one_error(proc, "--distributed cannot start (coordinator_address should be defined)",
             "pass --coordinator_address, --num_processes, --process_id")
  proc = _cli("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
              "--distributed_timeout", "5", timeout=120)
  _one_error(proc, "--distributed_timeout set without --distributed: add --distributed")


def test_distributed_with_a_coordinator_that_never_answers_gives_up_in_time(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  proc = _cli("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
              "--distributed", "--coordinator_address", f"127.0.0.1:{port}",
              "--num_processes", "2", "--process_id", "1", "--distributed_timeout", "5",
              timeout=120)
  _one_error(proc, "not every process joined within 5 s", f"127.0.0.1:{port}",
             "raise --distributed_timeout")
  assert time.monotonic() - start < 60
