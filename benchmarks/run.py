"""The benchmark suite: each family's compiled train step at the sizes of a preset.

  python -m benchmarks.run [--families lm,gan,vae,diffusion,finetune] [--preset tiny|cpu|cpu8|gpu]
                           [--mesh data=1,fsdp=8,tensor=1] [--dtype float32|bfloat16]
                           [--steps N] [--torch auto|on|off]
                           [--out benchmarks/results/PRESET-BACKEND.json]

Every case runs on the mesh `--mesh` gives (default: data parallel over every device that
can take an equal share of the batch), its state sharded by the parameters' logical names
under the default rules, as a training run shards it. The `cpu8` preset runs every family
twice on 8 fake CPU devices (it sets XLA_FLAGS itself in a fresh process): replicated
(data=8) and FSDP (fsdp=8), and tabulates the per-device bytes of parameters + optimizer
state, of frozen weights and of the whole state on each, with the step time.

For every case: lowering and compile seconds; the median, min and spread of N timed steps
(after warm-up, each synchronised with block_until_ready); examples/s (tokens/s for the
LM); model FLOPs per step (the LM's closed formula in MaxText's convention; for the GAN
and VAE the matmul + convolution FLOPs of the step's jaxpr after dead-code elimination,
equal to those of the compiled program, which the JSON also records) beside XLA's
cost_analysis() (which adds elementwise work); MFU against the datasheet peak of a known
accelerator or, on CPU, the best float32 matmul measured in the same run; the compiled
step's memory, the device's peak and the process RSS; and, on CPU, the same model's eager
PyTorch step when torch is installed. Writes the JSON, a Markdown table (.md) and a
throughput plot (.png) side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax

from aigc_jax.files import replaced_atomically, write_text
from benchmarks import diffusion_step, finetune_step, gan_step, lm_step, vae_step
from benchmarks.common import device_description, parse_mesh, peak_flops

BENCHES = {"lm": lm_step, "gan": gan_step, "vae": vae_step, "diffusion": diffusion_step,
           "finetune": finetune_step}
# preset: (default dtype, {family: [(case, timed steps)]})
PRESETS = {
    "tiny": ("float32", {"lm": [("tiny", 2)], "gan": [("tiny", 2)], "vae": [("tiny", 2)],
                         "diffusion": [("tiny", 2)]}),
    "cpu": ("float32", {"lm": [("nanogpt", 40), ("w384", 5)], "gan": [("28px", 20)],
                        "vae": [("28px", 20)], "diffusion": [("28px", 10)],
                        "finetune": [("sft_lora", 3), ("classify_lora", 5)]}),
    "gpu": ("bfloat16", {"lm": [("gpt2_124m", 20), ("gpt_350m", 10)], "gan": [("64px", 20)],
                         "vae": [("32px", 20)], "diffusion": [("32px", 20)],
                         "finetune": [("sft_lora", 20), ("sft_full", 20),
                                      ("classify_lora", 20)]}),
    # Small cases whose batches and sharded widths divide by 8; few steps, so that both
    # meshes of all four families fit in minutes on 2 cores.
    "cpu8": ("float32", {"lm": [("nanogpt_b16", 5)], "gan": [("28px", 5)],
                         "vae": [("28px", 5)], "finetune": [("sft_lora_2l", 3)]}),
}
# Presets that run every case on several meshes (the first: the baseline the others'
# per-device bytes are compared with): (fake CPU devices they are meant for, meshes).
MESH_PRESETS = {"cpu8": (8, ({"data": 8}, {"data": 1, "fsdp": 8, "tensor": 1}))}
DEFAULT_FAMILIES = {"cpu8": "lm,gan,vae,finetune"}  # other presets: lm,gan,vae,diffusion
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def force_host_devices(n: int) -> bool:
  """Asks XLA:CPU for `n` devices ($XLA_FLAGS) unless JAX has started a backend (too
  late: the flag is read then) or $XLA_FLAGS sets a count already; True if it set it."""
  from jax._src import xla_bridge

  current = os.environ.get("XLA_FLAGS", "")
  if xla_bridge.backends_are_initialized() or HOST_DEVICES_FLAG in current:
    return False
  os.environ["XLA_FLAGS"] = f"{current} {HOST_DEVICES_FLAG}={n}".strip()
  return True


def run(families: list[str], preset: str, dtype: str | None = None, steps: int = 0,
        torch: bool = False, command: str = "", mesh: dict | None = None,
        on_row=None) -> dict:
  """Every case of `preset` for `families`, on `mesh` (axis sizes, e.g. {"fsdp": 8}; None:
  the preset's meshes, else data parallel); returns {"meta": ..., "rows": [...]}.
  on_row(results so far) after every case (e.g. to write them, so that a run stopped by
  a deadline keeps the cases it finished)."""
  default_dtype, cases = PRESETS[preset]
  dtype = dtype or default_dtype
  meshes = [mesh] if mesh else list(MESH_PRESETS.get(preset, (0, [None]))[1])
  peak, peak_source = peak_flops("float32" if jax.default_backend() == "cpu" else dtype)
  meta = {"device": device_description(), "backend": jax.default_backend(),
          "jax": jax.__version__, "preset": preset, "dtype": dtype, "meshes": meshes,
          "peak_flops_per_s": peak, "peak_source": peak_source,
          "date": datetime.date.today().isoformat(), "command": command}
  rows = []
  for family in families:
    for case, case_steps in cases.get(family, []):
      for case_mesh in meshes:
        print(f"[benchmarks] {family} {case} mesh {case_mesh or 'data parallel'} ...",
              file=sys.stderr, flush=True)
        # PyTorch's reference steps are float32: compared only at float32.
        row = BENCHES[family].bench(case, steps or case_steps, dtype,
                                    torch and dtype == "float32", mesh=case_mesh)
        row["mfu"] = row["achieved_flops_per_s"] / peak
        rows.append(row)
        if on_row is not None:
          on_row({"meta": meta, "rows": rows})
  return {"meta": meta, "rows": rows}


def _ms(seconds) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def _mib(n) -> str:
  return "-" if not n else f"{n / 2 ** 20:,.0f}"


def _mib_fine(n) -> str:
  """MiB to three significant figures (per-device state of small models is < 1 MiB)."""
  return "-" if n is None else "0" if n == 0 else f"{n / 2 ** 20:,.3g}"


def short_mesh(label: str | None) -> str:
  """'data=1,fsdp=8,tensor=1' -> 'fsdp=8': the axes that split anything ('-': results
  from before meshes were recorded)."""
  if not label:
    return "-"
  split = [part for part in label.split(",") if not part.endswith("=1")]
  return ",".join(split) or "1 device"


def markdown(results: dict) -> str:
  m = results["meta"]
  lines = [f"### Train step, {m['device']}, JAX {m['jax']}, preset `{m['preset']}`",
           "",
           "| family | case | shape | mesh | batch | dtype | params | compile s | step ms "
           "(median / min ± std) | examples/s | tokens/s | model GFLOP | XLA GFLOP | GFLOP/s "
           "| MFU | temp MiB | peak RSS MiB | PyTorch ms | speed-up |",
           "|---" * 19 + "|"]
  for r in results["rows"]:
    tokens = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
    speedup = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-"
    lines.append(
        f"| {r['family']} | {r['case']} | {r['shape']} | {short_mesh(r.get('mesh'))} | "
        f"{r['batch']} | {r['dtype']} | "
        f"{r['params'] / 1e6:.2f}M | {r['compile_s']:.1f} | {_ms(r['step_median_s'])} / "
        f"{_ms(r['step_min_s'])} ± {_ms(r['step_std_s'])} | {r['examples_per_s']:,.1f} | "
        f"{tokens} | {r['model_flops_per_step'] / 1e9:.3g} | "
        f"{r['xla_flops_per_step'] / 1e9:.3g} | {r['achieved_flops_per_s'] / 1e9:,.1f} | "
        f"{r['mfu']:.1%} | {_mib(r['compiled_temp_bytes'])} | "
        f"{_mib(r['process_max_rss_bytes'])} | {_ms(r.get('torch_step_median_s'))} | "
        f"{speedup} |")
  lines += ["", f"MFU against {m['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s ({m['peak_source']}). "
            "Model FLOPs: the LM's in MaxText's convention; the GAN's, VAE's and U-Net's, the "
            "matmuls and convolutions the compiled step runs (benchmarks/flops.py). "
            f"Reproduce: `{m['command']}`."]
  if any("sample_images_per_s" in r for r in results["rows"]):
    lines += ["", sampling_markdown(results)]
  if len(m.get("meshes", ())) > 1:
    lines += ["", sharding_markdown(results)]
  return "\n".join(lines) + "\n"


def sampling_markdown(results: dict) -> str:
  """The compiled samplers' throughput (diffusion: the whole trajectory in one call)."""
  lines = ["#### Sampling", "", "| family | case | dtype | NFE | batch | call s (median / min) "
           "| images/s | GFLOP/image | GFLOP/s | MFU |", "|---" * 10 + "|"]
  peak = results["meta"]["peak_flops_per_s"]
  for r in results["rows"]:
    if "sample_images_per_s" in r:
      lines.append(
          f"| {r['family']} | {r['case']} | {r['dtype']} | {r['sample_nfe']} | "
          f"{r['sample_batch']} | {r['sample_call_median_s']:.3g} / "
          f"{r['sample_call_min_s']:.3g} | {r['sample_images_per_s']:,.1f} | "
          f"{r['sample_flops_per_image'] / 1e9:.3g} | {r['sample_flops_per_s'] / 1e9:,.1f} | "
          f"{r['sample_flops_per_s'] / peak:.1%} |")
  return "\n".join(lines)


def sharding_markdown(results: dict) -> str:
  """Per-device bytes of each case's state on every mesh it ran on, against the first
  mesh's (the preset's baseline), beside the step time."""
  cases: dict = {}
  for r in results["rows"]:
    cases.setdefault((r["family"], r["case"]), {})[short_mesh(r["mesh"])] = r
  meshes = list(dict.fromkeys(short_mesh(r["mesh"]) for r in results["rows"]))
  base, others = meshes[0], meshes[1:]
  per_mesh = lambda title: [f"{title} {mesh}" for mesh in meshes]
  header = ["family", "case", "shape", *per_mesh("params+opt MiB/device"),
            *[f"ratio {mesh} / {base}" for mesh in others],
            *per_mesh("frozen MiB/device"), *per_mesh("state MiB/device"),
            *per_mesh("step ms")]
  lines = [f"#### Per-device state, {' vs '.join(meshes)}", "",
           "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for (family, case), rows in cases.items():
    get = lambda key, rows=rows: [rows[mesh][key] if mesh in rows else None
                                  for mesh in meshes]
    params_opt = get("params_opt_device_bytes")
    ratios = [f"{b / params_opt[0]:.3f}" if b and params_opt[0] else "-"
              for b in params_opt[1:]]
    cells = [family, case, next(iter(rows.values()))["shape"],
             *map(_mib_fine, params_opt), *ratios,
             *map(_mib_fine, get("frozen_device_bytes")),
             *map(_mib_fine, get("state_device_bytes")), *map(_ms, get("step_median_s"))]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "params+opt: the parameters a step trains and their optimizer state; frozen: "
            "weights it reads but does not train (a fine-tuned model's base); state: all of "
            "it (with step, keys, EMA and guard statistics). Each is the most any one "
            "device holds (`aigc_jax.train.sharding.max_device_bytes`). Rules: "
            "`aigc_jax.train.mesh.DEFAULT_RULES`."]
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  """Examples/s of every case (ours and, where measured, eager PyTorch's), log scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results["rows"]
  several = len(results["meta"].get("meshes", ())) > 1
  labels = [f"{r['family']} {r['case']}" + (f" {short_mesh(r['mesh'])}" if several else "")
            for r in rows]
  ours = [r["examples_per_s"] for r in rows]
  torch = [r["batch"] / r["torch_step_median_s"] if "torch_step_median_s" in r else 0
           for r in rows]
  fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
  y = range(len(rows))
  ax.barh([i + 0.2 for i in y], ours, height=0.4, label="aigc_jax (jit)")
  if any(torch):
    ax.barh([i - 0.2 for i in y], torch, height=0.4, label="PyTorch (eager)")
  ax.set_yticks(list(y), labels)
  ax.set_xscale("log")
  ax.set_xlabel("examples / s")
  ax.set_title(f"{results['meta']['device']} ({results['meta']['preset']})", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: dict, out: str) -> list[str]:
  """out.json, out.md and out.png, each replaced atomically; returns their paths."""
  stem = os.path.splitext(out)[0]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  paths = [stem + ".json", stem + ".md", stem + ".png"]
  write_text(paths[0], json.dumps(results, indent=2))
  write_text(paths[1], markdown(results))
  with replaced_atomically(paths[2], suffix=".png") as tmp:
    plot(results, tmp)
  return paths


def merge(paths: list[str]) -> dict:
  """The rows of several result JSONs (e.g. one per family, as benchmarks/gpu.sh writes
  them) under the first one's meta, with every part's command; they must share device,
  preset and dtype."""
  parts = []
  for path in paths:
    with open(path) as f:
      parts.append(json.load(f))
  keys = ("device", "preset", "dtype")
  for path, part in zip(paths[1:], parts[1:], strict=True):
    if any(part["meta"][k] != parts[0]["meta"][k] for k in keys):
      raise SystemExit(f"cannot merge {path}: its {[part['meta'][k] for k in keys]} differ "
                       f"from {paths[0]}'s {[parts[0]['meta'][k] for k in keys]}")
  commands = dict.fromkeys(part["meta"]["command"] for part in parts)
  meta = {**parts[0]["meta"], "command": "`; `".join(commands)}
  return {"meta": meta, "rows": [row for part in parts for row in part["rows"]]}


def _mesh_arg(text: str) -> dict:
  try:
    return parse_mesh(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--families", default=None,
                 help="comma-separated (default: lm,gan,vae,diffusion; cpu8: lm,gan,vae,finetune)")
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--mesh", default="", type=_mesh_arg,
                 help="axis sizes of every case's mesh, e.g. data=1,fsdp=8,tensor=1 "
                      "(default: the preset's meshes, else data parallel)")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="the models' compute dtype (default: the preset's)")
  p.add_argument("--steps", type=int, default=0, help="timed steps per case (0: preset's)")
  p.add_argument("--torch", default="auto", choices=["auto", "on", "off"],
                 help="time eager PyTorch beside each case (auto: on CPU only)")
  p.add_argument("--out", default="")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="runs nothing: writes the rows of these result files as one (--out)")
  a = p.parse_args(argv)
  if a.merge:
    if not a.out:
      p.error("--merge needs --out")
    results = merge(a.merge)
    print("wrote", ", ".join(write(results, a.out)))
    return results
  family_list = a.families or DEFAULT_FAMILIES.get(a.preset, "lm,gan,vae,diffusion")
  families = [f.strip() for f in family_list.split(",") if f.strip()]
  unknown = sorted(set(families) - set(BENCHES))
  if unknown:
    p.error(f"unknown families {unknown}; choose from {sorted(BENCHES)}")
  if a.preset in MESH_PRESETS:
    devices = MESH_PRESETS[a.preset][0]
    force_host_devices(devices)  # before anything below starts JAX's backend
    if jax.device_count() < devices:
      p.error(f"preset {a.preset} needs {devices} devices, JAX sees {jax.device_count()}: "
              f"run it in a fresh process (it sets {HOST_DEVICES_FLAG}={devices}) or set "
              f"XLA_FLAGS={HOST_DEVICES_FLAG}={devices}")
  # Eager PyTorch runs on one device: no peer for the multi-mesh presets.
  torch = a.torch == "on" or (a.torch == "auto" and jax.default_backend() == "cpu"
                              and a.preset not in MESH_PRESETS)
  argv = sys.argv[1:] if argv is None else argv
  out = a.out or os.path.join("benchmarks", "results",
                              f"{a.preset}-{jax.default_backend()}.json")
  results = run(families, a.preset, a.dtype, a.steps, torch,
                " ".join(["python -m benchmarks.run", *argv]), a.mesh or None,
                on_row=lambda partial: write(partial, out))
  print(markdown(results))
  print("wrote", ", ".join(write(results, out)))
  return results


if __name__ == "__main__":
  from aigc_jax.train.memory import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()  # the allocator the CLI's training runs get
  main()
