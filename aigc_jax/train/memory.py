"""Giving freed host memory back to the operating system.

glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed,
so after a model's weights are loaded, replaced or compiled, many freed megabyte-sized
blocks stay in the heap and count in the process's RSS (0.7 GB for SmolLM2-135M's
load). `malloc_trim` returns them; the training loop calls it between phases, never
inside the step loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  try:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
    return None


def release_free_memory() -> None:
  """Returns the heap's free pages to the OS (glibc only; a no-op elsewhere)."""
  trim = _malloc_trim()
  if trim is not None:
    trim(0)
