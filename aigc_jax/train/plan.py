"""Per-device memory of a training run, planned before anything is allocated.

`plan_memory(config, mesh)` builds the family, evaluates the train state's shapes
(`jax.eval_shape`) and their shardings from the parameters' logical names exactly as the
loop does, and compiles the loop's guarded train step ahead of time for abstract inputs
(`jax.ShapeDtypeStruct`s carrying those shardings). Nothing of the model is materialised,
so an 8B model on 64 fake CPU devices plans on a laptop. The state's bytes per device are
exact (each leaf's shard shape x itemsize); temporaries and generated code are what the
compiler of *this* backend reports (`compiled.memory_analysis()`): planned on CPU for a
GPU/TPU they are an estimate, since another compiler fuses, rematerialises and picks
attention kernels differently. XLA:CPU also undoes `jax.checkpoint` unless compiled with
the flags `benchmarks.plan` sets (`PLANNING_XLA_FLAGS` there; benchmarks/results/plan.md).

`fits(plan, accelerator)` compares a plan with a known accelerator's memory;
`check_fits(plan, device)` with a live device's free memory (UserError naming the bytes
and the fixes), for a run's pre-flight check.
"""

from __future__ import annotations

import contextlib
import math
import time

import jax
import jax.numpy as jnp

from aigc_jax.errors import UserError
from aigc_jax.nn.partitioning import activation_sharding
from aigc_jax.train import mesh as mesh_lib

GiB = 2 ** 30
# Memory per device, bytes (HBM as the runtime reports it, rounded).
ACCELERATORS = {
    "h100": 80 * GiB, "h200": 141 * GiB, "a100-40": 40 * GiB, "a100-80": 80 * GiB,
    "v5e": 16 * GiB, "v5p": 95 * GiB, "v4": 32 * GiB,
}
# The share of an accelerator's memory a plan may use: the rest is headroom for the
# runtime (CUDA context, cuDNN/cuBLAS workspaces, fragmentation) and for the estimate's
# error. On GPU, JAX preallocates only 75% of memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# is raised (e.g. to 0.95); `check_fits` reads the real limit instead.
USABLE_FRACTION = 0.9
# Fields of a plan that count bytes per device.
BYTE_FIELDS = ("param_bytes", "optimizer_bytes", "frozen_bytes", "other_state_bytes",
               "state_bytes", "batch_bytes", "argument_bytes", "output_bytes", "alias_bytes",
               "temp_bytes", "code_bytes", "total_bytes")


def leaf_device_bytes(leaf, sharding) -> int:
  """Bytes of the largest shard of one array (or ShapeDtypeStruct) under `sharding`."""
  shape = tuple(leaf.shape)
  return math.prod(sharding.shard_shape(shape)) * jnp.dtype(leaf.dtype).itemsize


def tree_device_bytes(tree, shardings) -> int:
  """Bytes per device of a tree of arrays under a matching tree of shardings (the largest
  shard of each leaf; splits are even, so every device holds the same)."""
  return sum(leaf_device_bytes(leaf, sh) for leaf, sh in
             zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def state_bytes(abstract_state, shardings) -> dict[str, int]:
  """{param_bytes, optimizer_bytes, frozen_bytes, other_state_bytes, state_bytes} per
  device of a TrainState (abstract or concrete) under its shardings."""
  part = lambda field: tree_device_bytes(getattr(abstract_state, field),
                                         getattr(shardings, field))
  out = {"param_bytes": part("params"), "optimizer_bytes": part("opt_state"),
         "frozen_bytes": part("frozen")}
  out["other_state_bytes"] = part("extra") + part("step") + part("rng")
  out["state_bytes"] = sum(out.values())
  return out


def batch_spec(family, config) -> dict:
  """A global training batch as {name: jax.ShapeDtypeStruct}, without reading data:
  `family.batch_spec()` when the family has one, else the shapes of the built-in
  families' batches (lm, gan, vae, finetune's sft and classify tasks)."""
  if hasattr(family, "batch_spec"):
    return family.batch_spec()
  B = config.train.batch_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
  name = getattr(family, "name", None)
  if name == "lm":
    T = config.data.seq_len
    return {"inputs": spec((B, T), jnp.int32), "targets": spec((B, T), jnp.int32)}
  if name in ("gan", "vae"):
    image_shape = (family.gan_cfg if name == "gan" else family.vae_cfg).image_shape
    return {"images": spec((B, *image_shape), jnp.float32), "labels": spec((B,), jnp.int32)}
  if name == "finetune" and getattr(family, "task", None) in ("sft", "classify"):
    T = config.data.seq_len
    if family.task == "sft":
      return {"inputs": spec((B, T), jnp.int32), "targets": spec((B, T), jnp.int32),
              "mask": spec((B, T), jnp.float32)}
    return {"tokens": spec((B, T), jnp.int32), "lengths": spec((B,), jnp.int32),
            "labels": spec((B,), jnp.int32)}
  raise UserError(f"the memory planner does not know the batch of family {name!r}: give the "
                  "family a batch_spec() method returning {name: jax.ShapeDtypeStruct} of "
                  "one global training batch")


def compiled_memory(compiled) -> dict[str, int]:
  """Per-device bytes a compiled step needs, from `compiled.memory_analysis()`: its
  arguments, outputs, the outputs that reuse donated arguments (alias), temporaries and
  generated code; `total_bytes` = arguments + outputs - alias + temporaries + code (the
  live set at the step's peak, at most: XLA may free arguments early)."""
  m = compiled.memory_analysis()
  m = m[0] if isinstance(m, (list, tuple)) else m
  if m is None:
    raise UserError(f"the {jax.default_backend()} backend reports no memory analysis of a "
                    "compiled program: plan on CPU (python -m benchmarks.plan) instead")
  out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
         "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
         "code_bytes": m.generated_code_size_in_bytes}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["code_bytes"])
  return {k: int(v) for k, v in out.items()}


def abstract_state(family, mesh, rules: dict, seed: int = 0):
  """(abstract train state with the guard's statistics, its shardings), as the loop
  derives them (`loop.ShardedInit`); nothing is allocated."""
  from aigc_jax.train.loop import ShardedInit

  init = ShardedInit(family, mesh, rules, seed)
  return init.abstract, init.shardings


def plan_memory(config, mesh, rules: dict | None = None, family=None, *,
                compile_step: bool = True, keep_compiled: bool = False) -> dict:
  """Per-device memory of training `config` on `mesh`; nothing is allocated.

  `rules`: {logical name: mesh axes} (None: from config.mesh); `family`: the built family
  object (None: built from config.family with no workdir; families read data lazily, so
  none is read, except to train an LM's BPE tokenizer: `benchmarks.plan` plans such a
  config with model.vocab_size=data.bpe_vocab_size instead). With `compile_step`, the
  guarded train step is compiled ahead of time for abstract inputs and the plan adds the
  compiler's figures (`compiled_memory`); without, `total_bytes` is the state and batch
  alone (a lower bound; no temporaries).
  `keep_compiled`: also return the compiled step under "compiled" (it runs on real arrays
  of the same shapes and shardings, so a loop need not compile again).

  Returns {"devices", "mesh", "params" (count), "batch_shapes", "param_bytes",
  "optimizer_bytes", "frozen_bytes", "other_state_bytes", "state_bytes", "batch_bytes", and
  with `compile_step` "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes",
  "compile_seconds"; "total_bytes", "complete" (whether temporaries are counted)}.
  """
  from aigc_jax.train.family import load_family

  if rules is None:
    rules = mesh_lib.rules_from_config(config.mesh)
  if family is None:
    family = load_family(config.family).Family(config, None)
  mesh_lib.check_batch_divisible(config.train.batch_size, mesh)
  if hasattr(family, "check_mesh"):
    family.check_mesh(mesh, rules)
  abstract, shardings = abstract_state(family, mesh, rules, config.seed)
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = batch_spec(family, config)
  plan = {"devices": mesh.size, "mesh": dict(mesh.shape),
          "params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
          **state_bytes(abstract, shardings),
          "batch_shapes": {k: [*v.shape] for k, v in batch.items()},
          "batch_bytes": sum(leaf_device_bytes(x, batch_sh) for x in jax.tree.leaves(batch))}
  plan["total_bytes"] = plan["state_bytes"] + plan["batch_bytes"]
  plan["complete"] = False
  if not compile_step:
    return plan
  from aigc_jax.train.loop import jit_train_step

  jitted = jit_train_step(family, config, mesh, shardings)  # exactly the loop's
  with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
  abstract_in = jax.tree.map(with_sharding, abstract, shardings)
  abstract_batch = jax.tree.map(lambda x: with_sharding(x, batch_sh), batch)
  start = time.perf_counter()
  with activation_sharding(mesh, rules):
    compiled = jitted.lower(abstract_in, abstract_batch).compile()
  plan["compile_seconds"] = time.perf_counter() - start
  plan.update(compiled_memory(compiled))
  plan["complete"] = True
  if keep_compiled:
    plan["compiled"] = compiled
  return plan


def usable_bytes(accelerator: str) -> int:
  """USABLE_FRACTION of a known accelerator's memory per device."""
  key = accelerator.lower()
  if key not in ACCELERATORS:
    raise UserError(f"unknown accelerator {accelerator!r}: choose one of "
                    f"{', '.join(ACCELERATORS)}")
  return int(ACCELERATORS[key] * USABLE_FRACTION)


def fits(plan: dict, accelerator: str) -> bool:
  """Whether the plan's per-device total fits USABLE_FRACTION of `accelerator`'s memory
  (a name in ACCELERATORS)."""
  return plan["total_bytes"] <= usable_bytes(accelerator)


def _gib(n: int) -> str:
  return f"{n / GiB:.2f} GiB ({n:,} bytes)"


def check_fits(plan: dict, device=None, *, resident: int = 0) -> None:
  """Raises UserError when `plan` needs more bytes per device than `device` (default:
  this process's first device) has free (`memory_stats()`: bytes_limit - bytes_in_use).
  `resident`: bytes of the plan already on the device, so counted in bytes_in_use (e.g.
  `plan["argument_bytes"]` once the state and batch are placed). Does nothing for a
  device that reports no memory statistics (CPU: see `check_fits_host`)."""
  device = jax.local_devices()[0] if device is None else device
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return
  free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  _require_fits(plan, int(plan["total_bytes"]) - resident, free, "per device",
                f"{device} has", bool(resident))


def check_fits_host(plan: dict, num_devices: int, *, resident: int = 0) -> None:
  """check_fits for CPU devices, which share this host's memory: `num_devices` (this
  process's devices of the mesh) times the plan's bytes against the host's available
  memory (`host_available_bytes`); nothing when that is unknown."""
  free = host_available_bytes()
  if free is None:
    return
  needed = (int(plan["total_bytes"]) - resident) * num_devices
  _require_fits(plan, needed, free, "in host memory" + (
      f" ({num_devices} CPU devices)" if num_devices > 1 else ""), "this host has",
      bool(resident))


def host_available_bytes() -> int | None:
  """Memory this process may still allocate: the kernel's MemAvailable, lowered to what
  the cgroup limit leaves (memory.max minus the cgroup's anonymous memory; page cache is
  reclaimable); None where /proc/meminfo is unreadable (not Linux)."""
  try:
    with open("/proc/meminfo") as f:
      meminfo = dict(line.split(":", 1) for line in f if ":" in line)
    free = int(meminfo["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None
  try:
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.stat") as f:
      stat = dict(line.split() for line in f if len(line.split()) == 2)
    if limit != "max":
      free = min(free, int(limit) - int(stat.get("anon", 0)))
  except (OSError, ValueError):
    pass
  return free


def _require_fits(plan: dict, needed: int, free: int, scope: str, holder: str,
                  resident: bool) -> None:
  if needed <= free:
    return
  parts = [(label, plan[key]) for label, key in
           (("parameters", "param_bytes"), ("optimizer state", "optimizer_bytes"),
            ("temporaries", "temp_bytes")) if plan.get(key) is not None]
  counted = "" if plan.get("complete", True) else ", temporaries not counted"
  detail = ", ".join(f"{label} {_gib(n)}" for label, n in parts)
  more = " more" if resident else ""
  raise UserError(
      f"the run needs {_gib(needed)}{more} {scope} ({detail} per device{counted}), but "
      f"{holder} {_gib(free)} free: split the state over more devices (raise mesh.fsdp), "
      "rematerialise the blocks (model.remat_policy='full'), lower train.batch_size (or raise "
      "train.grad_accum_steps), or chunk the loss (model.logits_chunk)")


@contextlib.contextmanager
def out_of_memory_as_user_error(what: str):
  """Turns XLA's RESOURCE_EXHAUSTED (an allocation that failed while `what` ran) into
  one UserError with the fixes; other runtime errors pass unchanged."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = str(e).splitlines()[0].strip()
    raise UserError(f"{what} ran out of memory ({reason}): lower train.batch_size (or raise "
                    "train.grad_accum_steps), rematerialise the blocks "
                    "(model.remat_policy='full'), chunk the loss (model.logits_chunk), or "
                    "split the state over more devices (mesh.fsdp)") from e


def preflight(config, mesh, rules: dict, family, devices=None, *,
              compile_step: bool = False) -> dict:
  """The loop's pre-flight fit check, before the state is allocated: `plan_memory` (by
  default without compiling: the exact state and batch bytes, a lower bound) checked
  against every device of `devices` (default: this process's devices of `mesh`)."""
  plan = plan_memory(config, mesh, rules, family, compile_step=compile_step)
  if devices is None:
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  for device in devices:
    check_fits(plan, device)
  return plan


def reports_memory(mesh) -> bool:
  """Whether this process's devices of `mesh` report memory statistics (accelerators do;
  CPU devices do not, and a fit check there is skipped)."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return bool(local) and bool(local[0].memory_stats())
