"""The event language of four-part chorales and its word tokenizer.

A chorale is four voices (soprano, alto, tenor, bass) of notes: onset and duration in
quarter lengths from the start of the piece, and a MIDI pitch. Its event text is one
line of words from a closed vocabulary (`WORDS`, 261 words), in time order:

  key:-1 meter:4/4 pickup:8 bar v:0 n:65 d:8 v:1 n:60 d:8 ... bar v:0 n:72 d:8 ...

- a header: `key:<sharps>` (-7..7), `meter:<n/d>` (one of `METERS`) and `pickup:<k>`,
  the length of a partial first bar in grid steps (0: the piece starts on a downbeat);
- `bar` at the start of every bar up to the last onset, empty bars included; after it
  the position is the bar's first step (in a pickup bar, the piece's start);
- `p:<k>`: a move to step k of the bar, written only when the next onset is elsewhere;
  positions are metric (p:24 in 4/4 is the fourth beat, in a pickup bar too);
- then each note starting there, voice by voice: `v:<0..3>` `n:<midi>` `d:<k>`; a
  duration over `MAX_DURATION` steps is `d:64` repeated, then the rest (`d:64 d:48`).

The grid is a 32nd note (`GRID` = 8 steps a quarter): every onset and duration in the
corpus lies on it (a few 32nd notes, no triplets). Rests are the gaps between a voice's
notes. `from_events` reads a text back exactly (`from_events(to_events(c)) == c`);
`read_events` reads model output, skipping and counting what does not fit.

`ChoraleTokenizer`: one id per word (fixed, not trained), id 0 the end of sequence.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from aigc_jax.data.tokenizers import EOS_TEXT
from aigc_jax.errors import UserError, did_you_mean
from aigc_jax.files import write_text

GRID = 8  # steps per quarter note: a 32nd note, the finest value in the chorales
METERS = ("2/2", "2/4", "3/2", "3/4", "4/4", "6/4", "6/8", "9/8", "12/8")
KEYS = range(-7, 8)
PITCHES = range(24, 97)  # C1..C7; the chorales use 36..81
MAX_DURATION = 64  # steps: two 4/4 bars; longer notes are a sum of d: words
MAX_BAR = 48  # steps of the longest bar in METERS (3/2, 6/4, 12/8)
WORDS = (tuple(f"key:{k}" for k in KEYS) + tuple(f"meter:{m}" for m in METERS)
         + tuple(f"pickup:{k}" for k in range(MAX_BAR)) + ("bar",)
         + tuple(f"p:{k}" for k in range(1, MAX_BAR)) + tuple(f"v:{v}" for v in range(4))
         + tuple(f"n:{p}" for p in PITCHES) + tuple(f"d:{k}" for k in range(1, MAX_DURATION + 1)))
_IDS = {w: i for i, w in enumerate(WORDS)}


@dataclass(frozen=True)
class Note:
  """A sounded note: onset and duration in quarter lengths, MIDI pitch."""

  onset: Fraction
  duration: Fraction
  pitch: int


@dataclass(frozen=True)
class Chorale:
  """Four voices (soprano, alto, tenor, bass) of notes sorted by onset; onsets count
  from the start of the piece, whose first bar is `pickup` quarters long when partial
  (0: a full first bar). `name` (the file, e.g. 'bwv1.6') is not content: equality
  compares the music only."""

  name: str = field(compare=False)
  key_sharps: int
  meter: str
  voices: tuple[tuple[Note, ...], ...]
  pickup: Fraction = Fraction(0)


def bar_steps(meter: str) -> int:
  """Grid steps in one bar of `meter` ('3/4' -> 24)."""
  num, den = (int(x) for x in meter.split("/"))
  return num * 4 * GRID // den


def _steps(value: Fraction, what: str) -> int:
  steps = value * GRID
  if steps.denominator != 1:
    raise UserError(f"{what} {value} is not on the grid of 1/{GRID} quarter")
  return int(steps)


# --- event text -------------------------------------------------------------------------
def to_events(chorale: Chorale) -> str:
  """The chorale's event text (see the module doc); raises UserError for a chorale the
  vocabulary cannot spell (meter, key, pitch or grid outside it, overlapping notes)."""
  if (chorale.meter not in METERS or chorale.key_sharps not in KEYS
      or len(chorale.voices) != 4):
    raise UserError(f"{chorale.name}: meter {chorale.meter}, key {chorale.key_sharps} "
                    f"or {len(chorale.voices)} voices: outside the event vocabulary")
  bar_len, pickup = bar_steps(chorale.meter), _steps(chorale.pickup, "pickup")
  if not 0 <= pickup < bar_len:
    raise UserError(f"{chorale.name}: pickup {chorale.pickup} is not shorter than a bar")
  shift = bar_len - pickup if pickup else 0  # metric step of the piece's start
  events = []
  for v, voice in enumerate(chorale.voices):
    end = 0
    for note in voice:
      onset, duration = _steps(note.onset, "onset"), _steps(note.duration, "duration")
      if onset < end or duration <= 0 or note.pitch not in PITCHES:
        raise UserError(f"{chorale.name}: voice {v} note {note} overlaps the one before, "
                        "is empty or has a pitch outside the vocabulary")
      end = onset + duration
      events.append((onset + shift, v, note.pitch, duration))
  words = [f"key:{chorale.key_sharps}", f"meter:{chorale.meter}", f"pickup:{pickup}"]
  bar, pos = -1, 0
  for step, v, pitch, duration in sorted(events):
    b, k = divmod(step, bar_len)
    while bar < b:  # every bar up to this one, empty ones too
      bar += 1
      words.append("bar")
      pos = shift if bar == 0 else 0
    if k != pos:
      words.append(f"p:{k}")
      pos = k
    words += [f"v:{v}", f"n:{pitch}"]
    words += [f"d:{MAX_DURATION}"] * ((duration - 1) // MAX_DURATION)
    words.append(f"d:{(duration - 1) % MAX_DURATION + 1}")
  return " ".join(words)


_WORD = re.compile(r"(key|meter|pickup|p|v|n|d):(\S+)|bar")
_HEADER = ("key", "meter", "pickup")


class _Skip(Exception):
  """Words [at, at + n) do not fit: `reason` counts them, `message` says why, word
  at + `culprit` is the one to blame."""

  def __init__(self, reason: str, message: str, n: int = 1, culprit: int = 0):
    super().__init__(message)
    self.reason, self.n, self.culprit = reason, n, culprit


def _parse(text: str, strict: bool, name: str = "") -> tuple[Chorale, dict]:
  """The chorale an event text spells, and the words skipped (strict: raise instead)."""
  words = text.split()
  skipped: Counter = Counter()
  header: dict = {}
  voices: list[list[Note]] = [[], [], [], []]
  ends = [0, 0, 0, 0]  # step where each voice's last note ends
  bar, pos, last_voice, bar_len, shift = -1, 0, -1, 0, 0

  def value(j: int, kind: str):
    """The value of words[j] if it is a vocabulary word `kind`:<value>, else None."""
    if j >= len(words) or words[j] not in _IDS:
      return None
    m = _WORD.fullmatch(words[j])
    if not m or m.group(1) != kind:
      return None
    return m.group(2) if kind == "meter" else int(m.group(2))

  def settle_header() -> tuple[int, int]:
    """(steps a bar, metric step of the piece's start), missing header words defaulted."""
    bar_len = bar_steps(header.setdefault("meter", "4/4"))
    header.setdefault("key", 0)
    if header.setdefault("pickup", 0) >= bar_len:
      if strict:  # the pickup word is word 2
        raise UserError(f"event word 2 {words[2]!r}: the pickup is not shorter than a "
                        f"bar ({bar_len} steps)")
      skipped["pickup"] += 1
      header["pickup"] = 0
    return bar_len, (bar_len - header["pickup"] if header["pickup"] else 0)

  i = 0
  while i < len(words):
    word, at = words[i], i
    m = _WORD.fullmatch(word) if word in _IDS else None
    kind = m.group(1) if m else None
    i += 1
    try:
      if word == EOS_TEXT and not strict:  # generated text: the chorale ends here
        skipped["after_end"] += len(words) - i
        break
      if m is None:
        raise _Skip("unknown", "not an event word")
      if kind in _HEADER:
        if bar >= 0 or kind in header or (strict and at != _HEADER.index(kind)):
          raise _Skip("header", "the header is key:, meter:, pickup: once each, in this "
                      "order, before the first bar")
        header[kind] = value(at, kind)
        continue
      if bar < 0 and (word != "bar" or (strict and len(header) < 3)):
        raise _Skip("before_bar", "music must start with a bar word after the header "
                    "key:, meter:, pickup:")
      if word == "bar":
        if bar < 0:
          bar_len, shift = settle_header()
        bar, pos, last_voice = bar + 1, (shift if bar < 0 else 0), -1
      elif kind == "p":
        k = int(m.group(2))
        if not pos < k < bar_len:
          raise _Skip("position", f"position {k} is not after {pos} in a bar of {bar_len}")
        pos, last_voice = k, -1
      elif kind == "v":
        v, pitch = int(m.group(2)), value(i, "n")
        if pitch is None:
          raise _Skip("note", "a voice word v: is not followed by a pitch n:<midi>",
                      culprit=1)
        duration, j = 0, i + 1
        while (d := value(j, "d")) is not None:
          duration, j = duration + d, j + 1
          if d != MAX_DURATION:  # d:64 may go on, any other duration ends the note
            break
        if duration == 0:
          raise _Skip("note", "a note's pitch n: is not followed by its duration "
                      "d:<steps>", 2, culprit=2)
        onset = bar * bar_len + pos - shift
        if v <= last_voice:
          raise _Skip("voice_order", f"voice {v} after voice {last_voice} at one onset",
                      j - at)
        if onset < ends[v]:
          raise _Skip("overlap", f"the note overlaps the one before it in voice {v}",
                      j - at)
        voices[v].append(Note(Fraction(onset, GRID), Fraction(duration, GRID), pitch))
        ends[v], last_voice, i = onset + duration, v, j
      else:
        raise _Skip("stray", f"a {kind}: word outside a note v:<voice> n:<midi> d:<steps>")
    except _Skip as e:
      if strict:
        j = at + e.culprit
        what = repr(words[j]) if j < len(words) else "(the end)"
        raise UserError(f"event word {j} {what}: {e}") from None
      skipped[e.reason] += e.n
      i = at + e.n
  if strict and len(header) < 3:
    raise UserError(f"event word {len(words)}: the text ends inside its header")
  if bar < 0:  # a header alone, or not even that
    settle_header()
  chorale = Chorale(name, header["key"], header["meter"], tuple(map(tuple, voices)),
                    Fraction(header["pickup"], GRID))
  report = {"words": len(words), "notes": sum(map(len, voices)),
            "skipped": sum(skipped.values()), "reasons": dict(skipped)}
  return chorale, report


def from_events(text: str, strict: bool = True, name: str = "") -> Chorale:
  """The chorale an event text spells. strict: a word out of place raises UserError
  naming its index and the problem; else such words are skipped (see `read_events`)."""
  return _parse(text, strict, name)[0]


def read_events(text: str, name: str = "") -> tuple[Chorale, dict]:
  """(chorale, report) of any text (model output): malformed, out-of-order or
  overlapping words are skipped, never raised; reading stops at an end-of-sequence
  word. report: words, notes kept, skipped words and a count per kind of problem."""
  return _parse(text, False, name)


# --- tokenizer ----------------------------------------------------------------------------
class ChoraleTokenizer:
  """One id per event word: 0 is end of sequence (the LM pipeline's document separator;
  no BOS or padding id, as in the other tokenizers), 1.. the words. The vocabulary is
  the closed word set (`WORDS`), not trained; a saved tokenizer keeps its word list, so
  its ids stay the same whatever a later version of this module adds."""

  kind = "chorale"
  eos_id = 0

  def __init__(self, words: Iterable[str] = WORDS):
    self.words = list(words)
    self._ids = {w: i for i, w in enumerate(self.words, 1)}
    if len(self._ids) != len(self.words) or any(not w or w.split() != [w]
                                                for w in self.words):
      raise UserError("a chorale tokenizer's words must be distinct, non-empty and "
                      "without whitespace")
    self._ids[EOS_TEXT] = self.eos_id
    self.vocab_size = len(self.words) + 1
    self._names = [EOS_TEXT, *self.words]

  @classmethod
  def load(cls, path: str) -> ChoraleTokenizer:
    """The tokenizer saved by `save` (its tokenizer.json, or the folder holding it)."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read a chorale tokenizer from {path}: {e}") from e
    if not isinstance(saved, dict) or saved.get("kind") != cls.kind or not isinstance(
        saved.get("words"), list):
      kind = saved.get("kind") if isinstance(saved, dict) else None
      raise UserError(f"{path} is not a chorale tokenizer (kind {kind!r})")
    return cls(saved["words"])

  def save(self, directory: str) -> None:
    """Writes tokenizer.json into `directory` (atomically)."""
    saved = {"kind": self.kind, "version": 1, "words": self.words}
    write_text(os.path.join(directory, "tokenizer.json"), json.dumps(saved) + "\n")

  def encode(self, text: str) -> np.ndarray:
    """Event text -> ids [N] int32, one per whitespace-separated word (EOS_TEXT is the
    end-of-sequence id); a word outside the vocabulary raises UserError naming it."""
    words = text.split()
    try:
      return np.asarray([self._ids[w] for w in words], np.int32)
    except KeyError:
      at = next(i for i, w in enumerate(words) if w not in self._ids)
      raise UserError(f"word {at} {words[at]!r} is not a chorale event word"
                      f"{did_you_mean(words[at], self.words)}") from None

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """texts -> one ids array [N_i] int32 per text."""
    return [self.encode(t) for t in texts]

  def tokens(self, ids: Iterable[int]) -> list[str]:
    """Each id [N] as its word (end of sequence as EOS_TEXT); out-of-range ids dropped."""
    names = self._names
    flat = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    return [names[i] for i in flat.tolist() if 0 <= i < len(names)]

  def decode(self, ids: Iterable[int]) -> str:
    """ids [N] -> the words joined by single spaces (end of sequence as EOS_TEXT, which
    `read_events` stops at); decode(encode(t)) == t for every canonical event text."""
    return " ".join(self.tokens(ids))

  def token_byte_lengths(self) -> np.ndarray:
    """[V] int32: UTF-8 bytes of each word plus its separating space; end of sequence
    counts 0, since the last word's space already stands for the separator. A document
    of N bytes then counts N + 1 bytes with its end of sequence, as with ByteTokenizer,
    so bits per byte compare across tokenizers."""
    return np.asarray([0] + [len(w.encode("utf-8")) + 1 for w in self.words], np.int32)
