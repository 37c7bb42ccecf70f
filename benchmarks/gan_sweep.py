"""The sweep behind the Fashion-MNIST GAN recipe: each setting trained for --steps with
fid_classifier (5,000 samples; one classifier when --classifier-cache hands every run the
same cached one, as for benchmarks/results/gan_sweep.md) every 1,000 steps, summarised as
setting -> FID at 1k/2k/6k, training seconds, class shares and texture at the last step.

  python -m benchmarks.gan_sweep --root runs/sweep [--train NAME ...] [--steps 2000]

trains the named settings that have no run under ROOT yet, then writes the table of
every setting with a run to --out (JSON, and .md beside it). A setting is a set of
`--config.` overrides of the base recipe (configs/gan_fashion_mnist.py as it was before
the sweep: width 64, flax's LeCun-normal kernels, batches drawn with replacement)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

from benchmarks.gan_quality import aigc_jax_command, cumulative_train_seconds

BASE = {"model.width": 64, "model.kernel_init": "lecun_normal", "data.order": "random"}
GLOROT = {"model.kernel_init": "glorot_uniform"}
SETTINGS = {
    "base": {},
    "drop3": {"model.d_dropout": 0.3},
    "drop3_w128": {"model.d_dropout": 0.3, "model.width": 128},
    "classic_like": {"model.d_dropout": 0.3, "model.width": 128, "model.z_dim": 100,
                     "model.g_activation": "leaky_relu", "model.d_kernel": 5,
                     "data.order": "epochs"},
    "g": GLOROT,
    "g_drop3": {**GLOROT, "model.d_dropout": 0.3},
    "g_ema99": {**GLOROT, "loss.ema_decay": 0.99},
    "g_classic": {**GLOROT, "model.z_dim": 100, "model.g_activation": "leaky_relu",
                  "model.d_kernel": 5, "model.d_dropout": 0.3},
    "g_epochs": {**GLOROT, "data.order": "epochs"},
    "ge_drop3": {**GLOROT, "data.order": "epochs", "model.d_dropout": 0.3},
    "g_w128": {**GLOROT, "model.width": 128},
    "g_w96e": {**GLOROT, "model.width": 96, "data.order": "epochs"},
    "final": {**GLOROT, "model.width": 128, "data.order": "epochs"},  # the recipe now
}
CONFIG = "configs/gan_fashion_mnist.py"


def overrides(name: str) -> dict:
  return {**BASE, **SETTINGS[name]}


def train(root: str, name: str, steps: int, classifier_cache: str | None) -> None:
  workdir = os.path.join(root, name)
  if classifier_cache and not os.path.exists(os.path.join(workdir, "fid_classifier")):
    shutil.copytree(classifier_cache, os.path.join(workdir, "fid_classifier"))  # one classifier
  flags = [f"--config.{k}={v}" for k, v in overrides(name).items()]
  cmd = [*aigc_jax_command(), "train", "--config", CONFIG, "--workdir", workdir,
         f"--config.train.steps={steps}", "--config.train.eval_every=1000",
         "--config.fid.samples=5000", *flags]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def summarize(root: str, name: str) -> dict | None:
  from aigc_jax.train.metrics import read_metrics
  workdir = os.path.join(root, name)
  if not os.path.isdir(workdir):
    return None
  records = read_metrics(workdir)
  val = {r["step"]: r for r in records if r.get("split") == "val" and "fid_classifier" in r}
  if not val:
    return None
  cumulative = dict(cumulative_train_seconds(records))
  last = val[max(val)]
  return {"setting": name, "overrides": SETTINGS[name],
          "fid": {str(step): round(r["fid_classifier"], 2) for step, r in sorted(val.items())},
          "train_seconds": {str(step): round(cumulative[step], 1) for step in val
                            if step in cumulative},
          "last_step": max(val),
          "class_share_min_ratio": last.get("class_share_min_ratio"),
          "class_share_max_ratio": last.get("class_share_max_ratio"),
          "nyquist_ratio": last.get("nyquist_ratio"), "period4_ratio": last.get("period4_ratio")}


def table(rows: list[dict]) -> str:
  get = lambda r, step: r["fid"].get(str(step), "-")
  lines = ["| setting | FID 1k | FID 2k | FID 6k | train s to 2k | class shares at the last "
           "step (min-max x data) |", "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    seconds = r["train_seconds"].get("2000", "-")
    shares = (f"{r['class_share_min_ratio']:.2f}-{r['class_share_max_ratio']:.2f}"
              if r["class_share_min_ratio"] is not None else "-")
    lines.append(f"| {r['setting']}: {json.dumps(r['overrides'])} | {get(r, 1000)} | "
                 f"{get(r, 2000)} | {get(r, 6000)} | {seconds} | {shares} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="runs/sweep", help="one workdir per setting under it")
  p.add_argument("--train", nargs="*", default=[], choices=sorted(SETTINGS),
                 help="settings to train (those without a run)")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--classifier-cache", help="a run's fid_classifier folder to share")
  p.add_argument("--out", default="benchmarks/results/gan_sweep.json")
  args = p.parse_args(argv)
  from aigc_jax.files import write_text
  for name in args.train:
    if summarize(args.root, name) is None:
      train(args.root, name, args.steps, args.classifier_cache)
  rows = [r for r in (summarize(args.root, name) for name in SETTINGS) if r]
  text = table(rows)
  print(text)
  write_text(args.out, json.dumps(rows, indent=2) + "\n")
  write_text(os.path.splitext(args.out)[0] + ".md", text + "\n")
  return rows


if __name__ == "__main__":
  main()
