"""The three image generators side by side on Fashion-MNIST: trained GAN, VAE and
diffusion runs, each sampled 10,000 times and scored by one classifier (the same
`fid_classifier`, `fid_floor`, class shares and texture figures), with each run's
training time on this machine, its parameters and its network evaluations per sample
(NFE); for diffusion also FID against the number of sampling steps.

  python -m benchmarks.image_models --gan runs/gan --vae runs/vae --diffusion runs/diffusion

`--diffusion` may be given once per run (e.g. one run per objective: DDPM, EDM, flow
matching), each labelled by its `loss.name`.

prints a Markdown table and writes it with the figures to --out (JSON, and .md beside
it), the FID-vs-NFE curve and a sample grid of each model to --png.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.gan_quality import cumulative_train_seconds, open_ours, param_count_tree, write_png

DEFAULT_CACHE = "runs/image_models/fid_classifier"  # runs/ is git-ignored


def train_seconds(workdir: str) -> float | None:
  """The run's training time (evaluation excluded): its steps at the median rate of its
  train records, so that a pause or a burst of other load on the machine in one logging
  interval does not count."""
  from aigc_jax.train.metrics import read_metrics
  records = read_metrics(workdir)
  rates = [r["steps_per_sec"] for r in records
           if r.get("split") == "train" and r.get("steps_per_sec")]
  cumulative = cumulative_train_seconds(records)
  return cumulative[-1][0] / float(np.median(rates)) if rates else None


def sampler(kind: str, run, steps: int | None = None):
  """(num, seed) -> uint8 images [num, H, W, C] of a restored run (GAN: the EMA generator;
  VAE: decoded prior samples; diffusion: the EMA weights, `steps` sampling steps)."""
  family, state = run.family, run.state
  if kind == "gan":
    return lambda num, seed: family.sample_images(state, num, seed)
  if kind == "vae":
    return lambda num, seed: family.prior_samples(state, num, seed)
  return lambda num, seed: family.sample_images(state.extra["ema"], num, seed, steps=steps)[0]


def score(kind: str, workdir: str, fid, num: int, steps_sweep=(), sweep_fid=None,
          sweep_num: int = 0) -> tuple[dict, np.ndarray]:
  """The run's figures and 64 of its samples; for diffusion also at each of `steps_sweep`
  sampling steps, with `sweep_num` samples scored by `sweep_fid` (default: num, fid)."""
  from aigc_jax.evaluation import image_quality
  from aigc_jax.models import diffusion_samplers
  config, run = open_ours(workdir)
  dataset = run.family.dataset
  texture = image_quality.data_texture(dataset)
  settings = [None] if kind != "diffusion" else [None, *steps_sweep]
  sweep_fid, sweep_num = sweep_fid or fid, sweep_num or num
  out = {"workdir": workdir, "dataset": dataset.name, "config": config.to_dict().get("model"),
         "step": int(run.state.step), "train_seconds": train_seconds(workdir),
         "params": param_count_tree(run.state.params)}
  grid = None
  for steps in settings:
    n, judge = (num, fid) if steps is None else (sweep_num, sweep_fid)
    draw = sampler(kind, run, steps)
    draw(min(n, 500), 0)  # compile outside the timing (the samplers draw 500 at a time)
    start = time.perf_counter()
    images = draw(n, 1)
    seconds = time.perf_counter() - start
    # A conditional diffusion model draws the classes in turn (the test set's balanced
    # shares); its class_accuracy says how often the classifier agrees.
    classes = getattr(run.family, "net_cfg", None)
    labels = (np.arange(n) % classes.num_classes) if classes and classes.num_classes \
        else None
    figures = image_quality.sample_quality(judge, images, dataset, texture, labels)
    figures["sample_images_per_sec"] = n / seconds
    if kind == "diffusion":
      o = run.family.sample_options(steps=steps)
      figures.update(sampler=o["sampler"], sampling_steps=o["steps"],
                     nfe=diffusion_samplers.number_of_evaluations(o["sampler"], o["steps"]))
    else:
      figures["nfe"] = 1
    if steps is None:
      out.update(figures)
      grid = images[:64]
    else:
      out.setdefault("steps_sweep", []).append(figures)
    print(f"{kind} {'' if steps is None else f'steps={steps} '}"
          f"fid_classifier={figures['fid_classifier']:.2f}", flush=True)
  return out, grid


def table(results: dict) -> str:
  lines = ["| model | fid_classifier | fid_floor | class shares (min-max x data) | NFE | "
           "train s (this CPU, median rate) | samples/s | params (all trained) |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
  for label, r in results["models"].items():
    seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
    lines.append(f"| {label} ({r['step']} steps) | {r['fid_classifier']:.2f} | "
                 f"{r['fid_floor']:.2f} | {r['class_share_min_ratio']:.2f}-"
                 f"{r['class_share_max_ratio']:.2f} | {r['nfe']} | {seconds} | "
                 f"{r['sample_images_per_sec']:.0f} | {r['params']:,} |")
  sweeps = [(label, s) for label, r in results["models"].items()
            for s in sorted(r.get("steps_sweep", []), key=lambda s: s["nfe"])]
  if sweeps:
    lines += ["", f"FID against sampling steps ({results['sweep_samples']:,} samples each; "
              f"fid_floor {sweeps[0][1]['fid_floor']:.2f}):", "",
              "| model | sampler | steps | NFE | fid_classifier | class_accuracy | samples/s |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for label, s in sweeps:
      accuracy = f"{s['class_accuracy']:.3f}" if "class_accuracy" in s else "-"
      lines.append(f"| {label} | {s['sampler']} | {s['sampling_steps']} | {s['nfe']} | "
                   f"{s['fid_classifier']:.2f} | {accuracy} | "
                   f"{s['sample_images_per_sec']:.0f} |")
  return "\n".join(lines)


def labelled_runs(gan: str | None, vae: str | None, diffusion: list[str]) -> list:
  """[(label, kind, workdir)]: one diffusion run is 'diffusion', several are labelled by
  their objective, 'diffusion (edm)', ..."""
  runs = [(kind, kind, w) for kind, w in (("gan", gan), ("vae", vae)) if w]
  for workdir in diffusion:
    label = "diffusion"
    if len(diffusion) > 1:
      label = f"diffusion ({open_ours(workdir)[0].loss.name})"
    runs.append((label, "diffusion", workdir))
  labels = [label for label, _, _ in runs]
  if len(set(labels)) < len(labels):
    raise SystemExit(f"two runs share a label ({labels}): give one run per objective")
  return runs


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gan", metavar="WORKDIR")
  p.add_argument("--vae", metavar="WORKDIR")
  p.add_argument("--diffusion", metavar="WORKDIR", action="append", default=[],
                 help="a diffusion run (repeat for several)")
  p.add_argument("--samples", type=int, default=10000, help="generated images per model")
  p.add_argument("--steps-sweep", default="5,10,25,50",
                 help="diffusion: sampling steps for the FID-vs-NFE curve (comma-separated)")
  p.add_argument("--sweep-samples", type=int, default=0,
                 help="generated images per point of that curve (default: --samples)")
  p.add_argument("--cache", default=DEFAULT_CACHE, help="the classifier's cache folder")
  p.add_argument("--out", default="benchmarks/results/image_models.json")
  p.add_argument("--png", default="benchmarks/results/image_models.png")
  args = p.parse_args(argv)
  runs = labelled_runs(args.gan, args.vae, args.diffusion)
  if not runs:
    p.error("give at least one of --gan, --vae, --diffusion")
  steps_sweep = [int(s) for s in args.steps_sweep.split(",") if s.strip()]

  from aigc_jax.evaluation.classifier_fid import load_or_train
  from aigc_jax.files import write_text
  dataset = open_ours(runs[0][2])[1].family.dataset  # the runs' data
  fid = load_or_train(dataset, args.cache, num_samples=args.samples, epochs=2, seed=0)
  sweep_samples = args.sweep_samples or args.samples
  sweep_fid = fid if sweep_samples == args.samples else load_or_train(
      dataset, args.cache, num_samples=sweep_samples, epochs=2, seed=0)  # same classifier
  results = {"samples": args.samples, "sweep_samples": sweep_samples,
             "classifier": fid.summary(), "models": {}}
  panels = []
  for label, kind, workdir in runs:
    r, grid = score(kind, workdir, fid, args.samples, steps_sweep, sweep_fid, sweep_samples)
    if r["dataset"] != dataset.name:
      p.error(f"{workdir} trained on {r['dataset']}, not {dataset.name}")
    results["models"][label] = r
    panels.append((f"{label}: fid_classifier {r['fid_classifier']:.1f}", grid))
  text = table(results)
  print(text)
  write_text(args.out, json.dumps(results, indent=2) + "\n")
  write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
  write_png(args.png, panels)
  return results


if __name__ == "__main__":
  main()
