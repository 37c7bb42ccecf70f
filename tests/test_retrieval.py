"""Retrieval on real data: the standard library's documentation as passages (counts, unique
ids, a split by package, summaries removed from their passages), recall@k and MRR on
hand-made rankings, BM25 (a tiny corpus, then the held-out pairs), and an index of the
real all-MiniLM-L6-v2 (built, reloaded, searched exactly; its embeddings those of the
unpadded text; bad files, a foreign encoder and long queries caught), which is measured
beside BM25 on held-out functions."""

import json
import os
import random
import shutil
import time

import numpy as np
import pytest

from aigc_jax.data.docs_corpus import (
  TOPICS_MODULE,
  retrieval_pairs,
  split_summary,
  stdlib_passages,
  summary_counts,
)
from aigc_jax.errors import UserError
from aigc_jax.evaluation.retrieval import BM25, bm25_rank, mrr, recall_at_k

EVAL_PAIRS = 300  # held-out pairs MiniLM is measured on (~15 s of embedding on 2 cores)


def _words(text: str) -> str:
  return " ".join(text.split())


@pytest.fixture(scope="session")
def corpus():
  return stdlib_passages()


@pytest.fixture(scope="session")
def pairs(corpus):
  return retrieval_pairs(corpus.passages, val_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("safetensors", reason="BERT checkpoints need `safetensors` (dev extra)")
  pytest.importorskip("tokenizers", reason="BERT's WordPiece tokenizer needs `tokenizers`")
  from aigc_jax.pretrained.bert import load_bert, minilm_path
  try:
    folder = minilm_path()
  except UserError as e:
    pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e}); `make setup` installs it")
  return load_bert(folder)


@pytest.fixture(scope="module")
def eval_pairs(pairs):
  """EVAL_PAIRS held-out pairs (a seeded sample) and their passages, summaries removed."""
  sample = random.Random(0).sample(pairs.held_out, EVAL_PAIRS)
  by_id = {p.id: p for p in pairs.passages}
  return sample, [by_id[pid] for _, pid in sample]


@pytest.fixture(scope="module")
def index_dir(minilm, eval_pairs, tmp_path_factory):
  from aigc_jax.retrieval.index import build_index
  encoder, tokenizer = minilm
  path = str(tmp_path_factory.mktemp("retrieval") / "index")
  start = time.perf_counter()
  index = build_index(encoder, tokenizer, eval_pairs[1], path, batch_size=64, max_len=256)
  print(f"\nindex of {len(index)} passages built in {time.perf_counter() - start:.1f} s "
        f"({index.meta['truncated']} cut at 256 tokens)")
  return path


# --- the corpus -------------------------------------------------------------------------
def test_corpus_is_large_unique_and_split_by_package(corpus, pairs):
  ids = [p.id for p in corpus.passages]
  counts = summary_counts(corpus, pairs)
  print(f"\nstdlib corpus: {json.dumps(counts)}")
  assert len(ids) > 1000 and len(set(ids)) == len(ids)
  assert counts["api_passages"] > 1000 and counts["topic_passages"] > 50
  assert "json.dumps" in ids and "os.path.join" in ids and "topic:assert#0" in ids
  assert all(p.text.startswith(p.title + ": ") for p in corpus.passages)
  # Held out by package: no held-out function's package (so none of its modules) trains.
  module = {p.id: p.module for p in pairs.passages}
  train = {module[pid].split(".")[0] for _, pid in pairs.train}
  held_out = {module[pid].split(".")[0] for _, pid in pairs.held_out}
  assert held_out and train and not held_out & train
  assert len(pairs.held_out) >= EVAL_PAIRS and len(pairs.train) > len(pairs.held_out)
  # Same input, same pairs; the seed moves the split.
  assert retrieval_pairs(corpus.passages, 0.2, 0) == pairs
  assert retrieval_pairs(corpus.passages, 0.2, 1).held_out != pairs.held_out


def test_each_pair_query_is_its_summary_and_is_removed_from_its_passage(corpus, pairs):
  original = {p.id: p for p in corpus.passages}
  paired = {p.id: p for p in pairs.passages}
  everything = pairs.train + pairs.held_out
  assert len({pid for _, pid in everything}) == len(everything)  # one query per passage
  for query, pid in everything:
    assert len(query.split()) >= 4 and query == original[pid].summary
    assert query in _words(original[pid].text)  # it was there...
    assert query not in _words(paired[pid].text)  # ...and is gone
    assert paired[pid].text.startswith(original[pid].title)
  # Passages that are no pair's keep their text; topics are never pairs.
  unpaired = set(paired) - {pid for _, pid in everything}
  assert all(paired[pid] == original[pid] for pid in unpaired)
  assert not any(paired[pid].module == TOPICS_MODULE for _, pid in everything)


def test_split_summary_skips_call_lines_and_keeps_the_rest():
  doc = "S.count(sub[, start]) -> int\n\nReturn the number of\nnon-overlapping items. More.\n\nEnd."
  assert split_summary(doc) == ("Return the number of\nnon-overlapping items.",
                                "S.count(sub[, start]) -> int\n\nMore.\n\nEnd.")
  assert split_summary("Only one line") == ("Only one line", "")
  assert split_summary("") == ("", "")
  with pytest.raises(UserError, match="val_fraction"):
    retrieval_pairs([], val_fraction=1.0)


# --- metrics ----------------------------------------------------------------------------
def test_recall_and_mrr_on_hand_made_rankings():
  ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "g"], ["m", "g2", "n"]]
  gold = ["a", "none", "g", "g2"]
  assert recall_at_k(ranked, gold, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}
  assert mrr(ranked, gold) == pytest.approx((1 + 0 + 1 / 3 + 1 / 2) / 4, abs=1e-12)
  assert recall_at_k(np.array([[3, 1], [2, 2]]), np.array([1, 2]), ks=(1, 2)) == {1: 0.5, 2: 1.0}
  with pytest.raises(UserError, match="recall@5 needs rankings of at least 5"):
    recall_at_k(ranked, gold, ks=(5,))
  with pytest.raises(UserError, match="do not fit"):
    mrr(ranked, gold[:2])


# --- BM25 -------------------------------------------------------------------------------
def test_bm25_ranks_the_obvious_passage_first_with_the_textbook_score():
  docs = ["The cat sat on the mat.", "Dogs chase the postman down the road.",
          "Python lists support append, pop and sort.", "A cat and a dog."]
  _, rows = bm25_rank(["how do I append to a Python list", "where did the cat sit (mat)",
                       "postman chased by dogs"], docs, k=4)
  assert rows[:, 0].tolist() == [2, 0, 1]
  # One query term, by hand: idf * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)).
  lengths = np.array([6, 7, 7, 5])
  idf = np.log1p((4 - 2 + 0.5) / (2 + 0.5))  # 'cat' is in two of the four
  want = idf * 2.5 / (1 + 1.5 * (0.25 + 0.75 * lengths / lengths.mean()))
  got = BM25(docs).scores("cat")
  np.testing.assert_allclose(got, np.where([1, 0, 0, 1], want, 0.0), rtol=1e-12)
  scores, rows = bm25_rank(["cat"], docs, k=4)
  assert rows[0].tolist() == [3, 0, 1, 2]  # the shorter passage wins; 0-score ties keep order
  with pytest.raises(UserError, match="k=9"):
    bm25_rank(["cat"], docs, k=9)


def test_bm25_on_the_held_out_pairs_is_far_above_chance(pairs):
  queries, gold = [q for q, _ in pairs.held_out], [pid for _, pid in pairs.held_out]
  ids = np.asarray([p.id for p in pairs.passages], dtype=object)
  start = time.perf_counter()
  _, rows = bm25_rank(queries, [p.text for p in pairs.passages], k=10)
  recall, rr = recall_at_k(ids[rows], gold), mrr(ids[rows], gold)
  chance = 10 / len(ids)
  print(f"\nBM25, {len(queries)} held-out queries over all {len(ids)} passages "
        f"({time.perf_counter() - start:.1f} s): recall@1/5/10 {recall[1]:.3f} / "
        f"{recall[5]:.3f} / {recall[10]:.3f}, MRR {rr:.3f} (chance@10 {chance:.4f})")
  assert recall[10] > 50 * chance and recall[1] > 0.1


# --- the index --------------------------------------------------------------------------
def test_index_reloads_and_finds_each_passage_by_its_own_text(minilm, index_dir, eval_pairs):
  from aigc_jax.retrieval.index import Index, encoder_identity
  encoder, tokenizer = minilm
  index = Index.load(index_dir)
  passages = eval_pairs[1]
  assert len(index) == len(passages) and index.dim == 384 and index.max_len == 256
  assert index.ids == [p.id for p in passages]
  assert index.passage(passages[3].id)["text"] == passages[3].text
  assert index.encoder_id == encoder_identity(encoder, tokenizer)
  np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
  picks = [0, 7, 42, 123, 250, 299]
  scores, ids = index.query(encoder, tokenizer, [passages[i].text for i in picks], k=3)
  assert ids[:, 0].tolist() == [passages[i].id for i in picks]
  assert scores.shape == (6, 3) and np.all(scores[:, 0] > 0.99)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_index_embeddings_equal_the_unpadded_sentence_embedding(minilm, index_dir):
  from aigc_jax.retrieval.index import Index
  encoder, tokenizer = minilm
  index = Index.load(index_dir)
  lengths = np.asarray([tokenizer.encode_batch([p["text"]], 256).mask_BT.sum()
                        for p in index.passages])
  # Shortest, median and longest: each padded differently in its length bucket.
  order = np.argsort(lengths, kind="stable")
  for row in order[[0, len(order) // 2, -1]]:
    ids_BT, mask_BT, _ = tokenizer.encode_batch([index.passages[row]["text"]], 256)
    direct_D = np.asarray(encoder.sentence_embedding(ids_BT, mask_BT))[0]
    np.testing.assert_allclose(index.embeddings[row], direct_D, atol=1e-5,
                               err_msg=f"row {row}, {lengths[row]} tokens")


def test_bad_index_files_are_refused_with_the_fix(index_dir, tmp_path):
  from aigc_jax.retrieval.index import Index
  bad = str(tmp_path / "bad")
  reset = lambda: (shutil.rmtree(bad, ignore_errors=True), shutil.copytree(index_dir, bad))
  reset()
  with open(os.path.join(bad, "meta.json"), "w") as f:
    f.write('{"format": "aigc_jax.retrieval.index", "count": ')  # cut short
  with pytest.raises(UserError, match=r"meta.json is not readable JSON.*rebuild the index"):
    Index.load(bad)
  reset()
  os.remove(os.path.join(bad, "embeddings.npy"))
  with pytest.raises(UserError, match="lacks embeddings.npy"):
    Index.load(bad)
  reset()
  with open(os.path.join(bad, "passages.jsonl")) as f:
    lines = f.readlines()
  with open(os.path.join(bad, "passages.jsonl"), "w") as f:
    f.writelines(lines[:-1])
  with pytest.raises(UserError, match="disagrees with itself"):
    Index.load(bad)
  reset()
  with open(os.path.join(bad, "embeddings.npy"), "wb") as f:
    f.write(b"not an array")
  with pytest.raises(UserError, match="not a readable .npy"):
    Index.load(bad)
  with pytest.raises(UserError, match="no index folder"):
    Index.load(str(tmp_path / "absent"))


def test_an_index_is_replaced_only_when_complete(minilm, index_dir, tmp_path, monkeypatch):
  from flax import nnx

  from aigc_jax.models.bert import BertConfig, BertEncoder
  from aigc_jax.retrieval import index as index_lib
  _, tokenizer = minilm
  tiny = BertEncoder(BertConfig(hidden=16, num_layers=1, num_heads=2, mlp_dim=32,
                                max_positions=64), rngs=nnx.Rngs(0))
  target = str(tmp_path / "index")
  shutil.copytree(index_dir, target)
  before = {n: open(os.path.join(target, n), "rb").read() for n in index_lib.FILES}
  passages = [{"id": "a", "title": "A", "text": "alpha"}, {"id": "b", "text": "beta"}]

  def broken(path, text):
    raise OSError("disk full")

  monkeypatch.setattr(index_lib, "write_text", broken)  # fails after embeddings.npy
  with pytest.raises(OSError, match="disk full"):
    index_lib.build_index(tiny, tokenizer, passages, target, max_len=32)
  monkeypatch.undo()
  assert {n: open(os.path.join(target, n), "rb").read() for n in index_lib.FILES} == before
  assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary folder left behind
  index = index_lib.build_index(tiny, tokenizer, passages, target, max_len=32)
  assert index_lib.Index.load(target).ids == ["a", "b"] and index.dim == 16
  assert sorted(os.listdir(tmp_path)) == ["index"]
  os.makedirs(tmp_path / "mine")
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(UserError, match="not an index"):
    index_lib.build_index(tiny, tokenizer, passages, str(tmp_path / "mine"), max_len=32)
  with pytest.raises(UserError, match="occurs twice"):
    index_lib.build_index(tiny, tokenizer, passages * 2, target, max_len=32)


def test_another_encoder_is_refused(minilm, index_dir):
  from flax import nnx

  from aigc_jax.retrieval.index import Index, encoder_identity
  encoder, tokenizer = minilm
  index = Index.load(index_dir)
  index.check_encoder(encoder_identity(encoder, tokenizer))  # the builder passes
  other = nnx.clone(encoder)  # same config, one parameter moved
  bias = np.array(other.embed_norm.bias[...])
  bias[0] += 1e-3
  other.embed_norm.bias.set_value(bias)
  other_id = encoder_identity(other, tokenizer)
  assert other_id != index.encoder_id
  with pytest.raises(UserError, match=r"index built with BertEncoder:.*, queried with "
                                      r"BertEncoder:.*rebuild the index"):
    index.check_encoder(other_id)
  with pytest.raises(UserError, match="rebuild the index"):
    index.query(other, tokenizer, ["read a file"], k=1)


def test_a_query_longer_than_max_len_is_cut_with_a_warning(minilm):
  from aigc_jax.retrieval.index import embed_texts
  encoder, tokenizer = minilm
  long = "open the file and read every line of it " * 6
  full = int(tokenizer.encode_batch([long], 10_000).mask_BT.sum())
  with pytest.warns(UserWarning, match=rf"1 of 2 text\(s\) are longer than max_len=32 tokens "
                                        rf"and were cut \({full - 32} tokens"):
    emb = embed_texts(encoder, tokenizer, [long, "short query"], max_len=32)
  ids_BT, mask_BT, truncated_B = tokenizer.encode_batch([long], 32)
  assert truncated_B.tolist() == [True]
  np.testing.assert_allclose(emb[0], np.asarray(encoder.sentence_embedding(ids_BT, mask_BT))[0],
                             atol=1e-5)  # the first 32 tokens' embedding


# --- MiniLM beside BM25 -----------------------------------------------------------------
def test_minilm_retrieves_held_out_functions_beside_bm25(minilm, index_dir, eval_pairs):
  from aigc_jax.retrieval.index import Index
  encoder, tokenizer = minilm
  sample, passages = eval_pairs
  queries, gold = [q for q, _ in sample], [pid for _, pid in sample]
  index = Index.load(index_dir)
  start = time.perf_counter()
  _, ranked = index.query(encoder, tokenizer, queries, k=10)
  seconds = time.perf_counter() - start
  ids = np.asarray([p.id for p in passages], dtype=object)
  _, rows = bm25_rank(queries, [p.text for p in passages], k=10)
  results = {"MiniLM": (recall_at_k(ranked, gold), mrr(ranked, gold)),
             "BM25": (recall_at_k(ids[rows], gold), mrr(ids[rows], gold))}
  print(f"\n{len(queries)} held-out queries over their {len(passages)} passages (chance@10 "
        f"{10 / len(passages):.3f}; queries embedded and searched in {seconds:.1f} s):")
  for name, (recall, rr) in results.items():
    print(f"  {name:7s} recall@1 {recall[1]:.3f}  @5 {recall[5]:.3f}  @10 {recall[10]:.3f}  "
          f"MRR {rr:.3f}")
  recall, rr = results["MiniLM"]
  assert recall[10] > 0.7 and recall[1] > 0.4 and rr > 0.5  # measured: 0.90, 0.51, 0.64
  assert recall[10] > results["BM25"][0][10] and rr > results["BM25"][1]
