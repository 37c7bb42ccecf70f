"""Bach's four-part chorales from music21's corpus, for the text LM (event texts and
their tokenizer: `aigc_jax.data.chorale_tokenizer`, re-exported here).

What is kept of a score: the parts named Soprano, Alto, Tenor and Bass (the first word
of the part's name, so 'Bass Continuo' is the bass; instrument parts such as horns,
trumpets or continuo are dropped; four unnamed parts, as in the Humdrum files, are taken
top to bottom), tied notes merged into one sounded note, grace notes dropped, a chord in
a voice (none in the corpus) read as its top note, rests left as gaps. Repeats are read
as written (not expanded). A chorale is skipped, and counted, when its parts are not
one each of S, A, T, B, its meter changes, it bars irregularly, it leaves the grid or
the pitch range, or it repeats notes (or a file name) kept before.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from aigc_jax.data.chorale_tokenizer import (  # noqa: F401 (re-exported)
    GRID,
    METERS,
    PITCHES,
    WORDS,
    Chorale,
    ChoraleTokenizer,
    Note,
    bar_steps,
    from_events,
    read_events,
    to_events,
)
from aigc_jax.errors import UserError
from aigc_jax.files import write_text

VOICES = ("soprano", "alto", "tenor", "bass")
CACHE_ENV = "AIGC_JAX_CACHE"
CACHE_VERSION = 1
SKIP_REASONS = ("parse_error", "not_satb", "meter_or_key", "meter_change", "irregular_bars",
                "off_grid", "pitch_range", "overlap", "duplicate")
_SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".krn")  # preferred first among twins


# --- the corpus -------------------------------------------------------------------------
def corpus_paths() -> list[str]:
  """music21's Bach scores (MusicXML and Humdrum; its roman-numeral analyses are not
  music), sorted by name, MusicXML before Humdrum twins so that dedup keeps it."""
  from music21 import corpus  # slow to import: only when parsing

  paths = [str(p) for p in corpus.getComposer("bach") if p.suffix in _SCORE_SUFFIXES]
  return sorted(paths, key=lambda p: (_name(p), _SCORE_SUFFIXES.index(_suffix(p))))


def _name(path: str) -> str:
  return os.path.basename(path)[: -len(_suffix(path))]


def _suffix(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def _role(part) -> str | None:
  """'soprano', 'alto', 'tenor', 'bass' from the first word of a part's name or id
  ('Bass Continuo' is the bass, 'Soprano 1' a soprano, 'Bassoon' nothing)."""
  for label in (part.partName, part.id):
    m = re.match(r"[a-z]+", str(label or "").lower())
    if m and m.group(0) in VOICES:
      return m.group(0)
  return None


def _read_voice(part, dropped: Counter) -> list[Note]:
  """A part's sounded notes: ties merged, grace notes dropped, a chord's top note."""
  notes: list[Note] = []
  for n in part.flatten().notes:
    if n.duration.isGrace or n.duration.quarterLength == 0:
      dropped["grace_notes"] += 1
      continue
    if len(n.pitches) > 1:
      dropped["chord_notes"] += len(n.pitches) - 1
    onset, duration = Fraction(n.offset), Fraction(n.duration.quarterLength)
    pitch = max(p.midi for p in n.pitches)
    last = notes[-1] if notes else None
    if n.tie is not None and n.tie.type in ("stop", "continue"):
      if last and last.pitch == pitch and last.onset + last.duration == onset:
        notes[-1] = Note(last.onset, last.duration + duration, pitch)
        continue
      dropped["unmatched_ties"] += 1  # sounded anew
    notes.append(Note(onset, duration, pitch))
  return notes


def _read_score(path: str, dropped: Counter) -> Chorale | str:
  """The chorale in one score file, or why it is skipped (one of SKIP_REASONS); what
  was dropped of it is added to `dropped`."""
  from music21 import converter

  try:  # music21's own pickle cache is left alone: load_chorales caches the result
    reader = converter.Converter()
    reader.parseFile(path, forceSource=True, storePickle=False)
    parts = list(reader.stream.parts)
  except Exception:  # music21 raises many types on a bad file
    return "parse_error"
  roles = [_role(p) for p in parts]
  if len(parts) == 4 and roles == [None] * 4:  # unnamed (Humdrum spines): top to bottom
    chosen = parts
  elif sorted(r for r in roles if r) == sorted(VOICES):
    chosen = [parts[roles.index(v)] for v in VOICES]
  else:
    return "not_satb"
  meters = {ts.ratioString for p in chosen for ts in p.recurse().getElementsByClass(
      "TimeSignature")}
  if len(meters) > 1:
    return "meter_change"
  meter = meters.pop() if meters else ""
  keys = list(chosen[0].recurse().getElementsByClass("KeySignature"))
  key_sharps = keys[0].sharps if keys else 0  # the first, should a later one differ
  if meter not in METERS or not -7 <= key_sharps <= 7:
    return "meter_or_key"
  measures = list(chosen[0].getElementsByClass("Measure"))
  first = Fraction(measures[0].duration.quarterLength) if measures else Fraction(0)
  bar = Fraction(bar_steps(meter), GRID)
  pickup = first if 0 < first < bar else Fraction(0)  # a short first bar: an anacrusis
  shift = bar - pickup if pickup else 0
  # Bar words fall on a regular grid from the first bar line; a few scores bar
  # irregularly (a lone short or long bar mid-piece) and would read a beat out of step.
  # Split bars (3 + 1 beats around a repeat sign) are fine: they add up to whole bars.
  if any(Fraction(m.duration.quarterLength) > bar or (
      Fraction(m.duration.quarterLength) == bar and (Fraction(m.offset) + shift) % bar)
         for m in measures):
    return "irregular_bars"
  found = Counter()
  voices = tuple(tuple(_read_voice(p, found)) for p in chosen)
  notes = [n for v in voices for n in v]
  if any((x * GRID).denominator != 1 for n in notes for x in (n.onset, n.duration)) or (
      pickup * GRID).denominator != 1:
    return "off_grid"
  if any(n.pitch not in PITCHES for n in notes):
    return "pitch_range"
  if any(b.onset < a.onset + a.duration
         for v in voices for a, b in zip(v, v[1:], strict=False)):
    return "overlap"  # two voices within one part
  means = [np.mean([n.pitch for n in v]) if v else 0 for v in voices]
  if chosen is parts and means != sorted(means, reverse=True):
    return "not_satb"  # unnamed parts that are not in S, A, T, B order
  dropped.update(found)
  dropped["instrument_parts"] += len(parts) - 4
  return Chorale(_name(path), key_sharps, meter, voices, pickup)


def _parse_corpus(paths: Sequence[str]) -> tuple[list[Chorale], dict]:
  """The chorales of `paths` in order, the first of identical ones kept; the report."""
  start = time.perf_counter()
  chorales, seen = [], set()
  skipped, dropped = dict.fromkeys(SKIP_REASONS, 0), Counter()
  for path in paths:
    found = Counter()
    chorale = _read_score(path, found)
    if isinstance(chorale, Chorale):
      # The same notes, or the same chorale in another format (the Humdrum twins of
      # three MusicXML files differ from them in places): the first kept.
      keys = (to_events(chorale), chorale.name)
      if seen.intersection(keys):
        chorale = "duplicate"
      seen.update(keys)
    if isinstance(chorale, str):
      skipped[chorale] += 1
      continue
    chorales.append(chorale)
    dropped.update(found)
  report = {"read": len(paths), "kept": len(chorales), "skipped": skipped,
            "dropped": {k: dropped[k] for k in ("instrument_parts", "grace_notes",
                                                "chord_notes", "unmatched_ties")},
            "parse_seconds": round(time.perf_counter() - start, 1)}
  return chorales, report


def cache_path(paths: Sequence[str] | None = None) -> str:
  """Where `load_chorales(paths)` caches: $AIGC_JAX_CACHE, else ~/.cache/aigc_jax; the
  corpus as chorales-v1.json, other file lists under a name hashed from their paths."""
  folder = os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/aigc_jax")
  tag = "" if paths is None else "-" + hashlib.sha256(
      "\0".join(os.path.abspath(p) for p in paths).encode()).hexdigest()[:12]
  return os.path.join(folder, f"chorales-v{CACHE_VERSION}{tag}.json")


def _music21_version() -> str:
  try:
    return importlib.metadata.version("music21")
  except importlib.metadata.PackageNotFoundError:
    return ""


def _read_cache(path: str) -> tuple[list[Chorale], dict] | None:
  """The cached chorales, or None when the file is missing, stale or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if (saved["version"], saved["grid"], saved["music21"]) != (
        CACHE_VERSION, GRID, _music21_version()):
      return None
    chorales = []
    q = functools.lru_cache(maxsize=None)(lambda steps: Fraction(steps, GRID))  # 3x faster
    for name, key, meter, pickup, voices in saved["chorales"]:
      if len(voices) != 4 or meter not in METERS or not all(map(_valid_steps, voices)):
        raise ValueError(f"chorale {name!r} is not four voices of notes in {meter!r}")
      chorales.append(Chorale(str(name), int(key), meter, tuple(
          tuple(Note(q(o), q(d), int(p))
                for o, d, p in zip(v[::3], v[1::3], v[2::3], strict=True)) for v in voices),
          q(pickup)))
    return chorales, dict(saved["report"])
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
    logging.warning("chorale cache %s unreadable (%s): parsing the corpus again", path, e)
    return None


def _valid_steps(voice: list) -> bool:
  """Whether flat [onset, duration, pitch, ...] steps are notes in order, none overlapping
  (what to_events needs; cheaper than it)."""
  end = 0
  for onset, duration, pitch in zip(voice[::3], voice[1::3], voice[2::3], strict=True):
    if not (type(onset) is type(duration) is int and onset >= end and duration > 0
            and pitch in PITCHES):
      return False
    end = onset + duration
  return True


def _write_cache(path: str, chorales: list[Chorale], report: dict) -> None:
  """Notes as flat [onset, duration, pitch, ...] lists in grid steps per voice."""
  rows = [[c.name, c.key_sharps, c.meter, int(c.pickup * GRID),
           [[int(x) for n in v for x in (n.onset * GRID, n.duration * GRID, n.pitch)]
            for v in c.voices]] for c in chorales]
  saved = {"version": CACHE_VERSION, "music21": _music21_version(), "grid": GRID,
           "report": report, "chorales": rows}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, json.dumps(saved, separators=(",", ":")) + "\n")
  except OSError as e:  # a read-only home: parse again next time
    logging.warning("cannot write the chorale cache %s: %s", path, e)


def load_chorales(paths: Sequence[str] | None = None, cache: bool = True,
                  ) -> tuple[list[Chorale], dict]:
  """(chorales, report) of music21's Bach chorales (or of the score files `paths`), as
  the module doc says; cached as JSON (`cache_path`) since parsing takes half a
  minute; a stale or corrupt cache is rebuilt. report: files read, chorales kept,
  skipped per reason, what was dropped of kept ones, parse_seconds, source
  ('cache' or 'parsed')."""
  path = cache_path(paths)
  found = _read_cache(path) if cache else None
  if found is not None:
    return found[0], {**found[1], "source": "cache"}
  try:
    chorales, report = _parse_corpus(corpus_paths() if paths is None else paths)
  except ImportError as e:
    raise UserError("reading the chorales needs the `music21` package: pip install "
                    "music21 (or pip install 'aigc_jax[music]')") from e
  if cache:
    _write_cache(path, chorales, report)
  return chorales, {**report, "source": "parsed"}


# --- split and arrays ---------------------------------------------------------------------
def melody_key(chorale: Chorale) -> str:
  """The soprano's pitches relative to its first: the same for every harmonisation of a
  hymn tune in any key (Bach set many tunes several times)."""
  sop = chorale.voices[0]
  return " ".join(str(n.pitch - sop[0].pitch) for n in sop) if sop else ""


def split_chorales(chorales: Sequence[Chorale], val_fraction: float = 0.1, seed: int = 0,
                   by: str = "melody") -> tuple[list[Chorale], list[Chorale]]:
  """(train, validation), deterministic, order kept: a hash of each chorale's melody
  (`melody_key`; by='content': its whole event text) and `seed` decides, so all
  settings of one tune land on one side and adding chorales never moves the others."""
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
  if by not in ("melody", "content"):
    raise UserError(f"split_chorales by={by!r}: use 'melody' or 'content'")
  key = melody_key if by == "melody" else to_events
  flags = [int.from_bytes(hashlib.sha256(f"{seed}\0{key(c)}".encode()).digest()[:8], "big")
           < val_fraction * 2.0 ** 64 for c in chorales]
  train = [c for c, v in zip(chorales, flags, strict=True) if not v]
  return train, [c for c, v in zip(chorales, flags, strict=True) if v]


def chorale_events(chorale: Chorale) -> np.ndarray:
  """[N, 4] float64 rows (onset, duration, pitch, voice), onsets and durations in
  quarter lengths, sorted by onset then voice (0 soprano .. 3 bass)."""
  rows = sorted((float(n.onset), v, float(n.duration), n.pitch)
                for v, voice in enumerate(chorale.voices) for n in voice)
  out = np.asarray([(o, d, p, v) for o, v, d, p in rows], np.float64)
  return out.reshape(-1, 4)
