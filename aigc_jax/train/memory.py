"""Host memory: keeping the step's working memory mapped between steps, and giving freed
memory back to the operating system between phases.

XLA:CPU allocates a compiled step's temporaries (51 MB for the LM at nanoGPT's shape,
1.5 GB at width 384) afresh at every call. glibc serves allocations above its mmap
threshold (at most 32 MB) with a fresh `mmap`, and returns a freed arena top above its
trim threshold, so every step touched new zero pages: 13,000 page faults and ~36 ms of
kernel time per nanoGPT-shape step (65 ms in all), 430,000 faults and ~1 s per width-384
step. With mmap off and the trim threshold raised the heap keeps those pages: the
nanoGPT-shape step takes ~48 ms. Transparent huge pages for malloc's memory
(`glibc.malloc.hugetlb`, only settable before the process starts) take the width-384
step from ~2.9 s to ~2.5 s. `keep_step_memory()` sets what can be set at run time;
`reexec_with_malloc_tunables()` restarts an entry point (the CLI, the benchmarks) once
with all of it in `GLIBC_TUNABLES`. AIGC_JAX_KEEP_MALLOC=1 leaves malloc alone.

The kept memory is given back where it is no longer needed: glibc also keeps freed
megabyte-sized blocks after a model's weights are loaded, replaced or compiled (0.7 GB
for SmolLM2-135M's load); `release_free_memory()` (`malloc_trim`) returns them, and the
training loop calls it between phases, never inside the step loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

OPT_OUT_ENV = "AIGC_JAX_KEEP_MALLOC"
_REEXEC_MARKER = "AIGC_JAX_MALLOC_REEXEC"  # never restart twice (e.g. tunables stripped)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int
# Every allocation from the heap, freed memory kept, THP for it (glibc >= 2.35; glibc
# ignores tunables it does not know).
MALLOC_TUNABLES = {"glibc.malloc.mmap_max": "0",
                   "glibc.malloc.trim_threshold": str(_TRIM_THRESHOLD),
                   "glibc.malloc.hugetlb": "1"}


@functools.cache
def _libc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None  # macOS, musl: their allocators are left alone
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None


def _opted_out() -> bool:
  return bool(os.environ.get(OPT_OUT_ENV))


def keep_step_memory() -> bool:
  """Makes glibc serve large blocks from the heap and keep freed ones, so a compiled
  step's temporaries are not mapped afresh at every call; True when set."""
  libc = _libc()
  if libc is None or _opted_out():
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
      libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _missing_tunables(current: str) -> list[str]:
  set_names = {item.split("=", 1)[0] for item in current.split(":") if item}
  return [f"{k}={v}" for k, v in MALLOC_TUNABLES.items() if k not in set_names]


def reexec_with_malloc_tunables() -> None:
  """Restarts this process (same interpreter, same command line, same PID) with
  MALLOC_TUNABLES added to GLIBC_TUNABLES, unless they are there already, the user set
  them, glibc is absent or AIGC_JAX_KEEP_MALLOC is set. Call it first thing in an entry
  point: nothing that ran before it survives."""
  if _libc() is None or _opted_out() or os.environ.get(_REEXEC_MARKER):
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  missing = _missing_tunables(current)
  if not missing:
    return
  os.environ["GLIBC_TUNABLES"] = ":".join([current, *missing] if current else missing)
  os.environ[_REEXEC_MARKER] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@functools.cache
def _malloc_trim():
  libc = _libc()
  return None if libc is None else getattr(libc, "malloc_trim", None)


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (glibc only; a no-op elsewhere)."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
