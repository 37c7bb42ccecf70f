"""Importing aigc_jax changes nothing in the host process, and its names load lazily."""

import json

from tests.conftest import run_python

# Prints the third-party top-level modules that importing every aigc_jax module loads.
LIST_DEPENDENCIES = """
import importlib, importlib.util, json, pkgutil, sys
import aigc_jax
before = set(sys.modules)
for info in pkgutil.walk_packages(aigc_jax.__path__, "aigc_jax."):
  importlib.import_module(info.name)
tops = {name.split(".")[0] for name in set(sys.modules) - before}

def importable(name):
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # entries of extension modules (cython_runtime)
    return False

print(json.dumps(sorted(t for t in tops - set(sys.stdlib_module_names)
                        if t != "aigc_jax" and not t.startswith("_") and importable(t))))
"""

# Imports those third-party modules first (their own import-time settings are theirs),
# then every aigc_jax module, and reports what changed.
CHECK = """
import importlib, json, logging, os, pkgutil, signal, sys
# absl.logging and orbax.checkpoint install logging handlers when imported: the libraries'
# own doing, the same for a host that uses them.
for name in ["absl.logging", "absl.flags", "orbax.checkpoint", *json.loads(sys.argv[1])]:
  importlib.import_module(name)

def snapshot():
  loggers = [logging.getLogger()] + [logging.getLogger(n) for n in
                                     logging.root.manager.loggerDict]
  loggers = [l for l in loggers if isinstance(l, logging.Logger)]
  return {"environ": dict(os.environ),
          "handlers": {l.name: [id(h) for h in l.handlers] for l in loggers if l.handlers},
          "levels": {l.name: l.level for l in loggers if l.level},
          "signals": {s.name: id(signal.getsignal(s)) for s in signal.valid_signals()
                      if isinstance(s, signal.Signals)},
          "hooks": {"unraisablehook": id(sys.unraisablehook), "excepthook": id(sys.excepthook),
                    "displayhook": id(sys.displayhook)}}

before = snapshot()
import aigc_jax
for info in pkgutil.walk_packages(aigc_jax.__path__, "aigc_jax."):
  importlib.import_module(info.name)
after = snapshot()
changed = {key: sorted(name for name in set(before[key]) | set(after[key])
                       if before[key].get(name) != after[key].get(name))
           for key in before}
print(json.dumps({key: names for key, names in changed.items() if names}))
"""

# The models alone, in a fresh process: which of the training/CLI libraries they load.
MODELS = """
import json, sys
import aigc_jax.models.transformer, aigc_jax.models.gan, aigc_jax.models.vae
import aigc_jax.models.sampling, aigc_jax.nn
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules}
                        & {"orbax", "tqdm", "ml_collections", "tensorboardX", "torch",
                           "matplotlib"})))
"""

LAZY = """
import json, sys, time
t = time.perf_counter()
import aigc_jax
package = time.perf_counter() - t
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax", "orbax", "tqdm"})
t = time.perf_counter()
import aigc_jax.models.transformer
models = time.perf_counter() - t
import aigc_jax.train.checkpoint as checkpoint  # the subpackage, not a function
print(json.dumps({"loaded": loaded, "package_s": package, "models_s": models,
                  "mesh": aigc_jax.train.mesh.__name__, "checkpoint": checkpoint.__name__,
                  "Checkpointer": aigc_jax.Checkpointer.__module__,
                  "train": type(aigc_jax.train).__name__}))
"""


def _last_json(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_module_changes_nothing_in_the_process():
  dependencies = _last_json(run_python(LIST_DEPENDENCIES))
  assert "jax" in dependencies and "orbax" in dependencies
  result = _last_json(run_python(CHECK, args=[json.dumps(dependencies)]))
  assert result == {}, result  # names of what changed: environment variables, loggers, ...


def test_models_import_no_training_or_cli_libraries():
  assert _last_json(run_python(MODELS)) == []


def test_package_names_load_lazily_and_the_train_subpackage_is_not_shadowed():
  result = _last_json(run_python(LAZY))
  assert result["loaded"] == [], result  # `import aigc_jax` imports no JAX
  assert result["mesh"] == "aigc_jax.train.mesh"
  assert result["checkpoint"] == "aigc_jax.train.checkpoint"
  assert result["Checkpointer"] == "aigc_jax.train.checkpoint"
  assert result["train"] == "module"
  print(f"import aigc_jax: {result['package_s'] * 1e3:.1f} ms; "
        f"aigc_jax.models.transformer: {result['models_s']:.2f} s")
