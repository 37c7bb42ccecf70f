"""A tokenizer for ABC music notation whose tokens are ABC's own units, with a byte
fallback so that decode(encode(text)) == text for every str.

Ids: 0..255 are the UTF-8 bytes (the fallback, as in ByteTokenizer), 256 is end of
sequence (the LM pipeline's document separator; like the other tokenizers there is no
BOS or padding id), 257.. the units learned from training tunes.

Text is cut into units by one compiled regex (`UNIT`; the first alternative that matches):

- a field line's name `K:` (at a line start), then its whole value up to the end of the
  line or a `%` (`6/8`, `Dmix`, `Romanze, Ballade, Lied`);
- a comment `%...` to the end of the line; a chord symbol or annotation `"Am"`;
- an inline field `[K:Dmix]`; a decoration `!trill!` or `+trill+`; a tuplet `(3`, `(3:2:3`;
- a bar line or repeat with its ending number (`|` `||` `|]` `[|` `|:` `:|` `::` `|1`
  `:|2` `[1` `[2`) together with ONE space on each side if there (` | `): a bar line
  breaks a beam anyway, so those spaces say nothing more, and folding them in saves
  about a token per bar;
- a note event: accidental (`^ ^^ _ __ =`), letter, octave marks (`'` `,` runs) and its
  duration (`2` `3/2` `/` `/2` `//`) as ONE unit (`^F,2`, `c'/2`; a rest `z2` likewise);
  a duration after anything else (`]3/2`) is its own unit, so the chord `[CEG]3/2` is
  `[` `C` `E` `G` `]` `3/2`;
- a run of spaces (other spaces break beams: they are music), a run of tabs;
- any other single character: a newline, `(` `)` slurs, `-` ties, `>` `<` broken
  rhythm, `{` `}` grace notes, `~` `.` `T` decorations, `\\` continuation, ...

The vocabulary holds the units seen at least `min_count` times in the training tunes
(a few hundred note events, bar and duration forms, frequent field values and words).
A unit outside it is cut one step finer (`split_unit`): a music unit into its note,
bar, duration and spaces (`^^c'3` -> `^^c'` `3`), any other unit (a rare title) into
words, digit runs and single characters; a part outside the vocabulary into characters;
a character outside it into its UTF-8 bytes. Parts and characters of rare units are
learned by the same count, so rare notes still read as notes, rare titles as words.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from aigc_jax.data.tokenizers import EOS_TEXT
from aigc_jax.errors import UserError
from aigc_jax.files import write_text

N_BYTES = 256
EOS_ID = N_BYTES
FIRST_UNIT_ID = N_BYTES + 1

_NOTE = r"(?:\^\^?|__?|=)?[A-Ga-g][,']*"  # accidental, letter, octave marks
_DURATION = r"(?:\d+(?:/+\d*)?|/+\d*)"  # 2 3/2 / /2 // 3/
_BAR = r"(?:\[\||:*\|+\]?:*(?:\d+(?:[,-]\d+)*)?|::+|\[\d+(?:[,-]\d+)*)"  # with ending no.
_EVENT = rf"(?:{_NOTE}|[zx]){_DURATION}?"  # a note or rest with its duration
_BAR_SPACED = rf"\ ?{_BAR}\ ?"  # a bar line with a space each side, if there
UNIT = re.compile(rf"""
  (?<=^[A-Za-z]:)[^\n%]+     # a field line's value
  | ^[A-Za-z]:                # a field line's name
  | %[^\n]*                   # a comment
  | "[^"\n]*"                 # a chord symbol or annotation
  | \[[A-Za-z]:[^\]\n]*\]     # an inline field
  | ![^!\s]{{1,40}}! | \+[^+\s]{{1,40}}\+     # a decoration
  | \(\d+(?::\d*){{0,2}}      # a tuplet
  | {_BAR_SPACED} | {_EVENT} | {_DURATION}
  | \ + | \t+                 # spaces
  | [\s\S]                    # any other character
""", re.MULTILINE | re.VERBOSE)
# A music unit outside the vocabulary is cut into notes, rests, bars, durations and spaces
# (`^F,2` -> `^F,` `2`, ` |: ` -> ` ` `|:` ` `); any other unit (a title, a comment) into
# words, digit runs and single characters.
_MUSIC = re.compile(rf"{_BAR_SPACED}|{_EVENT}", re.VERBOSE)
_MUSIC_PART = re.compile(rf"{_NOTE}|{_BAR}|{_DURATION}|[\s\S]")
_TEXT_PART = re.compile(r"[^\W\d_]+|\d+|[\s\S]")


def split_units(text: str) -> list[str]:
  """`text` cut into ABC units (before any vocabulary); ''.join(...) == text."""
  return UNIT.findall(text)


def split_unit(unit: str) -> list[str]:
  """A unit outside the vocabulary cut one step finer (characters come next)."""
  return (_MUSIC_PART if _MUSIC.fullmatch(unit) else _TEXT_PART).findall(unit)


class AbcTokenizer:
  """ABC units learned from training tunes, bytes for the rest (see the module doc)."""

  kind = "abc"

  def __init__(self, units: Iterable[str]):
    self.units = list(units)
    self._ids = {u: i for i, u in enumerate(self.units, FIRST_UNIT_ID)}
    if len(self._ids) != len(self.units) or "" in self._ids:
      raise UserError("an ABC tokenizer's units must be distinct non-empty strings")
    self.vocab_size = FIRST_UNIT_ID + len(self.units)
    self.eos_id = EOS_ID
    self._bytes = ([bytes([b]) for b in range(N_BYTES)] + [b""]
                   + [u.encode("utf-8") for u in self.units])

  @classmethod
  def train(cls, texts: Iterable[str], min_count: int = 10,
            max_vocab_size: int = 2048) -> AbcTokenizer:
    """Units seen >= `min_count` times in `texts`, then pieces of the other units seen as
    often; the most frequent first (ties by text: the same data gives the same ids, in
    any order), at most `max_vocab_size` ids in all."""
    counts = Counter()
    for text in texts:
      counts.update(UNIT.findall(text))
    frequent = {u: n for u, n in counts.items() if n >= min_count}
    # The parts of rare units, then the characters of rare parts, as `encode` cuts them.
    for cut in (split_unit, list):
      finer = Counter()
      for unit, n in counts.items():
        if unit not in frequent:
          for part in cut(unit):
            finer[part] += n
      for part, n in finer.items():
        if n >= min_count:
          frequent[part] = frequent.get(part, 0) + n
      counts = finer
    ranked = sorted(frequent, key=lambda u: (-frequent[u], u))
    return cls(ranked[:max(0, max_vocab_size - FIRST_UNIT_ID)])

  @classmethod
  def load(cls, path: str) -> AbcTokenizer:
    """The tokenizer saved by `save` (its tokenizer.json, or the folder holding it)."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"cannot read an ABC tokenizer from {path}: {e}") from e
    if saved.get("kind") != cls.kind or not isinstance(saved.get("units"), list):
      raise UserError(f"{path} is not an ABC tokenizer (kind {saved.get('kind')!r})")
    return cls(saved["units"])

  def save(self, directory: str) -> None:
    """Writes tokenizer.json into `directory` (atomically)."""
    saved = {"kind": self.kind, "version": 1, "units": self.units}
    write_text(os.path.join(directory, "tokenizer.json"),
               json.dumps(saved, ensure_ascii=False, indent=0) + "\n")

  def _fallback(self, unit: str) -> list[int]:
    out, get = [], self._ids.get
    for part in split_unit(unit):
      i = get(part)
      if i is not None:
        out.append(i)
        continue
      for char in part:
        i = get(char)
        out.extend([i] if i is not None else char.encode("utf-8"))
    return out

  def encode(self, text: str) -> np.ndarray:
    """text -> ids [N] int32."""
    units = UNIT.findall(text)
    get = self._ids.get
    ids = [get(u, -1) for u in units]
    if -1 in ids:  # rare units: finer pieces, then bytes
      ids = [i for u, i0 in zip(units, ids, strict=True)
             for i in ([i0] if i0 >= 0 else self._fallback(u))]
    return np.asarray(ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """texts -> one ids array [N_i] int32 per text."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text (end-of-sequence and out-of-range ids dropped, invalid UTF-8 from
    stray byte ids replaced)."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    table = self._bytes
    return b"".join(table[i] for i in ids.tolist() if 0 <= i < len(table)).decode(
        "utf-8", errors="replace")

  def tokens(self, ids: Iterable[int]) -> list[str]:
    """Each id as text, to read a tokenization: bytes as `<0xNN>`, EOS as its name."""
    names = [f"<0x{b:02X}>" for b in range(N_BYTES)] + [EOS_TEXT]
    return [names[i] if i < FIRST_UNIT_ID else self.units[i - FIRST_UNIT_ID]
            for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids
                                ).reshape(-1).tolist()]

  def token_byte_lengths(self) -> np.ndarray:
    """[V] int: the UTF-8 length of each id (end of sequence counts one, a separator)."""
    lengths = np.asarray([len(b) for b in self._bytes], np.int32)
    lengths[EOS_ID] = 1
    return lengths
