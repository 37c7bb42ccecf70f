"""XLA:CPU settings that make aigc_jax's steps faster. Opt-in: entry points (the
`aigc-jax` CLI, `benchmarks.*`, the test suite) call `apply_fast_cpu_flags()` before JAX
starts a backend; importing aigc_jax changes nothing (set AIGC_JAX_KEEP_XLA_FLAGS=1 to keep
the entry points from touching XLA_FLAGS).

- `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: XLA's own (Eigen)
  convolutions instead of YNNPACK's, which are slower for the DCGAN and classifier shapes
  (DCGAN step at 28x28, batch 64: 163 ms -> 111 ms on 2 cores, jaxlib 0.10.2).

Only for jaxlib versions where the flag was checked to exist: XLA aborts on an unknown flag.
"""

from __future__ import annotations

import importlib.metadata
import os

FAST_CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
CHECKED_JAXLIB_MINOR = ((0, 10),)
OPT_OUT_ENV = "AIGC_JAX_KEEP_XLA_FLAGS"


def _jaxlib_minor() -> tuple[int, int] | None:
  try:
    major, minor = importlib.metadata.version("jaxlib").split(".")[:2]
    return int(major), int(minor)
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def apply_fast_cpu_flags() -> list[str]:
  """Appends FAST_CPU_FLAGS the user has not set to $XLA_FLAGS; returns those added (none
  once a JAX backend exists, on unchecked jaxlib versions, or when opted out)."""
  if os.environ.get(OPT_OUT_ENV) or _jaxlib_minor() not in CHECKED_JAXLIB_MINOR:
    return []
  import sys
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      return []
  current = os.environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in FAST_CPU_FLAGS.items()
           if f"--{name}" not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
