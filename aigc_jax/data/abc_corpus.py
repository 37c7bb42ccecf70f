"""ABC folk tunes read offline: the collections that the `music21` package ships in
`music21/corpus/` (essenFolksong, oneills1850, ryansMammoth: about 11,600 tunes), or any
folder of `.abc` files; duplicates removed and a deterministic train/validation split by
tune.

The corpus folder is, in order: the `root` argument, the environment variable
`AIGC_JAX_ABC_CORPUS` (a folder searched recursively for *.abc), or music21's corpus
(found without importing music21, which is slow to import).

What a tune is and how its text is normalised: see `aigc_jax.data.abc_text`. In short,
each text starts `X:1`, header fields read `F:value`, bibliographic header fields (notes,
source, transcriber...) are left out of the text (kept in `Tune.fields`), lines lose
trailing whitespace and the text ends with a newline. Field lines of a file header
(before the first `X:`) are kept only where a tune needs them: a field the tune lacks
(e.g. `L:` or `M:`) is copied into its header; nothing else outside tunes is kept (the
music21 collections have no file headers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from aigc_jax.data.abc_text import TEXT_FIELDS, decode_abc, parse_tune, split_abc, tune_body
from aigc_jax.errors import UserError

ENV_VAR = "AIGC_JAX_ABC_CORPUS"
DEFAULT_COLLECTIONS = ("essenFolksong", "oneills1850", "ryansMammoth")
REASONS = ("no_key", "no_body", "duplicate")
_INSTALL = ("the ABC corpus comes with the `music21` package: pip install music21 "
            "(or pip install 'aigc_jax[music]'), or set AIGC_JAX_ABC_CORPUS to a folder "
            "of .abc files")


@dataclass(frozen=True)
class Tune:
  """One tune: its collection, where it came from, its normalised text (what is
  tokenized) and its header fields (`M` meter, `K` key, `L` unit note length, `R`
  rhythm, `T` title, ... ; a repeated field's values joined by newlines; `X` is the
  number in the file, while `text` always reads `X:1`)."""

  collection: str
  source: str  # path relative to the corpus root, '/'-separated
  line: int  # line of its X: in `source`
  text: str
  fields: dict[str, str] = field(hash=False)
  music_id: str  # equal for duplicates (see abc_text.music_key)

  @property
  def body(self) -> str:
    """The music: the text after the header's `K:` line."""
    return tune_body(self.text)


@dataclass
class SkipReport:
  """Tunes found, kept and skipped (per collection and reason: 'no_key', 'no_body',
  'duplicate'), and non-blank lines outside any tune (ignored free text)."""

  found: dict[str, int] = field(default_factory=dict)
  kept: dict[str, int] = field(default_factory=dict)
  skipped: dict[str, dict[str, int]] = field(default_factory=dict)
  stray_lines: dict[str, int] = field(default_factory=dict)

  def count(self, reason: str, collection: str | None = None) -> int:
    """Tunes skipped for `reason`, in one collection or in all."""
    names = [collection] if collection else list(self.skipped)
    return sum(self.skipped.get(n, {}).get(reason, 0) for n in names)

  def by_reason(self) -> dict[str, int]:
    """Skipped tunes per reason over all collections."""
    return {r: self.count(r) for r in REASONS}

  def _add(self, collection: str, reason: str) -> None:
    self.skipped.setdefault(collection, dict.fromkeys(REASONS, 0))[reason] += 1

  def __str__(self) -> str:
    parts = []
    for c, n in self.found.items():
      why = ", ".join(f"{r} {k}" for r, k in self.skipped.get(c, {}).items() if k)
      parts.append(f"{c}: {self.kept.get(c, 0)} of {n} kept" + (f" ({why})" if why else ""))
    return "; ".join(parts)


def music21_corpus_root() -> str:
  """music21's corpus folder, found without importing music21."""
  spec = importlib.util.find_spec("music21")
  locations = list(spec.submodule_search_locations or []) if spec else []
  for location in locations:
    path = os.path.join(location, "corpus")
    if os.path.isdir(path):
      return path
  raise UserError(f"music21 is not installed or has no corpus folder: {_INSTALL}")


def corpus_root(root: str | None = None) -> tuple[str, bool]:
  """(the corpus folder, whether it is music21's): `root`, else $AIGC_JAX_ABC_CORPUS,
  else music21's corpus."""
  chosen = root or os.environ.get(ENV_VAR) or None
  if chosen is None:
    return music21_corpus_root(), True
  origin = "root" if root else f"${ENV_VAR}"
  if not os.path.isdir(chosen):
    raise UserError(f"ABC corpus folder {chosen!r} (from {origin}) is not a folder")
  return chosen, False


def abc_files(folder: str) -> list[str]:
  """Every *.abc file under `folder` (recursively), sorted, as paths relative to it."""
  found = []
  for parent, dirs, files in os.walk(folder):
    dirs.sort()
    rel = os.path.relpath(parent, folder)
    found += [os.path.normpath(os.path.join(rel, f)) for f in sorted(files)
              if f.lower().endswith(".abc")]
  return sorted(p.replace(os.sep, "/") for p in found)


def _collections_of(root: str, files: list[str]) -> dict[str, list[str]]:
  """Files grouped by collection: the first folder under `root`; files directly in
  `root` form the collection named after `root` itself."""
  own = os.path.basename(os.path.abspath(root))
  groups: dict[str, list[str]] = {}
  for path in files:
    groups.setdefault(path.split("/", 1)[0] if "/" in path else own, []).append(path)
  return groups


def _read_files(root: str, groups: dict[str, list[str]], strict: bool, dedup: bool,
                text_fields: str | None) -> tuple[list[Tune], SkipReport]:
  """Tunes of every file, collection by collection in `groups`' order; the first of
  each set of duplicates kept."""
  report, seen, tunes = SkipReport(), set(), []
  for collection, paths in groups.items():
    report.found[collection] = report.kept[collection] = report.stray_lines[collection] = 0
    report.skipped[collection] = dict.fromkeys(REASONS, 0)
    for rel in paths:
      path = os.path.join(root, rel)
      try:
        with open(path, "rb") as f:
          data = f.read()
      except OSError as e:
        raise UserError(f"cannot read ABC file {path}: {e}") from e
      header, pieces, stray = split_abc(decode_abc(data))
      report.stray_lines[collection] += stray
      for piece in pieces:
        report.found[collection] += 1
        parsed = parse_tune(piece, header, text_fields)
        if isinstance(parsed, tuple):
          reason, line = parsed
          if strict:
            what = "no K: (key) field" if reason == "no_key" else "no music after K:"
            raise UserError(f"{path}:{line}: malformed ABC tune ({what}); fix or remove "
                            "it, or read with strict=False to skip it")
          report._add(collection, reason)
          continue
        if dedup and parsed.music_id in seen:
          report._add(collection, "duplicate")
          continue
        seen.add(parsed.music_id)
        report.kept[collection] += 1
        tunes.append(Tune(collection, rel, piece.line, parsed.text, parsed.fields,
                          parsed.music_id))
  return tunes, report


def load_abc_tunes(root: str | None = None, collections: Sequence[str] | None = None,
                   strict: bool = False, text_fields: str | None = TEXT_FIELDS,
                   ) -> tuple[list[Tune], SkipReport]:
  """The corpus's tunes, duplicates removed (the first in collection order kept), and
  what was skipped. `collections`: the folders under the root to read, in this order;
  by default music21's three folk collections, or every folder of an overridden root
  (sorted; files directly in it form a collection named after it). `strict`: a
  malformed tune raises a UserError naming its file and line instead of being skipped.
  `text_fields`: the header fields a tune's text keeps (None: all; see
  abc_text.parse_tune); every field is in `Tune.fields` either way."""
  folder, is_music21 = corpus_root(root)
  groups = _collections_of(folder, abc_files(folder))
  if collections is None:
    collections = DEFAULT_COLLECTIONS if is_music21 else sorted(groups)
  missing = [c for c in collections if c not in groups]
  if missing:
    raise UserError(f"no .abc files for collection(s) {missing} under {folder}; "
                    f"found: {sorted(groups)}")
  return _read_files(folder, {c: groups[c] for c in collections}, strict, True, text_fields)


def read_abc_folder(folder: str, collection: str | None = None, strict: bool = False,
                    dedup: bool = True, text_fields: str | None = TEXT_FIELDS,
                    ) -> tuple[list[Tune], SkipReport]:
  """The tunes of every *.abc file under a user's `folder` (recursively, sorted by
  path), read like the corpus: malformed tunes skipped and counted, or with `strict`
  refused with their path and line. All belong to `collection` (default: the folder's
  name); sources are relative to `folder`."""
  if not os.path.isdir(folder):
    raise UserError(f"ABC folder {folder!r} is not a folder")
  files = abc_files(folder)
  if not files:
    raise UserError(f"no .abc files under {folder!r}")
  name = collection or os.path.basename(os.path.abspath(folder))
  return _read_files(folder, {name: files}, strict, dedup, text_fields)


def in_validation(tune: Tune, validation_fraction: float = 0.05, seed: int = 0) -> bool:
  """Whether `tune` belongs to validation: a hash of its music (and `seed`) decides, so
  duplicates land together and adding tunes never moves the others."""
  digest = hashlib.sha256(f"{seed}\0{tune.music_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < validation_fraction * 2.0 ** 64


def split_tunes(tunes: Sequence[Tune], validation_fraction: float = 0.05,
                seed: int = 0) -> tuple[list[Tune], list[Tune]]:
  """(train, validation) by tune, deterministic, order kept (see `in_validation`)."""
  if not 0.0 <= validation_fraction < 1.0:
    raise UserError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
  flags = [in_validation(t, validation_fraction, seed) for t in tunes]
  train = [t for t, v in zip(tunes, flags, strict=True) if not v]
  return train, [t for t, v in zip(tunes, flags, strict=True) if v]


def select_tunes(tunes: Sequence[Tune], fields: Sequence[str]) -> list[Tune]:
  """The tunes whose header has every one of `fields` ('M:6/8', 'R:jig'; values compared
  without case or surrounding spaces; a repeated field matches on any of its values):
  one tune type or one meter of a collection."""
  wanted = []
  for item in fields:
    name, sep, value = str(item).partition(":")
    if not (sep and len(name) == 1 and name.isalpha() and value.strip()):
      raise UserError(f"ABC field filter {item!r} is not 'F:value' (e.g. 'M:6/8', 'R:jig')")
    wanted.append((name, value.strip().lower()))
  values = lambda t, name: {v.strip().lower() for v in t.fields.get(name, "").split("\n")}
  return [t for t in tunes if all(v in values(t, name) for name, v in wanted)]

