"""Retrieval on the standard-library collection: every held-out query (a docstring
summary of a held-out package) against every passage (5,429, paired ones without their
summary), for BM25 and for each encoder given (pretrained all-MiniLM-L6-v2, and e.g. the
export of a contrastive fine-tuning run): recall@1/5/10 and MRR.

  python -m benchmarks.retrieval_quality [--encoder runs/retrieval_encoder ...]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--encoder", action="append", default=[],
                 help="a BERT folder to compare (repeatable; the pretrained MiniLM always)")
  p.add_argument("--max-len", type=int, default=256)
  p.add_argument("--out", default="benchmarks/results/retrieval_quality.json")
  a = p.parse_args(argv)
  from aigc_jax.data.docs_corpus import retrieval_pairs, stdlib_passages
  from aigc_jax.evaluation.retrieval import bm25_rank, mrr, recall_at_k
  from aigc_jax.files import write_text
  from aigc_jax.pretrained.bert import load_bert, minilm_path
  from aigc_jax.retrieval.index import embed_texts

  pairs = retrieval_pairs(stdlib_passages().passages)
  texts = [q.text for q in pairs.passages]
  row = {q.id: i for i, q in enumerate(pairs.passages)}
  queries = [q for q, _ in pairs.held_out]
  gold = np.asarray([row[pid] for _, pid in pairs.held_out])
  figures = lambda ranked: {**{f"recall_at_{k}": v for k, v in
                               recall_at_k(ranked, gold).items()}, "mrr": mrr(ranked, gold)}
  results = {"queries": len(queries), "passages": len(texts), "max_len": a.max_len}
  start = time.perf_counter()
  results["bm25"] = {**figures(bm25_rank(queries, texts, 10)[1]),
                     "seconds": time.perf_counter() - start}
  for name, folder in [("minilm", minilm_path())] + [(f, f) for f in a.encoder]:
    encoder, tokenizer = load_bert(folder)
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # passages cut at max_len: counted by the index
      p_ND = embed_texts(encoder, tokenizer, texts, a.max_len)
      q_QD = embed_texts(encoder, tokenizer, queries, a.max_len)
    ranked = np.argsort(-(q_QD @ p_ND.T), axis=1, kind="stable")[:, :10]
    results[name] = {**figures(ranked), "seconds": time.perf_counter() - start}
    print(name, results[name], flush=True)
  lines = ["| system | recall@1 | recall@5 | recall@10 | MRR |", "|---|---:|---:|---:|---:|"]
  for name in ["bm25", "minilm", *a.encoder]:
    r = results[name]
    lines.append(f"| {name} | {r['recall_at_1']:.3f} | {r['recall_at_5']:.3f} | "
                 f"{r['recall_at_10']:.3f} | {r['mrr']:.3f} |")
  print("\n".join(lines))
  write_text(a.out, json.dumps(results, indent=2) + "\n")
  write_text(a.out.rsplit(".", 1)[0] + ".md", "\n".join(lines) + "\n")
  return results


if __name__ == "__main__":
  main()
