"""GAN quality against a classic peer: the DCGAN of the TensorFlow tutorial, in eager
PyTorch (`benchmarks.torch_classic_dcgan`), trained on Fashion-MNIST and scored with our
own `fid_classifier`, side by side with one of our GAN runs on the same data for the same
number of steps.

  python -m benchmarks.gan_quality --steps 2000 --train-ours runs/gq_ours
  python -m benchmarks.gan_quality --steps 2000 --ours runs/gan_fashion_mnist

prints a Markdown table (step | peer fid | peer train s | ours fid | ours train s), writes
both curves, parameter counts and the per-class shares of each model's samples (by the
FID classifier's own head) to --out (JSON), and the two 8x8 sample grids side by side to
--png.

Both models are scored by the same classifier: with --ours/--train-ours the peer reads the
classifier that run cached in WORKDIR/fid_classifier (trained with the run's seed and
fid.classifier_epochs; the same seed and epochs train the same classifier anyway), else
it trains one into --cache. FID depends on the number of samples, so --fid-samples
defaults to our run's fid.samples (5000 without a run of ours).

The peer's FID is that of G in evaluation mode (BatchNorm's running statistics, as Keras'
`training=False`, no EMA); ours is the one our run logged (its EMA generator). Training
seconds exclude evaluation on both sides; ours are summed from the train records'
steps_per_sec (compilation included in the first interval).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import torch_classic_dcgan as peer

OURS_CONFIG = "configs/gan_fashion_mnist.py"
DEFAULT_CACHE = "runs/gan_quality/fid_classifier"  # runs/ is git-ignored
GRID = 64  # images per sample grid (8x8)


# --- scoring ----------------------------------------------------------------------------
def class_shares(labels: np.ndarray, num_classes: int) -> list[float]:
  return (np.bincount(labels, minlength=num_classes) / max(len(labels), 1)).round(4).tolist()


def load_data(data_path: str | None):
  from aigc_jax.data import images as image_data
  from aigc_jax.families.gan import default_config
  c = default_config()
  c.data.name = "fashion_mnist"
  if data_path:
    c.data.path = data_path
  return image_data.load_image_dataset(c.data, (28, 28, 1))


# --- our run ----------------------------------------------------------------------------
def aigc_jax_command() -> list[str]:
  exe = os.path.join(os.path.dirname(sys.executable), "aigc-jax")
  if os.path.exists(exe):
    return [exe]
  found = shutil.which("aigc-jax")
  return [found] if found else [sys.executable, "-c",
                                "import sys; from aigc_jax.cli import main; main(sys.argv)"]


def train_ours(workdir: str, steps: int, eval_every: int, fid_samples: int,
               extra: list[str]) -> None:
  cmd = [*aigc_jax_command(), "train", "--config", OURS_CONFIG, "--workdir", workdir,
         f"--config.train.steps={steps}", f"--config.train.eval_every={eval_every}",
         f"--config.fid.samples={fid_samples}", *extra]
  print("+", shlex.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def cumulative_train_seconds(records: list[dict]) -> list[tuple[int, float]]:
  """[(step, training seconds up to it)] after each train record of a run's metrics, from
  their steps_per_sec (a step logged again by a resumed run counts once)."""
  elapsed, last_step, cumulative = 0.0, 0, []
  for r in sorted((r for r in records if r.get("split") == "train"
                   and r.get("steps_per_sec")), key=lambda r: r["step"]):
    if r["step"] <= last_step:
      continue
    elapsed += (r["step"] - last_step) / r["steps_per_sec"]
    last_step = r["step"]
    cumulative.append((last_step, elapsed))
  return cumulative


def ours_curve(workdir: str) -> list[dict]:
  """[{step, fid_classifier, train_seconds}] of the run's val records; train_seconds: the
  training time up to that step, from the train records' steps_per_sec."""
  from aigc_jax.train.metrics import read_metrics
  records = read_metrics(workdir)
  cumulative = cumulative_train_seconds(records)
  curve = {}
  for r in records:
    if r.get("split") != "val" or "fid_classifier" not in r:
      continue
    # the training time at the step, interpolated between the train records around it
    seconds = None
    if cumulative:
      steps_at, secs = zip(*[(0, 0.0), *cumulative], strict=True)
      if r["step"] <= steps_at[-1]:
        seconds = float(np.interp(r["step"], steps_at, secs))
    curve[r["step"]] = {"step": r["step"], "fid_classifier": r["fid_classifier"],
                        "train_seconds": seconds}
  return [curve[s] for s in sorted(curve)]


def open_ours(workdir: str):
  """(config, run) of our trained run, restored from its newest checkpoint."""
  from aigc_jax import config as config_lib
  from aigc_jax.train import open_run
  config = config_lib.load_config(workdir)
  return config, open_run(config, workdir, for_training=False)


def param_count_tree(tree) -> int:
  import jax
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# --- output -----------------------------------------------------------------------------
def grid_array(images_u8: np.ndarray, cols: int = 8) -> np.ndarray:
  n, H, W, _ = images_u8.shape
  rows = -(-n // cols)
  grid = np.full((rows * (H + 2) + 2, cols * (W + 2) + 2), 255, np.uint8)
  for i, img in enumerate(images_u8):
    r, c = divmod(i, cols)
    grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img[..., 0]
  return grid


def write_png(path: str, panels: list[tuple[str, np.ndarray]]) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from aigc_jax.files import replaced_atomically
  fig = Figure(figsize=(5 * len(panels), 5.4))
  FigureCanvasAgg(fig)
  for i, (title, images) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    ax.imshow(grid_array(images), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with replaced_atomically(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight", pad_inches=0.15)
  return path


def fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table(peer_curve: list[dict], ours: list[dict] | None) -> str:
  by_step = {r["step"]: r for r in ours or []}
  steps = sorted({r["step"] for r in peer_curve} | set(by_step))
  peer_by = {r["step"]: r for r in peer_curve}
  lines = ["| step | peer fid | peer train s | ours fid | ours train s |",
           "|---:|---:|---:|---:|---:|"]
  for s in steps:
    p, o = peer_by.get(s, {}), by_step.get(s, {})
    lines.append(f"| {s} | {fmt(p.get('fid_classifier'), '.2f')} | "
                 f"{fmt(p.get('train_seconds'), '.1f')} | {fmt(o.get('fid_classifier'), '.2f')} "
                 f"| {fmt(o.get('train_seconds'), '.1f')} |")
  return "\n".join(lines)


# --- main -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=2000, help="training steps of both models")
  p.add_argument("--eval-every", type=int, default=500,
                 help="the peer's FID every this many steps (and at the end); --train-ours "
                      "passes it as train.eval_every")
  p.add_argument("--fid-samples", type=int, default=None,
                 help="generated images per FID (default: our run's fid.samples, else 5000)")
  p.add_argument("--seed", type=int, default=0, help="the peer's torch.manual_seed")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--ours", metavar="WORKDIR", help="a trained run of ours to compare with")
  g.add_argument("--train-ours", metavar="DIR",
                 help=f"first train ours ({OURS_CONFIG}) for --steps into DIR, then compare")
  p.add_argument("--ours-args", default="",
                 help="extra `aigc-jax train` flags for --train-ours, one string (e.g. "
                      "'--config.train.log_every=10 --config.train.checkpoint_every=30')")
  p.add_argument("--cache", default=DEFAULT_CACHE,
                 help="classifier cache without a run of ours (with one: its fid_classifier/)")
  p.add_argument("--data-path", default="", help="Fashion-MNIST IDX folder (default: Debian's)")
  p.add_argument("--out", default="benchmarks/results/gan_quality.json")
  p.add_argument("--png", default="benchmarks/results/gan_quality.png")
  args = p.parse_args(argv)
  if args.steps < 1 or args.eval_every < 1:
    p.error("--steps and --eval-every must be at least 1")

  from aigc_jax.evaluation.classifier_fid import load_or_train
  from aigc_jax.files import write_text

  ours_dir = args.ours or args.train_ours
  if args.train_ours:
    train_ours(args.train_ours, args.steps, args.eval_every, args.fid_samples or 5000,
               shlex.split(args.ours_args))
  config = run = None
  classifier_seed, classifier_epochs, cache_dir = 0, 2, args.cache
  if ours_dir:
    config, run = open_ours(ours_dir)
    classifier_seed, classifier_epochs = int(config.seed), int(config.fid.classifier_epochs)
    cache_dir = os.path.join(ours_dir, "fid_classifier")
    if config.data.name != "fashion_mnist":
      sys.exit(f"{ours_dir} trained on {config.data.name!r}, not fashion_mnist")
    if args.fid_samples is None:
      args.fid_samples = int(config.fid.samples) or 5000
    elif args.fid_samples != config.fid.samples:
      print(f"warning: --fid-samples {args.fid_samples} but our run's FID used "
            f"{config.fid.samples} samples: FID's bias depends on the sample count, so the "
            "curves are not strictly comparable", file=sys.stderr)
  fid_samples = args.fid_samples or 5000

  dataset = load_data(config.data.path if config is not None else args.data_path)
  t0 = time.perf_counter()
  evaluator = load_or_train(dataset, cache_dir, num_samples=fid_samples,
                            epochs=classifier_epochs, seed=classifier_seed)
  print(f"fid classifier: {evaluator.summary()} ({time.perf_counter() - t0:.1f}s, "
        f"cache {cache_dir})", flush=True)
  k = dataset.num_classes

  # --- the peer
  eval_steps = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
  peer_curve, peer_images = [], {}

  def on_eval(step, g_model):
    images = peer.generate(g_model, evaluator.num_samples, seed=args.seed + 11)
    peer_curve.append({"step": step, "fid_classifier": evaluator.fid(images)})
    peer_images["last"] = images
    print(f"peer step {step}: fid_classifier {peer_curve[-1]['fid_classifier']:.2f}",
          flush=True)

  print(f"training the classic DCGAN (PyTorch) for {args.steps} steps", flush=True)
  result = peer.train(dataset.train_images, args.steps, args.seed, eval_steps, on_eval)
  for row, seconds in zip(peer_curve, result["train_seconds"], strict=True):
    row["train_seconds"] = seconds
  peer_grid = peer.generate(result["g"], GRID, seed=args.seed)
  peer_classes = evaluator.predict(peer_images["last"])
  tail = max(1, min(100, args.steps // 10))  # the last tenth of the steps, at most 100
  out = {
      "steps": args.steps, "eval_every": args.eval_every, "fid_samples": evaluator.num_samples,
      "classifier": {**evaluator.summary(), "cache_dir": cache_dir, "seed": classifier_seed,
                     "epochs": classifier_epochs},
      "data_class_shares": class_shares(dataset.test_labels, k),
      "peer": {
          "name": "classic DCGAN (TF tutorial) in eager PyTorch",
          "seed": args.seed, "batch_size": peer.BATCH_SIZE, "lr": peer.LR,
          "betas": list(peer.BETAS), "z_dim": peer.Z_DIM,
          "params": {"g": peer.param_count(result["g"]), "d": peer.param_count(result["d"])},
          "curve": peer_curve,
          "final_d_loss_mean": float(np.mean(result["d_loss"][-tail:])),
          "final_g_loss_mean": float(np.mean(result["g_loss"][-tail:])),
          "class_shares": class_shares(peer_classes, k),
      },
  }
  panels = [(f"classic DCGAN (PyTorch), step {args.steps}\n"
             f"fid_classifier {peer_curve[-1]['fid_classifier']:.2f}", peer_grid)]

  # --- ours
  ours = None
  if run is not None:
    ours = ours_curve(ours_dir)
    step = int(run.state.step)
    images = run.family.sample_images(run.state, evaluator.num_samples,
                                      seed=int(config.seed) + 11)  # the run's own FID noise
    ours_grid = run.family.sample_images(run.state, GRID, seed=0)
    out["ours"] = {
        "workdir": ours_dir, "step": step,  # as given: no machine paths in results
        "params": {"g": param_count_tree(run.state.params["g"]),
                   "d": param_count_tree(run.state.params["d"])},
        "curve": ours,
        # the same images scored again here: equal to the logged value when the same
        # classifier and sample count were used
        "fid_classifier_rescored": evaluator.fid(images),
        "class_shares": class_shares(evaluator.predict(images), k),
    }
    last = ours[-1]["fid_classifier"] if ours else out["ours"]["fid_classifier_rescored"]
    panels.append((f"ours (JAX), step {step}\nfid_classifier {last:.2f}", ours_grid))
    if step != args.steps:
      print(f"warning: our run is at step {step}, the peer trained {args.steps} steps",
            file=sys.stderr)

  md = table(peer_curve, ours)
  print()
  print(md)
  print(f"\nfid floor {evaluator.fid_floor:.2f}, classifier test accuracy "
        f"{evaluator.test_accuracy:.4f}, {evaluator.num_samples} samples per FID")
  print(f"params: peer G {out['peer']['params']['g']:,} D {out['peer']['params']['d']:,}"
        + (f"; ours G {out['ours']['params']['g']:,} D {out['ours']['params']['d']:,}"
           if ours is not None else ""))
  out["table"] = md
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_text(args.out, json.dumps(out, indent=2) + "\n")
  write_png(args.png, panels)
  print(f"wrote {args.out} and {args.png}")
  return out


if __name__ == "__main__":
  main()
