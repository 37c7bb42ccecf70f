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

from benchmarks.gan_quality import open_ours

SIX_EIGHT, G_MAJOR = "X:1\nM:6/8\nL:1/8\n", "X:1\nM:4/4\nL:1/8\nK:G\n"
SHOWN = ("validity", "validity_tolerant", "bar_accuracy", "key_consistency",
         "pitch_class_overlap", "interval_overlap", "duration_overlap")


def header(text: str) -> str:
  """A tune's header: its lines up to and including `K:`."""
  lines = text.split("\n")
  end = next(i for i, line in enumerate(lines) if line.startswith("K:"))
  return "\n".join(lines[:end + 1]) + "\n"


def room(run, prompt: str, max_new_tokens: int) -> int:
  """New tokens a prompt leaves in the model's context, at most max_new_tokens."""
  context = run.family.config.data.seq_len
  return min(max_new_tokens, context - len(run.family.tokenizer.encode(prompt)))


def lm_samples(run, prompts: list[str], max_new_tokens: int, seed: int) -> list[str]:
  """Each prompt and the LM's continuation (temperature 1: the model's own distribution),
  in batches so that memory stays bounded (each batch as long as its longest prompt
  leaves room for)."""
  out = []
  for start in range(0, len(prompts), 50):
    batch = prompts[start:start + 50]
    new = min(room(run, q, max_new_tokens) for q in batch)
    texts = run.family.generate_text(run.state.params, batch, max_new_tokens=new,
                                     seed=seed + start, temperature=1.0)
    out += [p + t for p, t in zip(batch, texts, strict=True)]
  return out


def conditioning(samples_68: list[str], samples_g: list[str], seed: int) -> dict:
  """How far samples keep what their prompt asked: the share of parsed 6/8-prompted
  tunes whose bars all last 6/8, and the key consistency of G-prompted tunes under G
  against the same tunes under keys drawn at random from the other eleven majors."""
  from aigc_jax.evaluation import abc_music
  parsed_68 = [p for p in abc_music.parse_all(samples_68) if p is not None]
  keep = [not abc_music.wrong_bars(p) for p in parsed_68]
  parsed_g = [p for p in abc_music.parse_all(samples_g) if p is not None]
  others = ["C", "Db", "D", "Eb", "E", "F", "F#", "Ab", "A", "Bb", "B"]
  rng = np.random.default_rng(seed)
  own = [abc_music.key_consistency(p) for p in parsed_g]
  shuffled = [abc_music.key_consistency(p, str(rng.choice(others))) for p in parsed_g]
  mean = lambda xs: float(np.mean([x for x in xs if not math.isnan(x)])) if xs else math.nan
  return {"six_eight_parsed": len(parsed_68), "six_eight_kept": mean(keep),
          "g_parsed": len(parsed_g), "g_key_consistency": mean(own),
          "g_shuffled_key_consistency": mean(shuffled)}


def table(r: dict) -> str:
  cols = ["bits/token", "bits/byte", *SHOWN]
  lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name in ("transformer", "ngram", "held_out"):
    m = r[name]
    cells = [f"{m[c]:.3f}" if isinstance(m.get(c), float) else "-"
             for c in ("bits_per_token", "bits_per_byte", *SHOWN)]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  c = r["conditioning"]
  lines += ["", f"Conditioning ({r['samples']} samples each): prompted `M:6/8`, "
            f"{c['six_eight_kept']:.2f} of the {c['six_eight_parsed']} parsed tunes keep "
            f"6/8 in every bar; prompted `K:G`, key consistency {c['g_key_consistency']:.3f} "
            f"under G vs {c['g_shuffled_key_consistency']:.3f} under a random other major "
            "key."]
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
  if config.data.tokenizer != "abc":
    p.error(f"{a.ours} is not a music run (data.tokenizer={config.data.tokenizer!r})")
  train_docs, val_docs = run.family._documents
  train, val = [t for _, t in train_docs], [t for _, t in val_docs]
  prompts = [header(val[i % len(val)]) for i in range(a.samples)]
  max_new = a.max_new_tokens or config.data.seq_len - 16

  results = {"run": a.ours, "step": int(run.state.step), "samples": a.samples,
             "train_tunes": len(train), "val_tunes": len(val), "max_new_tokens": max_new}
  start = time.perf_counter()
  metrics = run.evaluate()
  ours = lm_samples(run, prompts, max_new, a.seed)
  results["transformer"] = {"bits_per_token": metrics["val_loss"] / math.log(2),
                            "bits_per_byte": metrics["val_bits_per_byte"],
                            **abc_music_stats.compare(ours, val)}
  results["transformer_seconds"] = time.perf_counter() - start

  start = time.perf_counter()
  ngram = AbcNgram.train(train, a.order, run.family.tokenizer)
  theirs = [ngram.sample(q, seed=a.seed + i, max_new_tokens=room(run, q, max_new))
            for i, q in enumerate(prompts)]
  results["ngram"] = {**ngram.cross_entropy(val), "order": a.order,
                      **abc_music_stats.compare(theirs, val)}
  results["ngram_seconds"] = time.perf_counter() - start
  rng = np.random.default_rng(a.seed)
  reference = [train[i] for i in rng.choice(len(train), min(len(train), 2000), replace=False)]
  results["held_out"] = abc_music_stats.compare(val, reference)  # real tunes vs training

  results["conditioning"] = conditioning(
      lm_samples(run, [SIX_EIGHT] * a.samples, max_new, a.seed + 1),
      lm_samples(run, [G_MAJOR] * a.samples, max_new, a.seed + 2), a.seed)
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
