"""The encoder's speed on this machine: all-MiniLM-L6-v2 fine-tuning step time (the
compiled, donated step of `finetune`, task classify, batch 32 x 64 tokens) and peak
memory, `classify` throughput (texts/s at batch 64 on held-out opinion snippets), and
the retrieval index's build time and query latency (embedding and exact search).

  python -m benchmarks.encoder [--steps 10] [--passages 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_time(steps: int, workdir: str) -> dict:
  """Median seconds per fine-tuning step (after the compile) and the compile time."""
  from aigc_jax.config import config_from_file
  from aigc_jax.train import open_run
  c = config_from_file("configs/ft_opinion_minilm.py", {"train.steps": steps + 1})
  run = open_run(c, workdir, for_training=True)
  state, times = run.state, []
  batch = run.put_batch(next(run.family.train_data))
  start = time.perf_counter()
  step = run.compile_train_step(batch)
  compile_s = time.perf_counter() - start
  for _ in range(steps):
    batch = run.put_batch(next(run.family.train_data))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    float(metrics["loss"])
    times.append(time.perf_counter() - start)
  run.state = state
  tokens = c.train.batch_size * c.data.seq_len
  return {"batch": c.train.batch_size, "seq_len": c.data.seq_len, "compile_s": compile_s,
          "step_s": float(np.median(times)), "tokens_per_s": tokens / float(np.median(times)),
          "run": run}


def classify_throughput(run, texts: list[str]) -> dict:
  from aigc_jax.apps.classify import classify_texts
  classify_texts(run, texts[:64], 64, progress=False)  # compiles the first shapes
  _, stats = classify_texts(run, texts, 64, progress=False)
  return {k: stats[k] for k in ("texts", "seconds", "texts_per_second", "shapes")}


def index_figures(passages: int, directory: str) -> dict:
  from aigc_jax.data.docs_corpus import retrieval_pairs, stdlib_passages
  from aigc_jax.pretrained.bert import load_bert, minilm_path
  from aigc_jax.retrieval.index import build_index, embed_texts
  corpus = stdlib_passages()
  pairs = retrieval_pairs(corpus.passages)
  encoder, tokenizer = load_bert(minilm_path())
  start = time.perf_counter()
  index = build_index(encoder, tokenizer, pairs.passages[:passages], directory)
  build_s = time.perf_counter() - start
  queries = [q for q, _ in pairs.held_out[:64]]
  embed_texts(encoder, tokenizer, queries[:1], index.max_len)  # compile
  index.search(embed_texts(encoder, tokenizer, queries[:1], index.max_len), 10)
  latencies = []
  for q in queries[:32]:
    start = time.perf_counter()
    index.search(embed_texts(encoder, tokenizer, [q], index.max_len), 10)
    latencies.append(time.perf_counter() - start)
  return {"passages": len(index), "build_s": build_s, "passages_per_s": len(index) / build_s,
          "query_latency_ms_median": 1000 * float(np.median(latencies))}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--passages", type=int, default=1000)
  p.add_argument("--texts", type=int, default=1024)
  p.add_argument("--out", default="benchmarks/results/encoder-cpu.json")
  a = p.parse_args(argv)
  from aigc_jax.data.opinion import opinion_split
  from aigc_jax.files import write_text
  with tempfile.TemporaryDirectory() as tmp:
    step = step_time(a.steps, os.path.join(tmp, "run"))
    run = step.pop("run")
    texts = list(opinion_split()["test"]["texts"])[:a.texts]
    results = {"finetune_step": step, "peak_rss_gb_after_step": peak_rss_gb(),
               "classify": classify_throughput(run, texts),
               "index": index_figures(a.passages, os.path.join(tmp, "index")),
               "peak_rss_gb": peak_rss_gb()}
  print(json.dumps(results, indent=2))
  write_text(a.out, json.dumps(results, indent=2) + "\n")
  return results


if __name__ == "__main__":
  main()
