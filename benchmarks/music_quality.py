"""A trained ABC music LM beside an n-gram baseline and held-out real tunes, on the same
split: validation bits per token and per byte, and for sampled tunes (prompted with the
headers of held-out tunes) validity, key consistency and the overlap of their
pitch-class, interval and duration histograms with the held-out tunes'; then the
conditioning checks (a 6/8 prompt, a G-major prompt against a shuffled-key control).

  python -m benchmarks.music_quality --ours runs/music [--samples 200] [--order 5]

prints a Markdown table and writes it with the figures to --out (JSON, and .md beside
it), and the first samples as .abc/.mid/.wav/.png under the run's samples/music/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from aigc_jax.evaluation import music_eval
from benchmarks.gan_quality import open_ours

SHOWN = ("validity", "validity_tolerant", "bar_accuracy", "key_consistency",
         "pitch_class_overlap", "interval_overlap", "duration_overlap")


def table(r: dict) -> str:
  cols = ["bits/token", "bits/byte", *SHOWN]
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in ("transformer", "ngram", "held_out"):
    m = r[name]
    cells = [f"{m[c]:.3f}" if isinstance(m.get(c), float) else "-"
             for c in ("bits_per_token", "bits_per_byte", *SHOWN)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  c = r["conditioning"]
  lines += ["", f"Conditioning ({c['six_eight_samples']} samples each): prompted `M:6/8`, "
            f"{c['six_eight_kept']:.2f} of the {c['six_eight_valid']} valid tunes stay in "
            f"6/8, and {c['six_eight_bars']:.2f} of all bars last a 6/8 bar (prompted "
            f"`M:4/4`: {c['six_eight_bars_control']:.2f}); prompted `K:G`, key consistency "
            f"{c['g_key_consistency']:.3f} under G vs {c['g_shuffled_key_consistency']:.3f} "
            "under a random other major key."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ours", required=True, metavar="WORKDIR", help="a trained music run")
  p.add_argument("--samples", type=int, default=200, help="tunes sampled per model")
  p.add_argument("--order", type=int, default=5, help="the n-gram baseline's order")
  p.add_argument("--max-new-tokens", type=int, default=0,
                 help="per sample (default: the run's context less the prompt)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/results/music_quality.json")
  a = p.parse_args(argv)

  from aigc_jax.evaluation import abc_music_stats
  from aigc_jax.evaluation.ngram_abc import AbcNgram
  from aigc_jax.files import write_text
  from aigc_jax.music.render import write_samples

  config, run = open_ours(a.ours)
  if run.family.tokenizer.kind != "abc":
    p.error(f"{a.ours} is not a music run (its tokenizer is {run.family.tokenizer.kind!r})")
  train_docs, val_docs = run.family._documents
  train, val = [t for _, t in train_docs], [t for _, t in val_docs]
  prompts = [music_eval.tune_header(val[i % len(val)]) for i in range(a.samples)]
  max_new = a.max_new_tokens or config.data.seq_len - 16

  results = {"run": a.ours, "step": int(run.state.step), "samples": a.samples,
             "train_tunes": len(train), "val_tunes": len(val), "max_new_tokens": max_new}
  start = time.perf_counter()
  metrics = run.evaluate()
  weights = run.family.weights(run.state)  # the parameters (with frozen ones: the state)
  ours = music_eval.sample_tunes(run.family, weights, prompts, max_new, a.seed)
  results["transformer"] = {"bits_per_token": metrics["val_loss"] / math.log(2),
                            "bits_per_byte": metrics["val_bits_per_byte"],
                            **abc_music_stats.compare(ours, val)}
  results["transformer_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  ngram = AbcNgram.train(train, a.order, run.family.tokenizer)
  room = lambda q: music_eval.room(run.family, q, max_new)
  theirs = [ngram.sample(q, seed=a.seed + i, max_new_tokens=room(q))
            for i, q in enumerate(prompts)]
  results["ngram"] = {**ngram.cross_entropy(val), "order": a.order,
                      **abc_music_stats.compare(theirs, val)}
  results["ngram_seconds"] = time.perf_counter() - start
  rng = np.random.default_rng(a.seed)
  reference = [train[i] for i in rng.choice(len(train), min(len(train), 2000), replace=False)]
  results["held_out"] = abc_music_stats.compare(val, reference)  # real tunes vs training

  results["conditioning"] = music_eval.conditioning_samples(run.family, weights, a.samples,
                                                            max_new, a.seed)
  written, summary = write_samples(ours[:4], os.path.join(a.ours, "samples", "music"),
                                   "quality")
  results["sample_files"] = written
  results["first_sample"] = ours[0]
  text = table(results)
  print(text)
  print(summary)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  write_text(a.out, json.dumps(results, indent=2, default=float) + "\n")
  write_text(os.path.splitext(a.out)[0] + ".md", text + "\n")
  return results


if __name__ == "__main__":
  main()
