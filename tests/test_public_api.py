"""The public API: every exported name is documented, every module has a docstring, and
the package ships its type marker."""

import importlib
import inspect
import pkgutil

import pytest

import aigc_jax
from tests.conftest import ROOT

PACKAGES = ("aigc_jax", "aigc_jax.nn", "aigc_jax.models", "aigc_jax.train")


def _public_members(cls):
  for name, member in vars(cls).items():
    if name.startswith("_"):
      continue
    if isinstance(member, (staticmethod, classmethod)):
      member = member.__func__
    if isinstance(member, property):
      member = member.fget
    if inspect.isfunction(member):
      yield name, member


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_and_its_public_methods_have_docstrings(package):
  module = importlib.import_module(package)
  undocumented = []
  for name in module.__all__:
    value = getattr(module, name)
    if inspect.ismodule(value):
      continue  # modules are checked below
    if not (inspect.getdoc(value) or "").strip():
      undocumented.append(name)
    if inspect.isclass(value) and value.__module__.startswith("aigc_jax"):
      undocumented += [f"{name}.{m}" for m, f in _public_members(value)
                       if not (f.__doc__ or "").strip()]
  assert undocumented == [], f"{package}: undocumented {undocumented}"


def test_every_module_has_a_docstring():
  missing = [info.name for info in pkgutil.walk_packages(aigc_jax.__path__, "aigc_jax.")
             if not (importlib.import_module(info.name).__doc__ or "").strip()]
  assert missing == []


def test_the_package_is_typed():
  assert (ROOT / "aigc_jax" / "py.typed").exists()
  assert 'aigc_jax = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
