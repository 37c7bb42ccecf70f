"""A dense passage index: unit-length sentence embeddings of every passage in one folder,
searched exactly (cosine = dot product; one matmul and `jax.lax.top_k`).

A folder holds
  embeddings.npy   [N, D] float32, row i the L2-normalised embedding of passage i
  passages.jsonl   one {"id", "title", "text"} per line, in row order
  meta.json        format, version, encoder (`encoder_identity`), dim, count, max_len,
                   truncated (passages cut at max_len tokens), created, seconds
and is written all or nothing: into `DIR.tmp-<pid>` beside it, synced, then renamed into
place; an existing index is replaced only once the new one is complete (it is moved to
`DIR.old-<pid>` and deleted after the rename; a crash between the two renames leaves it
there, and `Index.load` names it).

Embedding (`embed_texts`, shared by indexing and queries): texts are tokenized ([CLS] text
[SEP], cut at max_len tokens), sorted by length, batched, and each batch padded to a
multiple of LENGTH_BUCKET tokens (and its rows to a power of two), so padding stays small
and one jitted forward serves each of a few shapes (max_len / 32 lengths at most). The
encoder always runs in evaluation mode (dropout off), whatever mode it is in.

all-MiniLM-L6-v2 on 2 CPU cores (jaxlib 0.10): ~1,800 tokens/s, so the 5,429
standard-library passages (mean 78 tokens) index in ~170 s; 776 queries embed in ~9 s
and are searched among them in ~0.06 s; one query, embedded and searched, ~50 ms
(`Index.query` adds ~0.15 s: it fingerprints the encoder's parameters each call).

  index = build_index(encoder, tokenizer, passages, "runs/stdlib_index")
  index = Index.load("runs/stdlib_index")
  index.check_encoder(encoder_identity(encoder, tokenizer))
  scores_QK, ids_QK = index.search(embed_texts(encoder, tokenizer, queries), k=10)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import fsync_path, replaced_atomically, write_text

FORMAT = "aigc_jax.retrieval.index"
VERSION = 1
FILES = ("embeddings.npy", "passages.jsonl", "meta.json")
LENGTH_BUCKET = 32  # batch lengths round up to a multiple of this (few jitted shapes)
TOKENIZE_CHUNK = 4096  # texts tokenized at a time (the padded id arrays stay small)
# Config fields that do not change what the encoder computes in evaluation mode.
IDENTITY_IGNORES = ("attention", "dropout")


# --- encoder identity -------------------------------------------------------------------
def encoder_identity(encoder, tokenizer=None) -> str:
  """'BertEncoder:config=<12 hex>:params=<16 hex>[:vocab=<12 hex>]': a fingerprint of the
  encoder's config (IDENTITY_IGNORES left out), a SHA-256 of its parameters (names, shapes,
  dtypes, bytes) and, with a tokenizer, of its vocabulary. Equal ids embed alike."""
  from flax import nnx

  cfg = getattr(encoder, "cfg", None)
  fields = ({k: v for k, v in dataclasses.asdict(cfg).items() if k not in IDENTITY_IGNORES}
            if dataclasses.is_dataclass(cfg) else {})
  config = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
  params = hashlib.sha256()
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(encoder,
                                                                            nnx.Param)))
  for path, leaf in flat:  # dict keys in sorted order: the same for equal models
    value = np.ascontiguousarray(leaf)
    params.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape};".encode())
    params.update(value.tobytes())
  out = (f"{type(encoder).__name__}:config={config.hexdigest()[:12]}"
         f":params={params.hexdigest()[:16]}")
  vocab = getattr(getattr(tokenizer, "tokenizer", None), "get_vocab", None)
  if vocab is not None:
    items = sorted(vocab(with_added_tokens=True).items())
    out += f":vocab={hashlib.sha256(json.dumps(items).encode()).hexdigest()[:12]}"
  return out


# --- embedding --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(graphdef, state, ids_BT, mask_BT):
  from flax import nnx

  model = nnx.merge(graphdef, state)
  model.eval()  # a traced copy: the caller's encoder keeps its mode
  return model.sentence_embedding(ids_BT, mask_BT)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _tokenize(tokenizer, texts: Sequence[str], max_len: int):
  """(token ids per text [L_i] int32 with L_i <= max_len, tokens cut per text [N] int)."""
  rows, cut = [], np.zeros(len(texts), np.int64)
  for start in range(0, len(texts), TOKENIZE_CHUNK):
    chunk = list(texts[start:start + TOKENIZE_CHUNK])
    ids_BT, mask_BT, truncated_B = tokenizer.encode_batch(chunk, max_len)
    lengths = np.asarray(mask_BT).sum(axis=1)
    rows += [np.asarray(ids_BT[b, :lengths[b]], np.int32) for b in range(len(chunk))]
    long = np.flatnonzero(truncated_B)
    if long.size:  # how much was cut: their full lengths
      _, full_mask, _ = tokenizer.encode_batch([chunk[i] for i in long], 1 << 30)
      cut[start + long] = np.asarray(full_mask).sum(axis=1) - max_len
  return rows, cut


def _check_texts(texts, what: str) -> list[str]:
  if isinstance(texts, str):
    raise UserError(f"{what} must be a list of strings, got one string: wrap it as [text]")
  texts = list(texts)
  bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
  if bad:
    raise UserError(f"{what}[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string: "
                    f"give {what} as strings")
  return texts


def _embed(encoder, tokenizer, texts: list[str], max_len: int, batch_size: int):
  """(embeddings [N, D] float32 in input order, tokens cut per text [N])."""
  from flax import nnx

  positions = getattr(getattr(encoder, "cfg", None), "max_positions", None)
  if max_len < 2 or (positions is not None and max_len > positions):
    raise UserError(f"max_len={max_len} must lie in [2, {positions or 'the encoder positions'}]"
                    ": the encoder reads [CLS] text [SEP] within its position table")
  if batch_size < 1:
    raise UserError(f"batch_size={batch_size} must be >= 1")
  rows, cut = _tokenize(tokenizer, texts, max_len)
  lengths = np.asarray([len(r) for r in rows])
  order = np.argsort(lengths, kind="stable")  # similar lengths share a batch
  graphdef, state = nnx.split(encoder)
  out = None
  for start in range(0, len(order), batch_size):
    batch = order[start:start + batch_size]
    T = min(_round_up(int(lengths[batch].max()), LENGTH_BUCKET), max_len)
    B = min(1 << (len(batch) - 1).bit_length(), batch_size)  # few row counts too
    ids_BT = np.full((B, T), tokenizer.pad_id, np.int32)
    mask_BT = np.zeros((B, T), np.int32)
    for b, i in enumerate(batch):
      ids_BT[b, :lengths[i]] = rows[i]
      mask_BT[b, :lengths[i]] = 1
    emb_BD = np.asarray(_embed_batch(graphdef, state, ids_BT, mask_BT), np.float32)
    if out is None:
      out = np.zeros((len(texts), emb_BD.shape[1]), np.float32)
    out[batch] = emb_BD[:len(batch)]
  return out, cut


def embed_texts(encoder, tokenizer, texts: Sequence[str], max_len: int = 256,
                batch_size: int = 64) -> np.ndarray:
  """Unit-length sentence embeddings [N, D] float32 of `texts` (module docstring: length
  buckets, evaluation mode). A text longer than max_len tokens is cut, with a warning
  that says by how many tokens."""
  texts = _check_texts(texts, "texts")
  if not texts:
    raise UserError("embed_texts needs at least one text")
  emb_ND, cut = _embed(encoder, tokenizer, texts, max_len, batch_size)
  if cut.any():
    n = int((cut > 0).sum())
    warnings.warn(f"{n} of {len(texts)} text(s) are longer than max_len={max_len} tokens and "
                  f"were cut ({int(cut.sum())} tokens in all, up to {int(cut.max())} from "
                  "one): only their first tokens are embedded; shorten them or raise max_len",
                  stacklevel=2)
  return emb_ND


# --- building ---------------------------------------------------------------------------
def _passage_fields(p, i: int) -> dict:
  """{"id", "title", "text"} of a passage given as an object with those attributes (such
  as `docs_corpus.Passage`) or a mapping; title defaults to ''."""
  get = (lambda k: p.get(k)) if isinstance(p, Mapping) else (lambda k: getattr(p, k, None))
  fields = {"id": get("id"), "title": get("title") or "", "text": get("text")}
  if not isinstance(fields["id"], str) or not fields["id"]:
    raise UserError(f"passage {i} has no id (a non-empty string): give each passage an id")
  if not isinstance(fields["text"], str) or not isinstance(fields["title"], str):
    raise UserError(f"passage {fields['id']!r} has no text string: give passages as objects "
                    "or mappings with id, title and text")
  return fields


def build_index(encoder, tokenizer, passages: Sequence, directory: str, batch_size: int = 64,
                max_len: int = 256, encoder_id: str | None = None,
                encoder_source: Mapping | None = None) -> Index:
  """Embeds `passages` (objects or mappings with id, title, text; the text is embedded)
  and writes the index folder at once (module docstring); returns it loaded.
  `encoder_id` defaults to `encoder_identity(encoder, tokenizer)`; `encoder_source`
  (e.g. {"format": "bert", "path": ""}) is kept in meta.json so a reader can load the
  same encoder to query it."""
  start = time.perf_counter()
  fields = [_passage_fields(p, i) for i, p in enumerate(passages)]
  if not fields:
    raise UserError("build_index needs at least one passage")
  seen: set[str] = set()
  for f in fields:
    if f["id"] in seen:
      raise UserError(f"passage id {f['id']!r} occurs twice: ids must be unique")
    seen.add(f["id"])
  out = os.path.abspath(os.path.expanduser(directory))
  _check_replaceable(directory, out)  # before the embedding: fail fast
  encoder_id = encoder_id or encoder_identity(encoder, tokenizer)
  emb_ND, cut = _embed(encoder, tokenizer, [f["text"] for f in fields], max_len, batch_size)
  meta = {"format": FORMAT, "version": VERSION, "encoder": encoder_id,
          "dim": int(emb_ND.shape[1]), "count": len(fields), "max_len": max_len,
          "truncated": int((cut > 0).sum()), "encoder_source": dict(encoder_source or {}),
          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "seconds": round(time.perf_counter() - start, 3)}
  _check_replaceable(directory, out)  # again: the folder may have changed meanwhile
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    with replaced_atomically(os.path.join(tmp, "embeddings.npy"), suffix=".npy") as name:
      np.save(name, emb_ND)
    write_text(os.path.join(tmp, "passages.jsonl"),
               "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in fields))
    write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2) + "\n")
    fsync_path(tmp)  # the files are synced as written; now the folder's entries
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return Index(emb_ND, fields, meta, out)



def _is_index(path: str) -> bool:
  try:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def _check_replaceable(directory: str, out: str) -> None:
  """UserError unless `out` is absent, an empty folder, or an index (even a damaged one
  whose meta.json still says so): never delete someone else's folder."""
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out) or os.path.islink(out):
    raise UserError(f"index folder {directory!r} exists and is not a folder: choose another "
                    "path")
  entries = sorted(os.listdir(out))
  if entries and not _is_index(out):
    raise UserError(f"index folder {directory!r} holds files that are not an index "
                    f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}): it is "
                    "not replaced; choose a new or empty folder, or delete this one")


def _publish(tmp: str, out: str) -> None:
  """Puts the complete folder `tmp` at `out` (module docstring)."""
  parent = os.path.dirname(out)
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  if not os.path.lexists(out):
    os.rename(tmp, out)
  else:
    old = f"{out}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(parent)
    shutil.rmtree(old)
  fsync_path(parent)


# --- loading and searching --------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=2)
def _top_k(emb_ND, query_QD, k: int):

  # HIGHEST: float32 all the way (GPUs would otherwise use TF32 and reorder near-ties).
  scores_QN = jax.numpy.matmul(query_QD, emb_ND.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores_QN, k)


class Index:
  """A loaded index: `embeddings` [N, D] float32, `passages` (dicts with id, title, text,
  in row order), `ids`, `meta` (meta.json) and the folder it came from."""

  def __init__(self, embeddings_ND: np.ndarray, passages: list[dict], meta: dict,
               directory: str | None = None):
    self.embeddings = np.asarray(embeddings_ND, np.float32)
    self.passages = list(passages)
    self.ids = [p["id"] for p in self.passages]
    self.meta = dict(meta)
    self.directory = directory
    self._rows = {pid: i for i, pid in enumerate(self.ids)}
    self._device = None  # the embeddings on the default device, placed on first search

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def dim(self) -> int:
    """D."""
    return self.embeddings.shape[1]

  @property
  def encoder_id(self) -> str:
    """The identity of the encoder that built the index (`encoder_identity`)."""
    return str(self.meta.get("encoder", ""))

  @property
  def max_len(self) -> int:
    """The token limit the passages were embedded with (use it for queries too)."""
    return int(self.meta.get("max_len", 256))

  @classmethod
  def load(cls, directory: str) -> Index:
    """The index in `directory`; UserError naming the problem when files are missing,
    unreadable, or disagree (row count, dimension, format)."""
    path = os.path.abspath(os.path.expanduser(directory))
    rebuild = "rebuild the index (build_index)"
    if not os.path.isdir(path):
      old = sorted(e for e in os.listdir(os.path.dirname(path)) if e.startswith(
          os.path.basename(path) + ".old-")) if os.path.isdir(os.path.dirname(path)) else []
      hint = (f"; a previous index was left at {old[0]!r} by an interrupted build: rename it "
              "back" if old else "")
      raise UserError(f"no index folder at {directory!r}{hint or ': ' + rebuild}")
    missing = [n for n in FILES if not os.path.isfile(os.path.join(path, n))]
    if missing:
      raise UserError(f"index {directory!r} lacks {', '.join(missing)}: it is not a complete "
                      f"index; {rebuild}")
    meta = _read_meta(path, rebuild)
    try:
      emb_ND = np.load(os.path.join(path, "embeddings.npy"), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise UserError(f"{os.path.join(directory, 'embeddings.npy')} is not a readable .npy "
                      f"file ({e}); {rebuild}") from e
    if emb_ND.ndim != 2 or emb_ND.dtype != np.float32 or not np.isfinite(emb_ND).all():
      raise UserError(f"{os.path.join(directory, 'embeddings.npy')} holds {emb_ND.dtype} "
                      f"{emb_ND.shape}, not finite float32 [N, D] embeddings; {rebuild}")
    passages = _read_passages(os.path.join(path, "passages.jsonl"), rebuild)
    n, d = emb_ND.shape
    if not (n == len(passages) == meta["count"]) or d != meta["dim"]:
      raise UserError(f"index {directory!r} disagrees with itself: embeddings.npy [{n}, {d}], "
                      f"{len(passages)} passages, meta.json count={meta['count']} "
                      f"dim={meta['dim']} (files from different builds?); {rebuild}")
    ids = [p["id"] for p in passages]
    if len(set(ids)) != len(ids):
      raise UserError(f"{os.path.join(directory, 'passages.jsonl')} repeats passage ids; "
                      f"{rebuild}")
    return cls(emb_ND, passages, meta, path)

  def check_encoder(self, encoder_id: str) -> None:
    """UserError when `encoder_id` (`encoder_identity` of the querying encoder) is not the
    encoder that built the index: its embeddings would not be comparable."""
    if encoder_id != self.encoder_id:
      raise UserError(f"index built with {self.encoder_id}, queried with {encoder_id}: "
                      "rebuild the index with this encoder (build_index), or query with the "
                      "one that built it")

  def search_rows(self, query_emb_QD, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, rows [Q, k] int32): the k passages of highest dot product
    with each query, best first (exact)."""
    q_QD = np.asarray(query_emb_QD, np.float32)
    if q_QD.ndim != 2 or q_QD.shape[1] != self.dim:
      raise UserError(f"query embeddings have shape {q_QD.shape}, the index needs [Q, "
                      f"{self.dim}] (one query: emb[None])")
    if not 1 <= k <= len(self):
      raise UserError(f"k={k} must lie in [1, {len(self)}] (the passages in the index)")
    if self._device is None:
      self._device = jax.numpy.asarray(self.embeddings)
    Q = len(q_QD)
    padded = np.zeros((1 << max(Q - 1, 0).bit_length(), self.dim), np.float32)  # few shapes
    padded[:Q] = q_QD
    scores_QK, rows_QK = _top_k(self._device, padded, k)
    return np.asarray(scores_QK)[:Q], np.asarray(rows_QK)[:Q]

  def search(self, query_emb_QD, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, passage ids [Q, k] str): `search_rows` with ids."""
    scores_QK, rows_QK = self.search_rows(query_emb_QD, k)
    return scores_QK, np.asarray(self.ids, dtype=object)[rows_QK]

  def query(self, encoder, tokenizer, texts: Sequence[str], k: int,
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`search` for query texts: checks the encoder first (`encoder_identity` hashes its
    parameters, ~0.15 s for MiniLM: for many small calls check once, then `search` the
    output of `embed_texts`), then embeds them at the index's max_len (a longer query is
    cut, with a warning)."""
    self.check_encoder(encoder_identity(encoder, tokenizer))
    return self.search(embed_texts(encoder, tokenizer, texts, self.max_len, batch_size), k)

  def passage(self, pid: str) -> dict:
    """The passage with id `pid` (UserError when there is none)."""
    if pid not in self._rows:
      raise UserError(f"no passage {pid!r} in the index")
    return self.passages[self._rows[pid]]


def _read_meta(path: str, rebuild: str) -> dict:
  name = os.path.join(path, "meta.json")
  try:
    with open(name, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{name} is not readable JSON ({e}); {rebuild}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise UserError(f"{name} is not an index's meta.json (format "
                    f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected "
                    f"{FORMAT!r}); {rebuild}")
  if meta.get("version") != VERSION:
    raise UserError(f"{name} is index format version {meta.get('version')!r}; this aigc_jax "
                    f"reads version {VERSION}: {rebuild}")
  bad = [k for k in ("count", "dim") if not isinstance(meta.get(k), int) or meta[k] < 0]
  if bad or not isinstance(meta.get("encoder"), str):
    raise UserError(f"{name} lacks a valid {', '.join(bad) or 'encoder'}: {rebuild}")
  return meta


def _read_passages(name: str, rebuild: str) -> list[dict]:
  passages = []
  try:
    with open(name, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue  # a trailing blank line is harmless
        try:
          p = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"{name} line {line_no} is not JSON ({e}); {rebuild}") from e
        if not isinstance(p, dict) or not isinstance(p.get("id"), str):
          raise UserError(f"{name} line {line_no} is not a passage (an object with an id); "
                          f"{rebuild}")
        passages.append({"id": p["id"], "title": str(p.get("title", "")),
                         "text": str(p.get("text", ""))})
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{name} is not readable UTF-8 text ({e}); {rebuild}") from e
  return passages


__all__ = ["Index", "build_index", "embed_texts", "encoder_identity"]
