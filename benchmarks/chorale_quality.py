"""A trained chorale LM beside a Kneser-Ney n-gram over the same event words and split,
and beside the held-out chorales themselves: validation bits per token, and for sampled
chorales (each prompted with a held-out chorale's header: key, meter, pickup) the
grammar, key, four-voice and voice-order figures of `evaluation.chorale_eval`.

  python -m benchmarks.chorale_quality --ours runs/chorales [--samples 50] [--order 5]

prints a Markdown table and writes it with the figures to --out (JSON, and .md beside
it), and the first samples as .txt/.mid/.wav/.png under the run's samples/music/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from aigc_jax.evaluation import music_eval
from benchmarks.gan_quality import open_ours

SHOWN = ("bits_per_token", "word_validity", "key_consistency", "four_voices", "voice_order",
         "pitch_class_overlap")


def header(text: str) -> str:
  """A chorale's first three words (key, meter, pickup) and a space: its prompt."""
  return " ".join(text.split()[:3]) + " "


def table(r: dict) -> str:
  lines = ["| model | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
  for name in ("transformer", "ngram", "held_out"):
    cells = [f"{r[name][c]:.3f}" if isinstance(r[name].get(c), float) else "-" for c in SHOWN]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ours", required=True, metavar="WORKDIR", help="a trained chorale run")
  p.add_argument("--samples", type=int, default=50, help="chorales sampled per model")
  p.add_argument("--order", type=int, default=5, help="the n-gram baseline's order")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/results/chorale_quality.json")
  a = p.parse_args(argv)

  from aigc_jax.evaluation import chorale_eval
  from aigc_jax.evaluation.ngram_abc import AbcNgram
  from aigc_jax.files import write_text
  from aigc_jax.music.render import write_samples

  config, run = open_ours(a.ours)
  family = run.family
  if family.tokenizer.kind != "chorale":
    p.error(f"{a.ours} is not a chorale run (its tokenizer is {family.tokenizer.kind!r})")
  train_docs, val_docs = family._documents
  train, val = [t for _, t in train_docs], [t for _, t in val_docs]
  prompts = [header(val[i % len(val)]) for i in range(a.samples)]
  max_new = family.model_cfg.max_seq_len

  results = {"run": a.ours, "step": int(run.state.step), "samples": a.samples,
             "train_chorales": len(train), "val_chorales": len(val), "max_new_tokens": max_new}
  start = time.perf_counter()
  metrics = run.evaluate()
  weights = family.weights(run.state)
  ours = music_eval.sample_tunes(family, weights, prompts, max_new, a.seed)
  results["transformer"] = {"bits_per_token": metrics["val_loss"] / math.log(2),
                            **chorale_eval.compare(ours, val)}
  results["transformer_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  ngram = AbcNgram.train(train, a.order, family.tokenizer)
  theirs = [ngram.sample(q, seed=a.seed + i, max_new_tokens=music_eval.room(family, q, max_new))
            for i, q in enumerate(prompts)]
  results["ngram"] = {"bits_per_token": ngram.cross_entropy(val)["bits_per_token"],
                      "order": a.order, **chorale_eval.compare(theirs, val)}
  results["ngram_seconds"] = time.perf_counter() - start
  results["held_out"] = chorale_eval.compare(val, train)  # real chorales vs training

  written, summary = write_samples(ours[:4], os.path.join(a.ours, "samples", "music"),
                                   "quality", kind="chorale")
  results["sample_files"] = written
  text = table(results)
  print(text)
  print(summary)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  write_text(a.out, json.dumps(results, indent=2, default=float) + "\n")
  write_text(os.path.splitext(a.out)[0] + ".md", text + "\n")
  return results


if __name__ == "__main__":
  main()
