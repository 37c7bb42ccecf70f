"""Lazy package exports (PEP 562): a name's module is imported on first use, so importing a
package costs nothing beyond the package itself (no JAX, Orbax or tqdm until needed)."""

from __future__ import annotations

import importlib
import importlib.util


def lazy_exports(package: str, exports: dict[str, str]):
  """(__getattr__, __dir__, __all__) for `package`, whose names in `exports` (name -> module
  path) load their module the first time they are looked up; so do its submodules
  (`aigc_jax.train.mesh` after `import aigc_jax`)."""

  def __getattr__(name: str):
    module = exports.get(name)
    if module is not None:
      value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"{package}.{name}") is not None:
      value = importlib.import_module(f"{package}.{name}")  # a subpackage or module
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    globals_of_package = importlib.import_module(package).__dict__
    globals_of_package[name] = value  # later lookups skip __getattr__
    return value

  def __dir__() -> list[str]:
    return sorted(set(importlib.import_module(package).__dict__) | set(exports))

  return __getattr__, __dir__, sorted(exports)
