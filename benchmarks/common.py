"""What every step benchmark shares: synchronised timing, the peak FLOP/s an MFU is taken
against, and compiling + timing a family's `train_step` exactly as the training loop runs
it (state sharded by its parameters' logical names over a (data, fsdp, tensor) mesh,
donated, batch split over data x fsdp)."""

from __future__ import annotations

import functools
import math
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.nn.partitioning import activation_sharding
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.loop import init_sharded_state
from aigc_jax.train.memory import keep_step_memory
from aigc_jax.train.sharding import max_device_bytes
from benchmarks.flops import compiled_matmul_flops, count_matmul_flops

# Dense bfloat16 datasheet peaks per chip, TFLOP/s; matched against device_kind.
DATASHEET_PEAK_TFLOPS = {"h100": 989, "h200": 989, "a100": 312, "v4": 275, "v5e": 197,
                         "v5 lite": 197, "v5p": 459, "v6e": 918, "v6 lite": 918}


def device_description() -> str:
  cpu = platform.processor() or platform.machine()
  return f"{jax.devices()[0].device_kind} x{jax.device_count()} ({cpu})"


def timed(fn, steps: int, warmup: int = 3) -> tuple[float, float, float]:
  """(median, min, standard deviation) seconds of `steps` calls of fn, each synchronised
  with block_until_ready, after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(np.min(times)), float(np.std(times))


def datasheet_peak_flops() -> float | None:
  """FLOP/s of all devices from the datasheet table, or None for an unknown device."""
  kind = jax.devices()[0].device_kind.lower()
  for key, tflops in DATASHEET_PEAK_TFLOPS.items():
    if key in kind:
      return tflops * 1e12 * jax.device_count()
  return None


@functools.cache
def measured_matmul_flops(dtype: str = "float32") -> float:
  """The best FLOP/s of square matmuls (512-2048) on the default device, measured now."""
  best = 0.0
  matmul = jax.jit(lambda x: x @ x)
  for n in (512, 1024, 2048):
    a = jnp.ones((n, n), dtype)
    _, t_min, _ = timed(functools.partial(matmul, a), 10)
    best = max(best, 2 * n ** 3 / t_min)
  return best


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """The datasheet peak for a known accelerator, else this run's best measured matmul."""
  peak = datasheet_peak_flops()
  if peak is not None:
    return peak, f"datasheet ({jax.devices()[0].device_kind})"
  return measured_matmul_flops(dtype), f"measured {dtype} matmul"


def _first(analysis):
  return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def mesh_config(spec: dict | None, batch_size: int, max_devices: int = 0) -> dict:
  """A `mesh` config section ({data, fsdp, tensor, num_devices}) from a spec such as
  {"data": 1, "fsdp": 8} (absent axes: 1; one may be -1, the devices left over); None:
  data parallel over every device that can take an equal share of the batch, at most
  max_devices (0: no limit)."""
  if spec is None:
    limit = min(max_devices or jax.device_count(), jax.device_count())
    spec = {"data": max(n for n in range(1, limit + 1) if batch_size % n == 0)}
  unknown = sorted(set(spec) - set(mesh_lib.MESH_AXES))
  if unknown:
    raise ValueError(f"mesh spec {spec}: unknown axes {unknown}; use {mesh_lib.MESH_AXES}")
  sizes = {axis: int(spec.get(axis, 1)) for axis in mesh_lib.MESH_AXES}
  # Without a -1 the sizes fix the device count; the rest of the devices stay idle.
  num_devices = -1 if -1 in sizes.values() else math.prod(sizes.values())
  return {**sizes, "num_devices": num_devices}


def mesh_label(mesh) -> str:
  """'data=1,fsdp=8,tensor=1': a mesh's axis sizes, as `--mesh` takes them."""
  return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def parse_mesh(text: str) -> dict:
  """'data=1,fsdp=8,tensor=1' -> {"data": 1, "fsdp": 8, "tensor": 1}."""
  spec = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, _, size = part.partition("=")
    if axis.strip() not in mesh_lib.MESH_AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"mesh {text!r}: expected AXIS=SIZE pairs with AXIS one of "
                       f"{mesh_lib.MESH_AXES}, e.g. data=1,fsdp=8,tensor=1")
    spec[axis.strip()] = int(size)
  return spec


def compile_step(family, host_batch, max_devices: int = 0, mesh: dict | None = None,
                 seed: int = 0) -> dict:
  """`family.train_step` compiled as the training loop compiles it: the state built by
  `init_sharded_state` straight into the shardings its parameters' logical names give
  under the default rules, the guarded step jitted with those shardings (batch split over
  data x fsdp), state donated, lowered inside `activation_sharding`. Returns the initial
  state, the sharded batch, the mesh, the rules, the compiled step, lowering and compile
  seconds, and the matmul + convolution FLOPs of one step counted twice: from the step's
  jaxpr, dead code removed ("jaxpr_flops_per_step"), and from the compiled program
  ("compiled_flops_per_step", summed over devices; None, with "compiled_flops_error", when
  its HLO holds a custom call that benchmarks.flops cannot read).

  `mesh`: axis sizes such as {"data": 1, "fsdp": 8, "tensor": 1} (`mesh_config`); None:
  data parallel over every device that can take an equal share of the batch, at most
  max_devices (0: no limit). On several devices the two FLOP counts may differ: work a
  device repeats (a replicated computation) counts once per device, and a weight gradient
  over a one-example shard contracts nothing (an outer product, not counted)."""
  if jax.default_backend() == "cpu":
    keep_step_memory()  # as the training loop does
  batch_size = len(jax.tree.leaves(host_batch)[0])
  mesh_cfg = mesh_config(mesh, batch_size, max_devices)
  device_mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.rules_from_config(None)  # the default rules table
  mesh_lib.check_batch_divisible(batch_size, device_mesh)
  if hasattr(family, "check_mesh"):  # as open_run: e.g. heads that must split whole
    family.check_mesh(device_mesh, rules)
  state, state_sharding = init_sharded_state(family, device_mesh, rules, seed)
  train_step = guard.guard_step(family.train_step)
  batch = mesh_lib.put_batch(host_batch, device_mesh)
  jitted = jax.jit(train_step,
                   in_shardings=(state_sharding, mesh_lib.batch_sharding(device_mesh)),
                   out_shardings=(state_sharding, mesh_lib.replicated(device_mesh)),
                   donate_argnums=0)
  with activation_sharding(device_mesh, rules):  # Run.sharded(): activations pinned
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jaxpr_flops = count_matmul_flops(train_step, state, batch)
  out = {"state": state, "batch": batch, "mesh": device_mesh, "rules": rules,
         "compiled": compiled, "lower_s": t1 - t0, "compile_s": t2 - t1,
         "jaxpr_flops_per_step": jaxpr_flops}
  try:
    out["compiled_flops_per_step"] = compiled_matmul_flops(compiled)
  except ValueError as e:  # e.g. an accelerator's custom call; reported, not guessed
    out.update(compiled_flops_per_step=None, compiled_flops_error=str(e))
  return out


def state_bytes(state) -> dict:
  """The most bytes any one device holds of the parameters + optimizer state, of the
  frozen weights, and of the whole state (each its own maximum over devices)."""
  return {"params_opt_device_bytes": max_device_bytes((state.params, state.opt_state)),
          "frozen_device_bytes": max_device_bytes(state.frozen),
          "state_device_bytes": max_device_bytes(state)}


def measure_step(family, host_batch, metric: str, steps: int, warmup: int = 3,
                 mesh: dict | None = None) -> dict:
  """Compiles the step (`compile_step` on `mesh`) and times it: the mesh, lowering and
  compile seconds, median / min / spread of `steps` synchronised steps, parameter count,
  per-device bytes of the state (`state_bytes`), matmul + convolution FLOPs of the step's
  jaxpr (dead code removed) and of the compiled program, XLA's FLOPs, and memory."""
  c = compile_step(family, host_batch, mesh=mesh)
  compiled, batch = c["compiled"], c["batch"]
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c["state"].params))
  placed = state_bytes(c["state"])  # before the first step donates the state
  holder = {"state": c.pop("state")}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics[metric]

  loss = float(one_step())
  if not np.isfinite(loss):
    raise FloatingPointError(f"the benchmarked step's {metric} is {loss}")
  median, best, spread = timed(one_step, steps, warmup)
  cost = _first(compiled.cost_analysis()) or {}
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  flops = {k: v for k, v in c.items() if "flops" in k}
  return {"params": params, "devices": c["mesh"].size, "mesh": mesh_label(c["mesh"]),
          **placed, "lower_s": c["lower_s"],
          "compile_s": c["compile_s"], "step_median_s": median, "step_min_s": best,
          "step_std_s": spread, **flops,
          # cost_analysis() counts one device's partition of an SPMD program: all devices
          # run it, so the step's total (like compiled_flops_per_step) is that x devices.
          "xla_flops_per_step": (float(cost["flops"]) * c["mesh"].size if "flops" in cost
                                 else -1.0),
          "compiled_temp_bytes": getattr(memory, "temp_size_in_bytes", None),
          "compiled_argument_bytes": getattr(memory, "argument_size_in_bytes", None),
          "peak_device_bytes": stats.get("peak_bytes_in_use"),
          "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def model_flops(measured: dict) -> int:
  """The model FLOPs of a step without a closed formula (GAN, VAE): the matmuls and
  convolutions of its jaxpr with dead code removed, which on CPU equal those of the
  compiled program (tests/test_benchmarks.py checks it for every CPU case). Not the
  compiled count itself: on GPU, XLA may pad a convolution's channels for cuDNN, work
  that is not the model's."""
  return measured["jaxpr_flops_per_step"]


def step_row(family: str, case: str, shape: str, dtype: str, batch: int, measured: dict,
             model_flops: float, torch_fn=None) -> dict:
  """One result row: the measurements, examples/s, model FLOPs (and FLOP/s), and the eager
  PyTorch step beside it when torch_fn is given and torch is installed."""
  row = {"family": family, "case": case, "shape": shape, "dtype": dtype, "batch": batch,
         **measured, "examples_per_s": batch / measured["step_median_s"],
         "model_flops_per_step": float(model_flops),
         "achieved_flops_per_s": model_flops / measured["step_median_s"]}
  if torch_fn is not None:
    try:
      t = torch_fn()
    except ImportError:  # torch is optional (the `bench` extra)
      t = None
    if t is not None:
      row.update(torch_step_median_s=t["median_s"], torch_version=t["torch"],
                 speedup_vs_torch=t["median_s"] / row["step_median_s"])
  return row
