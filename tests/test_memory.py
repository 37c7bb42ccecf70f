"""Host memory settings for CPU steps (aigc_jax/train/memory.py): the restart with glibc
tunables, and the compiled step's temporaries kept mapped between calls."""

import json
import platform
import textwrap

import pytest

from aigc_jax.train import memory
from tests.conftest import TINY_CONFIG, run_cli, run_python

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings exist for glibc on Linux only")
NO_MALLOC_ENV = {"GLIBC_TUNABLES": "", memory.OPT_OUT_ENV: "", "AIGC_JAX_MALLOC_REEXEC": ""}

REEXEC = textwrap.dedent("""
    import os
    print("start", os.getpid(), flush=True)
    from aigc_jax.train.memory import reexec_with_malloc_tunables
    reexec_with_malloc_tunables()
    print("tunables", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
""")


def _lines(out: str, word: str) -> list[list[str]]:
  return [line.split()[1:] for line in out.splitlines() if line.startswith(word)]


@glibc_only
def test_restart_adds_the_tunables_once_and_keeps_the_users_own():
  out = run_python(REEXEC, env_extra=dict(NO_MALLOC_ENV,
                                           GLIBC_TUNABLES="glibc.malloc.mmap_max=7"))
  assert out.returncode == 0, out.stderr
  starts, (tunables,) = _lines(out.stdout, "start"), _lines(out.stdout, "tunables")
  assert len(starts) == 2 and starts[0][0] == starts[1][0] == tunables[0]  # same process
  values = dict(item.split("=") for item in tunables[1].split(":"))
  assert values == {**memory.MALLOC_TUNABLES, "glibc.malloc.mmap_max": "7"}


@glibc_only
def test_opting_out_leaves_malloc_alone():
  out = run_python(REEXEC, env_extra=dict(NO_MALLOC_ENV, **{memory.OPT_OUT_ENV: "1"}))
  assert out.returncode == 0, out.stderr
  assert len(_lines(out.stdout, "start")) == 1
  assert _lines(out.stdout, "tunables") == [[out.stdout.split()[1]]]  # none set


# A compiled function whose [8192, N] float32 product is an XLA temporary (above glibc's
# largest mmap threshold, 32 MiB); prints its size and the median page faults per call.
FAULTS = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp
    from aigc_jax.train import memory
    kept = sys.argv[1] == "keep" and memory.keep_step_memory()
    x, w = jnp.ones((8192, 16)) * 0.01, jnp.ones((16, int(sys.argv[2])))
    f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(axis=0) + (x @ w).max(axis=0)).lower(
        x, w).compile()
    # Steady state: every pool thread that may run the call has used its malloc arena
    # once, and the median call ignores the odd one that lands on a fresh arena.
    for _ in range(10):
      f(x, w).block_until_ready()
    per_call = []
    for _ in range(20):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x, w).block_until_ready()
      per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(per_call)[len(per_call) // 2]
    print(json.dumps({"kept": kept, "faults": faults,
                      "pages": f.memory_analysis().temp_size_in_bytes / 4096}))
""")


def _faults(mode: str, columns: int, tunables: str = "") -> dict:
  env = dict(NO_MALLOC_ENV, GLIBC_TUNABLES=tunables)
  out = run_python(FAULTS, env_extra=env, args=(mode, str(columns)))
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.splitlines()[-1])


@glibc_only
def test_kept_step_memory_is_not_faulted_in_at_every_call():
  # 48 MiB: by default glibc maps the temporary afresh at every call and every page
  # faults again; keep_step_memory() (at run time) keeps it in the heap (~10x fewer
  # faults measured: the thread heaps still give some pages back).
  default, kept = _faults("default", 1536), _faults("keep", 1536)
  assert 32 * 2 ** 20 / 4096 < default["pages"] < 64 * 2 ** 20 / 4096
  assert kept["kept"] and not default["kept"]
  assert default["faults"] > default["pages"] / 2, (default, kept)
  assert kept["faults"] < default["pages"] / 5, (default, kept)


@glibc_only
def test_the_restart_tunables_keep_temporaries_beyond_a_heap():
  # 96 MiB: more than a thread's malloc heap (64 MiB) holds, so only the tunables the
  # restart sets (huge pages, no trimming) keep the faults down.
  tunables = ":".join(f"{k}={v}" for k, v in memory.MALLOC_TUNABLES.items())
  default, tuned = _faults("default", 3072), _faults("default", 3072, tunables)
  assert default["faults"] > default["pages"] / 2, (default, tuned)
  assert tuned["faults"] < default["pages"] / 20, (default, tuned)


@glibc_only
def test_cli_training_runs_with_the_tunables(tmp_path):
  # A config file runs inside the training process: it records the process's tunables.
  seen = tmp_path / "tunables.txt"
  config = tmp_path / "config.py"
  config.write_text(textwrap.dedent(f"""
      import os, runpy
      open({str(seen)!r}, "w").write(os.environ.get("GLIBC_TUNABLES", ""))
      get_config = runpy.run_path({TINY_CONFIG!r})["get_config"]
  """))
  out = run_cli("train", "--config", str(config), "--workdir", str(tmp_path / "run"),
                "--config.train.steps=2", "--config.train.eval_every=2",
                "--config.sample.num=0", env_extra=NO_MALLOC_ENV)
  assert out.returncode == 0, out.stderr
  values = dict(item.split("=") for item in seen.read_text().split(":"))
  assert values == memory.MALLOC_TUNABLES
