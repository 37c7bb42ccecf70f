"""Compile time of the LM train step against depth: unrolled blocks vs `scan_layers`.

  python -m benchmarks.compile_depth [--layers 2,24] [--embed 128] [--remat_policy none]
                                     [--steps 5]
                                     [--out benchmarks/results/compile_depth.json]

For each depth and layer layout the step is lowered and compiled on one device as the
training loop compiles it (as `benchmarks.common.compile_step` does: state built into the
shardings of its logical names, guarded step, donated state, traced inside
`activation_sharding`), and timed over `--steps` steps. Lowering and compiling are timed in
wall-clock seconds and in this process's CPU seconds (less disturbed by other work on a
shared machine). Prints a table and writes the JSON and a Markdown table beside it. The
JSON also records the step's matmul FLOPs counted from its jaxpr and from the compiled
program (a scan's body counted once per layer) beside the closed formula.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import numpy as np

from aigc_jax.families.lm import Family, default_config
from aigc_jax.models.transformer import REMAT_POLICIES
from aigc_jax.nn.partitioning import activation_sharding
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.loop import init_sharded_state
from aigc_jax.train.memory import keep_step_memory
from benchmarks.common import device_description, timed
from benchmarks.flops import compiled_matmul_flops, count_matmul_flops

VOCAB, SEQ_LEN, BATCH = 257, 64, 8  # the byte vocabulary; nanoGPT's CPU context


def family_and_batch(layers: int, embed: int, scan: bool, remat_policy: str):
  """An LM family (no data) of `layers` blocks of width `embed`, and random tokens."""
  heads = max(1, embed // 32)
  c = default_config()
  c.model.update(num_layers=layers, num_heads=heads, num_kv_heads=heads, embed_dim=embed,
                 mlp_dim=(embed * 8 // 3 + 7) // 8 * 8, vocab_size=VOCAB, scan_layers=scan,
                 remat_policy=remat_policy)
  c.data.update(seq_len=SEQ_LEN)
  c.train.update(batch_size=BATCH)
  c.mesh.update(num_devices=1)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ_LEN + 1), dtype=np.int32)
  return Family(c, None), {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


class _Clock:
  """Wall-clock and process CPU seconds since the last `lap`."""

  def __init__(self):
    self.lap()

  def lap(self) -> tuple[float, float]:
    now = time.perf_counter(), time.process_time()
    last = getattr(self, "_last", now)
    self._last = now
    return now[0] - last[0], now[1] - last[1]


def measure(layers: int, embed: int, scan: bool, remat_policy: str, steps: int) -> dict:
  """Lowering and compile seconds (wall, CPU), the step's median and its FLOP counts."""
  family, host_batch = family_and_batch(layers, embed, scan, remat_policy)
  mesh_cfg = family.config.mesh
  mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.rules_from_config(mesh_cfg)
  state, state_sharding = init_sharded_state(family, mesh, rules, 0)
  step = guard.guard_step(family.train_step)
  batch = mesh_lib.put_batch(host_batch, mesh)
  jitted = jax.jit(step, in_shardings=(state_sharding, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(state_sharding, mesh_lib.replicated(mesh)),
                   donate_argnums=0)
  with activation_sharding(mesh, rules):
    clock = _Clock()
    lowered = jitted.lower(state, batch)
    lower_s, lower_cpu_s = clock.lap()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = clock.lap()
    jaxpr_flops = count_matmul_flops(step, state, batch)
  try:
    compiled_flops = compiled_matmul_flops(compiled)
  except ValueError:  # an accelerator's custom call (cuDNN attention): not counted
    compiled_flops = None
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  median = timed(one_step, steps, warmup=1)[0] if steps else None
  return {"layers": layers, "scan_layers": scan, "lower_s": lower_s, "lower_cpu_s": lower_cpu_s,
          "compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "step_median_s": median,
          "formula_flops_per_step": family.model_cfg.flops_per_token(SEQ_LEN) * BATCH * SEQ_LEN,
          "jaxpr_flops_per_step": jaxpr_flops, "compiled_flops_per_step": compiled_flops}


def run(depths: list[int], embed: int, remat_policy: str, steps: int, command: str) -> dict:
  if jax.default_backend() == "cpu":
    keep_step_memory()  # as the training loop does
  measure(1, 32, True, "none", 0)  # untimed: backend start-up and first-use costs
  rows = []
  for layers in depths:
    for scan in (False, True):
      row = measure(layers, embed, scan, remat_policy, steps)
      print(f"  layers {layers:3d} {'scanned ' if scan else 'unrolled'}: lower "
            f"{row['lower_s']:.2f} s, compile {row['compile_s']:.2f} s "
            f"({row['compile_cpu_s']:.2f} CPU s)", flush=True)
      rows.append(row)
  return {"meta": {"device": device_description(), "jax": jax.__version__,
                   "date": datetime.date.today().isoformat(), "command": command,
                   "embed_dim": embed, "seq_len": SEQ_LEN, "batch": BATCH, "vocab": VOCAB,
                   "remat_policy": remat_policy},
          "rows": rows}


def _row(results: dict, layers: int, scan: bool) -> dict:
  return next(r for r in results["rows"] if r["layers"] == layers and r["scan_layers"] == scan)


def markdown(results: dict) -> str:
  m = results["meta"]
  lines = [f"LM train step, width {m['embed_dim']}, T={m['seq_len']}, batch {m['batch']}, "
           f"remat {m['remat_policy']}, {m['device']}, JAX {m['jax']}: seconds to lower "
           "(trace) and compile (wall-clock; the process's CPU seconds in brackets), and "
           "one step's median.", "",
           "| layers | unrolled lower s | unrolled compile s | scanned lower s | "
           "scanned compile s | unrolled step ms | scanned step ms |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
  ms = lambda s: "-" if s is None else f"{s * 1e3:.1f}"
  for layers in sorted({r["layers"] for r in results["rows"]}):
    u, s = _row(results, layers, False), _row(results, layers, True)
    t = lambda r, k: f"{r[k + '_s']:.2f} ({r[k + '_cpu_s']:.2f})"
    lines.append(f"| {layers} | {t(u, 'lower')} | {t(u, 'compile')} | {t(s, 'lower')} | "
                 f"{t(s, 'compile')} | {ms(u['step_median_s'])} | {ms(s['step_median_s'])} |")
  depths = sorted({r["layers"] for r in results["rows"]})
  if len(depths) > 1:
    lo, hi = depths[0], depths[-1]
    growth = lambda scan, k: _row(results, hi, scan)[k] / _row(results, lo, scan)[k]
    lines += ["", f"Compile time at {hi} layers / at {lo} layers: unrolled "
              f"{growth(False, 'compile_s'):.2f}x ({growth(False, 'compile_cpu_s'):.2f}x CPU), "
              f"scanned {growth(True, 'compile_s'):.2f}x ({growth(True, 'compile_cpu_s'):.2f}x "
              "CPU)."]
  lines += ["", f"`{m['command']}`", ""]
  return "\n".join(lines)


def write(results: dict, out: str) -> list[str]:
  """out.json and out.md; returns their paths."""
  stem = os.path.splitext(out)[0]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  paths = [stem + ".json", stem + ".md"]
  with open(paths[0], "w") as f:
    json.dump(results, f, indent=2)
  with open(paths[1], "w") as f:
    f.write(markdown(results))
  return paths


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", default="2,24", help="comma-separated depths")
  p.add_argument("--embed", type=int, default=128, help="width (heads of 32 dimensions)")
  p.add_argument("--remat_policy", default="none", choices=REMAT_POLICIES)
  p.add_argument("--steps", type=int, default=5, help="timed steps per case (0: none)")
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "compile_depth.json"))
  a = p.parse_args(argv)
  try:
    depths = [int(x) for x in a.layers.split(",") if x.strip()]
  except ValueError:
    p.error(f"--layers {a.layers!r}: expected comma-separated integers, e.g. 2,24")
  if not depths or min(depths) < 1:
    p.error(f"--layers {a.layers!r}: every depth must be >= 1")
  if a.embed < 32 or a.embed % 32:
    p.error(f"--embed {a.embed}: must be a multiple of 32")
  argv = sys.argv[1:] if argv is None else argv
  results = run(depths, a.embed, a.remat_policy, a.steps,
                " ".join(["python -m benchmarks.compile_depth", *argv]))
  print(markdown(results))
  print("wrote", ", ".join(write(results, a.out)))
  return results


if __name__ == "__main__":
  main()
