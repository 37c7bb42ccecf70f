"""Text corpora: the Python standard library's source (the default, on every machine),
any plain-text file or folder, tfds text datasets, and ABC folk tunes (music21's corpus
or a folder of .abc files); deterministic train/val splits."""

from __future__ import annotations

import codecs
import logging
import os
import sysconfig
import tokenize
import zlib
from pathlib import Path

import numpy as np

from aigc_jax.data.tfds_source import tfds_examples
from aigc_jax.errors import UserError

Document = tuple[str, str]  # (name, text)

# Folders left out of the standard-library corpus: tests, and installed third-party code.
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
  """The folder of this Python's standard library (the default text corpus)."""
  return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(limit_files: int = 0) -> list[Document]:
  """Every *.py file of the standard library outside test folders, sorted by path."""
  root = stdlib_root()
  files = sorted(p for p in root.rglob("*.py")
                 if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
  if limit_files:
    files = files[:limit_files]
  return [(str(p.relative_to(root)), _read_python_source(p)) for p in files]


def _read_python_source(path: Path) -> str:
  # Strict, in the encoding Python itself reads the file with (UTF-8 unless a PEP 263
  # cookie says otherwise): every corpus file decodes, so nothing is silently replaced.
  try:
    with tokenize.open(path) as f:
      return f.read()
  except (SyntaxError, UnicodeDecodeError) as e:  # a bad coding cookie, or bytes
    raise UserError(f"standard library file '{path}' cannot be read as Python source "
                    f"({e}): set data.limit_files to stop before it, or train on "
                    "data.name='text'") from None


def _is_text(path: Path, encoding: str = "utf-8") -> bool:
  """False when the file's first 4 KiB decode to a NUL character (binary)."""
  with open(path, "rb") as f:
    head = f.read(4096)
  # Decoded, not raw bytes: UTF-16 text has NUL bytes but no NUL characters.
  decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
  return "\0" not in decoder.decode(head, final=False)


def _read_text_file(path: Path, encoding: str, field: str) -> str:
  """The file decoded strictly; UserError naming it when it is binary or not `encoding`."""
  raw = path.read_bytes()
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    nul = raw.find(b"\0")
    if nul >= 0:  # a binary file fails any decode: say so, not "wrong encoding"
      raise UserError(f"data file '{path}' looks binary (NUL byte at offset {nul}): point "
                      f"data.{field} at text") from None
    offset = e.start + len(raw) - len(e.object)  # utf-8-sig reports past its stripped BOM
    raise UserError(
        f"data file '{path}' is not valid {encoding} (byte 0x{e.object[e.start]:02x} at "
        f"offset {offset}): set data.encoding to the file's encoding (e.g. "
        f"data.encoding='latin-1' or 'cp1252'), or convert the file to {encoding}") from None
  nul = text.find("\0")
  if nul >= 0:  # single-byte codecs (latin-1) decode anything, binary included
    offset = len(text[:nul].encode(encoding))
    raise UserError(f"data file '{path}' looks binary (NUL byte at offset {offset}): point "
                    f"data.{field} at text")
  # Universal newlines, as text-mode reading did before: \r\n and \r become \n.
  return text.replace("\r\n", "\n").replace("\r", "\n")


def text_documents(path: str, encoding: str = "utf-8",
                   field: str = "path") -> list[Document]:
  """A text file as one document, or every text file under a folder (sorted), decoded
  strictly with `encoding`; `field` ('path' or 'val_path') is the setting named in errors."""
  p = Path(path).expanduser()
  if not p.exists():
    raise UserError(f"data path {path!r} does not exist: set data.{field} to a text file or "
                    "a folder of text files")
  if p.is_file():
    files = [p]
  else:
    # Binary files in a folder (images, archives) are skipped; a file given directly is not.
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                   and _is_text(f, encoding))
    if not files:
      raise UserError(f"data path {path!r} holds no text files: point data.{field} at text")
  docs = [(str(f.relative_to(p)) if p.is_dir() else f.name,
           _read_text_file(f, encoding, field)) for f in files]
  if not any(text for _, text in docs):
    raise UserError(f"data path {path!r} holds only empty files: point data.{field} at text")
  return docs


def tfds_documents(name: str, split: str, text_key: str, data_dir: str | None) -> list[Document]:
  """A prepared tfds text dataset (no download at run time)."""
  docs = []
  for i, ex in enumerate(tfds_examples(name, split, data_dir)):
    if text_key not in ex:
      raise UserError(f"tfds dataset {name!r} has no feature {text_key!r}; its features are "
                      f"{sorted(ex)}: set data.tfds_text_key")
    value = ex[text_key]
    docs.append((f"{name}/{i}", value.decode("utf-8") if isinstance(value, bytes) else str(value)))
  return docs


def split_documents(docs: list[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
  """Deterministic split: by a hash of each document's name when there are several, else
  the last `val_fraction` of the single document's lines."""
  if len(docs) == 1:
    name, text = docs[0]
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, int(round(len(lines) * val_fraction)))
    if cut < 1:
      raise UserError(f"{name!r} has {len(lines)} line(s), too few to split into train and "
                      "validation: add text or set data.val_path")
    return [(name, "".join(lines[:cut]))], [(name + ":val", "".join(lines[cut:]))]
  bucket = lambda name: zlib.crc32(name.encode()) % 10_000 / 10_000
  train = [d for d in docs if bucket(d[0]) >= val_fraction]
  val = [d for d in docs if bucket(d[0]) < val_fraction]
  if not val or not train:  # tiny folders: fall back to a split by position
    k = max(1, int(round(len(docs) * val_fraction)))
    train, val = docs[:-k], docs[-k:]
  return train, val


def abc_tunes(folder: str = "", collections=(), strict: bool = False, fields=()) -> list:
  """ABC tunes (`aigc_jax.data.abc_corpus.Tune`, one normalised tune each): those of a
  user's `folder` of .abc files, else of music21's corpus (`collections` of it; () its
  three folk collections), duplicates removed; malformed tunes are skipped and counted
  in the log, or with `strict` refused with their file and line. `fields` ('M:6/8',
  'R:jig'): only the tunes whose header has them all (`abc_corpus.select_tunes`)."""
  from aigc_jax.data import abc_corpus
  if folder:
    tunes, report = abc_corpus.read_abc_folder(os.path.expanduser(folder), strict=strict)
  else:
    tunes, report = abc_corpus.load_abc_tunes(collections=list(collections) or None,
                                              strict=strict)
  logging.info("ABC tunes: %s", report)
  if not tunes:
    raise UserError(f"no readable ABC tunes in {folder or 'the corpus'} ({report})")
  if fields:
    tunes = abc_corpus.select_tunes(tunes, fields)
    if not tunes:
      raise UserError(f"no ABC tune in {folder or 'the corpus'} has the header fields "
                      f"{list(fields)}: check data.abc_fields against the tunes' headers")
  return tunes


def _tune_documents(tunes) -> list[Document]:
  return [(f"{t.collection}/{t.source}:{t.line}", t.text) for t in tunes]


def load_documents(data_cfg) -> tuple[list[Document], list[Document]]:
  """(train, val) documents for the `data` section of a run config."""
  name = data_cfg.name
  encoding = data_cfg.get("encoding", "utf-8")  # data sections built by hand may lack it
  if name == "abc":  # split by tune (a hash of its music), so no tune is in both
    from aigc_jax.data.abc_corpus import split_tunes
    fields = tuple(data_cfg.get("abc_fields", ()))
    tunes = abc_tunes(data_cfg.abc_path, data_cfg.abc_collections, data_cfg.abc_strict,
                      fields)
    if data_cfg.get("val_path"):
      return _tune_documents(tunes), _tune_documents(
          abc_tunes(data_cfg.val_path, strict=data_cfg.abc_strict, fields=fields))
    return tuple(map(_tune_documents, split_tunes(tunes, data_cfg.val_fraction)))
  if name == "chorales":  # split by melody, so no hymn tune is in both
    from aigc_jax.data import chorales
    found, report = chorales.load_chorales()
    logging.info("chorales: %s", report)
    return tuple([(f"chorales/{c.name}", chorales.to_events(c)) for c in part]
                 for part in chorales.split_chorales(found, data_cfg.val_fraction))
  if name == "stdlib":
    docs = stdlib_documents(data_cfg.get("limit_files", 0))
  elif name == "text":
    if not data_cfg.path:
      raise UserError("data.name='text' needs data.path: a text file or a folder of them")
    docs = text_documents(data_cfg.path, encoding)
  elif name == "tfds":
    docs = tfds_documents(data_cfg.tfds_name, data_cfg.tfds_split, data_cfg.tfds_text_key,
                          data_cfg.tfds_data_dir)
  else:
    raise UserError(f"data.name={name!r} is not a text source: use 'stdlib', 'text', 'tfds', "
                    "'abc' or 'chorales'")
  if data_cfg.get("val_path"):
    return docs, text_documents(data_cfg.val_path, encoding, "val_path")
  return split_documents(docs, data_cfg.val_fraction)


def tokenize_documents(tokenizer, docs: list[Document]) -> np.ndarray:
  """All documents as one id stream, each followed by end-of-sequence; uint16 when the
  vocabulary fits (halves host memory)."""
  texts = [text for _, text in docs]
  if hasattr(tokenizer, "encode_batch"):
    pieces = tokenizer.encode_batch(texts)
  else:
    pieces = [tokenizer.encode(t) for t in texts]
  eos = np.asarray([tokenizer.eos_id], np.int32)
  ids = np.concatenate([x for p in pieces for x in (p, eos)]) if pieces else eos[:0]
  return ids.astype(np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)


def corpus_size_bytes(docs: list[Document]) -> int:
  """The UTF-8 size of the documents' texts."""
  return sum(len(t.encode("utf-8")) for _, t in docs)


__all__ = ["load_documents", "split_documents", "stdlib_documents", "text_documents",
           "tokenize_documents", "corpus_size_bytes"]
