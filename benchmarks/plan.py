"""Per-device memory of a training run on a mesh, planned on this machine's CPU.

  python -m benchmarks.plan --config configs/lm_llama_8b.py --mesh data=1,fsdp=64,tensor=1
      [--devices N] [--accelerator h100,h200,v5e,v5p] [--set key=value ...]
      [--no-compile] [--json PATH]

Runs on N fake CPU devices (N: --devices, else the product of the mesh's sizes), set
through XLA_FLAGS before JAX starts. Nothing of the model is allocated: the state's
shapes come from `jax.eval_shape`, its bytes per device from its shardings (exact), and
the temporaries from compiling the loop's guarded train step ahead of time for abstract
inputs (`aigc_jax.train.plan.plan_memory`). Prints parameters, optimizer state,
temporaries and the total per device, and whether that fits each accelerator (at
`plan.USABLE_FRACTION` of its memory).

XLA:CPU settings for a compile that keeps rematerialisation (added to XLA_FLAGS unless
set there): `--xla_cpu_enable_concurrency_optimized_scheduler=false` (schedule for
memory, as the GPU and TPU compilers do) and `--xla_disable_hlo_passes=cse` (XLA:CPU
drops jax.checkpoint's optimization barriers before common-subexpression elimination,
which then merges the backward pass's recomputation back into the forward pass and undoes
rematerialisation). The temporaries remain XLA:CPU's: attention is compiled as on CPU
(`auto`: blockwise, which forms each query block's scores), not as cuDNN's flash
attention, so for a GPU they are an upper estimate. Figures: benchmarks/results/plan.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

PLANNING_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false",
                      "xla_disable_hlo_passes": "cse"}
DEFAULT_ACCELERATORS = "h100,h200,v5e,v5p"


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=64,tensor=1' -> {'data': 1, 'fsdp': 64, 'tensor': 1}."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in ("data", "fsdp", "tensor"):
      raise SystemExit(f"--mesh: {item!r} is not AXIS=SIZE with AXIS one of data, fsdp, "
                       "tensor")
    out[name.strip()] = int(value)
  return out


def parse_sets(items: list[str]) -> dict:
  """['train.batch_size=32', ...] -> {'train.batch_size': 32, ...} (Python literals, else
  strings)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set: {item!r} is not KEY=VALUE")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


def device_count(mesh: dict[str, int], devices: int) -> int:
  """--devices, else the product of the --mesh sizes given (axes not given keep the
  config's sizes; a -1 there takes what is left)."""
  if devices:
    return devices
  if -1 in mesh.values() or not mesh:
    raise SystemExit("give --devices N (or every --mesh size, without -1)")
  return math.prod(mesh.values())


def set_xla_flags(devices: int) -> None:
  """The fake device count and the planning flags, before JAX starts a backend."""
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      raise RuntimeError("benchmarks.plan must set XLA_FLAGS before JAX starts a backend")
  flags = os.environ.get("XLA_FLAGS", "").split()
  flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  for name, value in PLANNING_XLA_FLAGS.items():
    if not any(f.startswith(f"--{name}") for f in flags):
      flags.append(f"--{name}={value}")
  os.environ["XLA_FLAGS"] = " ".join(flags)


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2 ** 30:,.2f}"


def table(plan: dict, accelerators: list[str]) -> str:
  """The plan as a Markdown table, GiB per device."""
  from aigc_jax.train import plan as plan_lib

  rows = [("parameters", plan["param_bytes"]), ("optimizer state", plan["optimizer_bytes"]),
          ("frozen weights", plan["frozen_bytes"]),
          ("other state (step, key, EMA, guard)", plan["other_state_bytes"]),
          ("batch", plan["batch_bytes"])]
  if plan["complete"]:
    rows += [("compiled: arguments", plan["argument_bytes"]),
             ("compiled: outputs not aliased to arguments",
              plan["output_bytes"] - plan["alias_bytes"]),
             ("compiled: temporaries", plan["temp_bytes"]),
             ("compiled: generated code", plan["code_bytes"])]
  total = "total (arguments + outputs - aliased + temporaries + code)" if plan["complete"] \
      else "total (state + batch; not compiled: no temporaries)"
  rows.append((total, plan["total_bytes"]))
  lines = ["| per device | GiB |", "|---|---:|"]
  lines += [f"| {name} | {_gib(value)} |" for name, value in rows]
  lines += ["", "| accelerator | memory GiB | usable GiB | fits |", "|---|---:|---:|---|"]
  for name in accelerators:
    usable = plan_lib.usable_bytes(name)
    lines.append(f"| {name} | {_gib(plan_lib.ACCELERATORS[name])} | {_gib(usable)} | "
                 f"{'yes' if plan_lib.fits(plan, name) else 'no'} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="a config file (get_config())")
  p.add_argument("--mesh", default="", help="axis sizes, e.g. data=1,fsdp=64,tensor=1 "
                 "(default: the config's)")
  p.add_argument("--devices", type=int, default=0,
                 help="fake CPU devices (default: the product of --mesh)")
  p.add_argument("--accelerator", default=DEFAULT_ACCELERATORS,
                 help="comma-separated accelerators to check the plan against")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override, e.g. train.batch_size=64 (repeatable)")
  p.add_argument("--no-compile", action="store_true",
                 help="state and batch only (exact, instant); no temporaries")
  p.add_argument("--json", default="", help="also write the plan as JSON here")
  a = p.parse_args(argv)
  mesh_sizes = parse_mesh(a.mesh)
  overrides = parse_sets(a.set)
  accelerators = [s.strip().lower() for s in a.accelerator.split(",") if s.strip()]
  devices = device_count(mesh_sizes, a.devices)
  set_xla_flags(devices)

  import jax

  from aigc_jax.config import config_from_file
  from aigc_jax.errors import UserError
  from aigc_jax.train import mesh as mesh_lib
  from aigc_jax.train import plan as plan_lib
  from aigc_jax.train.loop import prepare_config

  unknown = [n for n in accelerators if n not in plan_lib.ACCELERATORS]
  if unknown:
    p.error(f"unknown accelerators {unknown}; known: {', '.join(plan_lib.ACCELERATORS)}")
  try:
    config = config_from_file(a.config, {**{f"mesh.{k}": v for k, v in mesh_sizes.items()},
                                         "mesh.num_devices": devices, **overrides})
    notes = []
    if config.family == "lm" and config.data.tokenizer == "bpe":
      # A BPE tokenizer is trained on the data; planning reads none. Its vocabulary has
      # at most bpe_vocab_size ids, so the plan is an upper bound.
      vocab = config.model.vocab_size or config.data.bpe_vocab_size
      config.data.tokenizer, config.model.vocab_size = "byte", vocab
      notes.append(f"planned with model.vocab_size={vocab} (data.tokenizer='bpe' is trained "
                   "on the data, which planning does not read)")
    prepare_config(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    plan = plan_lib.plan_memory(config, mesh, compile_step=not a.no_compile)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  plan["accelerators"] = {n: plan_lib.fits(plan, n) for n in accelerators}
  plan["usable_fraction"] = plan_lib.USABLE_FRACTION
  plan["backend"] = f"{jax.default_backend()} (jax {jax.__version__})"
  plan["command"] = " ".join(["python -m benchmarks.plan",
                              *(sys.argv[1:] if argv is None else argv)])
  sizes = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  batch = ", ".join(f"{k} {v}" for k, v in plan["batch_shapes"].items())
  n = plan["params"]
  count = f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
  print(f"{a.config}: {count} parameters, mesh {sizes} "
        f"({plan['devices']} devices), global batch {batch}"
        + (f"; compiled in {plan['compile_seconds']:.1f} s" if plan["complete"] else ""))
  for note in notes:
    print(f"note: {note}")
  print()
  print(table(plan, accelerators))
  print(f"\nusable = {plan_lib.USABLE_FRACTION:.0%} of memory (headroom for the runtime and "
        "the estimate)")
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(plan, f, indent=2)
  return plan


if __name__ == "__main__":
  main()
