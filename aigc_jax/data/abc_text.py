"""ABC notation text: a file split into tunes, one tune normalised, its header read and
the key that says whether two tunes hold the same music.

ABC 2.1 rules followed here: a tune starts at an `X:` line and runs to the first blank
line (or the next `X:`); its header runs from `X:` to the first `K:` line; what follows
is the body. Text outside tunes (a file header, free text between tunes) is not music.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

_X_LINE = re.compile(r"X:")
_FIELD = re.compile(r"([A-Za-z]):(.*)")
# Fields of a file header a tune may inherit (ABC 2.1 §2.2.2): not the per-tune ones
# (reference number, title, key, lyrics).
_NOT_INHERITED = frozenset("XTKWw")
# Header fields whose value changes the music: they enter the duplicate key.
_MUSIC_FIELDS = ("M", "L", "K")
_SPACE_OR_CONTINUATION = re.compile(r"[\s\\]+")
# Header fields a tune's text keeps: its number, title, rhythm, the fields that change
# how the music reads (meter, unit length, tempo, parts, instructions, user symbols,
# voices, macros) and the key. Bibliographic ones (area, book, composer, discography,
# file, group, history, notes, origin, source, transcriber: catalogue numbers, e-mail
# addresses) stay in `fields` only.
TEXT_FIELDS = "XRMLQPIUVmK"  # titles (T) stay in `fields`: a prompt need not invent one
# Header order in a tune's text: X first, then the fields a prompt conditions on (meter,
# unit length, rhythm), then the rest in their order, K last (ABC's rule), so that
# "X:1\nM:6/8\nL:1/8\nK:D\n" is the start of a training text.
HEADER_ORDER = "XMLR"


@dataclass(frozen=True)
class TuneLines:
  """One tune as found in a file: its lines (trailing whitespace stripped) and where."""

  line: int  # 1-based line number of its X: line
  lines: list[str]


@dataclass(frozen=True)
class ParsedTune:
  """A well-formed tune: normalised text, header fields and its duplicate key."""

  text: str
  fields: dict[str, str]
  music_id: str


def decode_abc(data: bytes) -> str:
  """File bytes -> text: UTF-8 (a BOM dropped), else Latin-1 (which reads any bytes);
  CRLF and lone CR line ends become LF."""
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError:
    text = data.decode("latin-1")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def split_abc(text: str) -> tuple[list[str], list[TuneLines], int]:
  """A file's text -> (file-header field lines, tunes, stray non-blank lines).

  The file header is every field line before the first `X:`; non-blank lines outside
  tunes after that (free text) are only counted."""
  header: list[str] = []
  tunes: list[TuneLines] = []
  current: list[str] | None = None
  seen_tune, stray = False, 0
  for number, raw in enumerate(text.split("\n"), 1):
    line = raw.rstrip()
    if _X_LINE.match(line):
      current = [line]
      tunes.append(TuneLines(number, current))
      seen_tune = True
    elif current is not None and line:
      current.append(line)
    elif current is not None:
      current = None  # a blank line ends the tune
    elif line and not seen_tune:
      if _FIELD.match(line):
        header.append(line)
    elif line:
      stray += 1
  return header, tunes, stray


def _is_music_line(line: str) -> bool:
  return not line.startswith("%") and not _FIELD.match(line)


def parse_tune(tune: TuneLines, inherited: Sequence[str] = (),
               text_fields: str | None = TEXT_FIELDS) -> ParsedTune | tuple[str, int]:
  """A tune's lines -> ParsedTune, or (reason, line number) when it is malformed:
  'no_key' (no `K:` line) or 'no_body' (no music line after `K:`).

  Normalisation of the text: the `X:` line becomes `X:1` (every text starts the same way
  and is a valid stand-alone tune; the original number stays in `fields['X']`); header
  field lines become `F:value`, value stripped, and only the fields named in
  `text_fields` stay in the text (all of them when None; the others, with the lines that
  continue them, are left to `fields`); `%` comment lines leave the header, `%%`
  directives stay; file-header fields the tune lacks (`inherited`, e.g. `L:1/16`) are
  inserted just before `K:`; the header is put in HEADER_ORDER; body lines are kept as
  they are, trailing whitespace stripped; the text ends with one newline."""
  lines = tune.lines
  key_at = next((i for i, line in enumerate(lines) if line.startswith("K:")), None)
  if key_at is None:
    return "no_key", tune.line
  body = lines[key_at + 1:]
  if not any(_is_music_line(line) for line in body):
    return "no_body", tune.line + key_at
  keep = (lambda name: True) if text_fields is None else (lambda name: name in text_fields)
  fields: dict[str, str] = {}
  header: list[str] = []
  kept = True  # whether the last field line stayed (its continuation lines follow it)
  for line in lines[:key_at + 1]:
    m = _FIELD.match(line)
    if m is None:
      if line.startswith("%%") or (kept and not line.startswith("%")):
        header.append(line)
      continue
    name, value = m.group(1), m.group(2).strip()
    fields[name] = f"{fields[name]}\n{value}" if name in fields else value
    kept = keep(name)
    if kept:
      header.append("X:1" if name == "X" else f"{name}:{value}")
  for line in inherited:
    m = _FIELD.match(line)
    name, value = m.group(1), m.group(2).strip()
    if name not in _NOT_INHERITED and name not in fields:
      fields[name] = value
      if keep(name):
        header.insert(len(header) - 1, f"{name}:{value}")
  return ParsedTune("\n".join(_ordered(header) + body) + "\n", fields, music_id(fields, body))


def _ordered(header: list[str]) -> list[str]:
  """Header lines in HEADER_ORDER (others after them in their order, K last), each field
  with the lines that continue it (`+:` and directives after it) kept behind it."""
  entries: list[list[str]] = []
  for line in header:
    if entries and _FIELD.match(line) is None:  # a continuation or directive
      entries[-1].append(line)
    else:
      entries.append([line])

  def rank(entry: list[str]) -> int:
    m = _FIELD.match(entry[0])
    name = m.group(1) if m else ""
    return (HEADER_ORDER.index(name) if name in HEADER_ORDER
            else len(HEADER_ORDER) + (1 if name == "K" else 0))

  return [line for entry in sorted(entries, key=rank) for line in entry]


def music_key(fields: dict[str, str], body: list[str]) -> str:
  """What two tunes must share to be duplicates: the meter, unit length and key (`M`,
  `L`, `K`, whitespace removed) and the body without comment lines, `%` comments,
  whitespace and `\\` line continuations. Title, reference number, every other header
  field and the line layout are ignored."""
  head = "|".join(_SPACE_OR_CONTINUATION.sub("", fields.get(f, "")) for f in _MUSIC_FIELDS)
  music = "".join(line.split("%", 1)[0] for line in body if not line.startswith("%"))
  return head + "\n" + _SPACE_OR_CONTINUATION.sub("", music)


def music_id(fields: dict[str, str], body: list[str]) -> str:
  """A short stable hash of `music_key` (hex)."""
  return hashlib.sha256(music_key(fields, body).encode("utf-8")).hexdigest()[:32]


def tune_body(text: str) -> str:
  """The body of a normalised tune text: the lines after its header's `K:` line."""
  lines = text.split("\n")
  key_at = next(i for i, line in enumerate(lines) if line.startswith("K:"))
  return "\n".join(lines[key_at + 1:])
