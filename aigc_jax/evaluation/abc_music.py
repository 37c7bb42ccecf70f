"""How musical ABC tunes are (generated or real): whether they parse, whether their bars
last what the meter says, and whether their notes keep to the header's key.

`parse_tune(text)` reads one tune with music21's ABC tokenizer (`music21.abcFormat`'s
handler: pitches with the key signature and bar accidentals applied, durations with
broken rhythm and tuplets; ~2 ms a tune, about 10x faster than building a music21 score
with `converter.parse`, which adds nothing these checks use). Before that, the text is
mended where music21 10.5 would lose time (see `_prepare`): inline fields `[M:..]`
`[L:..]` `[K:..]` become field lines, invisible rests `x` become `z`, one-letter
decorations (`H` fermata...) go, and a marker records where each line of music ends.
Distributions of pitch, interval and duration, and `compare`: see `abc_music_stats`.

`validity(texts)`: the share of tunes that parse AND whose measures all last what the
meter in force says (`wrong_bars`: pickups, repeats, endings and meter changes allowed
for). On music21's folk tunes (validation split) 0.88 do, and 0.97 of all their measures
are right: the rest are the sources' own slips and, in the Essen songs, meter changes
that their conversion to ABC dropped (a 3/4 song with bars of 4/4). With bar lines moved
at random, or a third of the note lengths changed, about 0.01 do.

`key_consistency(parsed)`: the share of notes whose pitch class is in the header key's
scale. In ABC the key signature already applies to every unmarked note, so this measures
the accidentals that leave the scale (chromatic notes); against another key (`key=`) it
says how well the notes fit that key instead (real tunes: 0.98 vs 0.17 a tritone away).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from aigc_jax.errors import UserError

# Guards against pathological input (real tunes: at most ~2,300 characters and ~1,000
# notes): longer texts, or more note events, are not judged as tunes (parse_tune: None).
MAX_CHARS = 20_000
MAX_NOTES = 5_000
# validity's tolerant figure forgives one wrong measure in ten (a slip in a long tune).
TOLERATED_WRONG_SHARE = 0.1
_INSTALL = ("scoring ABC music needs music21: pip install 'aigc_jax[music]' "
            "(or pip install music21)")

_FIELD_LINE = re.compile(r"^([A-Za-z]):(.*)$", re.MULTILINE)
_INLINE_FIELD = re.compile(r"\[([A-Za-z]):([^\]\n]*)\]")
# Strings, decorations, comments and field lines (group 1, kept as they are), else an
# invisible rest `x` (group 2; music21 drops it and its time) or a one-letter decoration
# such as `H` fermata, `T` trill (music21 drops some with the note they mark: `Ha2`).
_NOT_MUSIC = re.compile(
    r'("[^"\n]*"|![^!\n]*!|\+[^+\n]*\+|%[^\n]*|^[A-Za-z]:[^\n]*)|(x)|[H-WY]', re.MULTILINE)
# `A::` (a note, then a start-and-end repeat) loses the note and the repeat in music21;
# `A ::` reads right.
_STUCK_REPEAT = re.compile(r"(?<=[^\s:|\]])::")
# Put where a line of music ends: music21 keeps no line breaks, and in the Essen tunes a
# line break at the end of a full bar stands for a bar line (`F6\nF2A2B2 |` in 3/2). An
# empty inline remark field, which music21 reads as one empty chord.
LINE_END = "[r:]"
_PITCH_NAME = re.compile(r"([A-G])([#\-n]*)(-?\d+)?")
_LETTER_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
# A letter's place on the line of fifths (C = 0) and the modes' shift along it from major.
_FIFTHS = {"F": -1, "C": 0, "G": 1, "D": 2, "A": 3, "E": 4, "B": 5}
_MODES = {"": 0, "maj": 0, "ion": 0, "lyd": 1, "mix": -1, "dor": -2, "m": -3, "min": -3,
          "aeo": -3, "phr": -4, "loc": -5}
_SHARP_ORDER, _FLAT_ORDER = "FCGDAEB", "BEADGCF"
_KEY = re.compile(r"([A-G])([#b]?)\s*([A-Za-z]*)(.*)")
_KEY_ACCIDENTAL = re.compile(r"(\^\^|\^|__|_|=)([A-Ga-g])")  # `^f` in `K:D exp ^f _b`
_ACCIDENTAL_ALTER = {"^^": 2, "^": 1, "=": 0, "_": -1, "__": -2}
_REPEAT_OR_SECTION = re.compile(r"[:\]\[]|\|\||\d")  # any bar line but a plain `|`


@dataclass(frozen=True)
class Measure:
  """The music between two bar lines (stretches with no note or rest are skipped)."""

  duration: Fraction  # quarter lengths: notes and rests, tuplets applied, grace notes not
  length: Fraction | None  # what a bar lasts in the meter in force there; None: free meter
  left: str  # the bar lines since the previous measure's music ('' at the start)
  right: str  # the bar lines up to the next measure's music ('' at the end)


@dataclass(frozen=True)
class ParsedTune:
  """One tune as music: the header's meter, unit and key (field values as written, ''
  when absent), its measures, and its melody: the notes as sounded (tied notes merged,
  grace notes and rests left out, a chord as its highest note), N of them."""

  meter: str
  unit: str
  key: str
  measures: tuple[Measure, ...]
  pitches: np.ndarray  # [N] int: MIDI note numbers (60 = middle C, ABC's `C`)
  onsets: np.ndarray  # [N] float: quarter lengths from the start, as written (no repeats)
  durations: np.ndarray  # [N] float: quarter lengths


def _abc_format():
  """music21's ABC module, imported on first use (importing music21 takes ~1 s)."""
  try:
    from music21 import abcFormat
  except ImportError as e:
    raise UserError(_INSTALL) from e
  return abcFormat


def bar_length(meter: str) -> Fraction | None:
  """An ABC meter (`M:` value) -> what a bar lasts in quarter lengths (`6/8` -> 3, `C`
  4/4 -> 4, `C|` 2/2 -> 4, `2+3/8` -> 5/2); None for free meter (`none`, Essen's `FREI..`)
  or a value that is no meter."""
  value = meter.split("%", 1)[0].strip()
  if value in ("C", "C|"):
    return Fraction(4)
  m = re.match(r"\(?(\d+(?:\+\d+)*)\)?\s*/\s*(\d+)", value)
  if m is None or int(m.group(2)) == 0:
    return None
  return Fraction(4 * sum(int(n) for n in m.group(1).split("+")), int(m.group(2)))


def _read_key(key: str) -> tuple[int, frozenset[int]] | None:
  """An ABC key -> (tonic pitch class, scale pitch classes), None if it is no key."""
  value = key.split("%", 1)[0].strip()
  if value in ("HP", "Hp"):  # Highland pipes: A mixolydian
    value = "Amix"
  m = _KEY.match(value)
  if m is None:
    return None
  tonic, accidental, mode, rest = m.groups()
  mode = mode.lower()
  mode_key = mode if mode in ("", "m") else mode[:3]
  if mode_key not in _MODES:
    if not mode.startswith("exp") and mode not in ("clef", "treble", "bass", "alto"):
      return None
    mode_key = ""
  shift = {"#": 1, "b": -1, "": 0}[accidental]
  fifths = _FIFTHS[tonic] + 7 * shift + _MODES[mode_key]
  alters = dict.fromkeys(_LETTER_PC, 0)
  if not mode.startswith("exp"):  # `exp`: only the accidentals listed
    for letter in (_SHARP_ORDER[:fifths] if fifths > 0 else _FLAT_ORDER[:-fifths]):
      alters[letter] += 1 if fifths > 0 else -1
  for word in rest.split():  # `^f _b`, not `clef=bass`
    accidental_word = _KEY_ACCIDENTAL.fullmatch(word)
    if accidental_word:
      sign, letter = accidental_word.groups()
      alters[letter.upper()] = _ACCIDENTAL_ALTER[sign]
  scale = frozenset((_LETTER_PC[n] + a) % 12 for n, a in alters.items())
  return (_LETTER_PC[tonic] + shift) % 12, scale


def scale_pitch_classes(key: str) -> frozenset[int] | None:
  """An ABC key (`K:` value: `D`, `Bb`, `F#m`, `Ador`, `Dmix`, `E minor`, `D exp ^f _b`,
  `HP`) -> the pitch classes (0 = C .. 11 = B) of its scale: the key signature, with any
  explicit accidentals after the mode applied. None for `none` and what is no key."""
  read = _read_key(key)
  return None if read is None else read[1]


def key_tonic(key: str) -> int | None:
  """An ABC key's tonic as a pitch class (`F#m` -> 6), None for `none` or no key."""
  read = _read_key(key)
  return None if read is None else read[0]


def _header(text: str) -> dict[str, str] | None:
  """The header's fields (first value of each) up to its `K:` line; None without one."""
  fields: dict[str, str] = {}
  for m in _FIELD_LINE.finditer(text):
    fields.setdefault(m.group(1), m.group(2).strip())
    if m.group(1) == "K":
      return fields
  return None


def _prepare(text: str) -> str:
  """The text music21 reads: inline M/L/K fields as field lines (other inline fields
  dropped), invisible rests `x` as rests `z`, one-letter decorations (`H` `T` ...) left
  out, a space before a `::` stuck to a note, and LINE_END after each line of music in
  the body (not one continued by `\\` or ending in a tie or broken rhythm, whose next
  note the marker would take); no blank line made (one ends a tune)."""
  text = _INLINE_FIELD.sub(
      lambda m: f"\n{m.group(1)}:{m.group(2)}\n" if m.group(1) in "MLK" else "", text)
  text = _NOT_MUSIC.sub(lambda m: m.group(1) or ("z" if m.group(2) else ""), text)
  lines, in_body = [], False
  for line in text.split("\n"):
    if not line.strip():
      continue
    if in_body and not _FIELD_LINE.match(line) and not line.startswith("%"):
      music, percent, comment = line.partition("%")
      music = _STUCK_REPEAT.sub(" ::", music)
      if not music.rstrip().endswith(("\\", "-", ">", "<")):
        line = music.rstrip() + LINE_END + percent + comment
    in_body = in_body or line.startswith("K:")
    lines.append(line)
  return "\n".join(lines) + "\n"


_MIDI: dict[str, int] = {}


def _midi(name: str) -> int:
  """A music21 pitch name (`F#5`, `B-4`, `Bn4`, `G--3`; no octave: 4) -> MIDI number
  (`C4` = 60)."""
  number = _MIDI.get(name)
  if number is None:
    m = _PITCH_NAME.fullmatch(name)
    if m is None:
      raise ValueError(f"unexpected pitch name {name!r}")
    alter = m.group(2).count("#") - m.group(2).count("-")
    octave = int(m.group(3)) if m.group(3) else 4
    number = _MIDI[name] = 12 * (octave + 1) + _LETTER_PC[m.group(1)] + alter
  return number


def _ql(value) -> Fraction:
  """A music21 quarter length (float or Fraction) as an exact fraction."""
  return value if isinstance(value, Fraction) else Fraction(value).limit_denominator(1 << 16)


def parse_tune(text: str) -> ParsedTune | None:
  """One ABC tune's text (header through `K:`, then the body) -> its music; None when
  music21 cannot read it, it has no `K:` header line or no note, or it is longer than
  MAX_CHARS characters or MAX_NOTES note events (not judged: no real tune is)."""
  if len(text) > MAX_CHARS:
    return None
  header = _header(text)
  if header is None:
    return None
  if "L" not in header and "M" not in header:  # ABC's default unit; music21 needs one
    text = re.sub(r"^K:", "L:1/8\nK:", text, count=1, flags=re.MULTILINE)
  abc_format = _abc_format()
  handler = abc_format.ABCHandler()
  try:
    # music21 writes warnings on odd notes straight to stderr; a sample may have many.
    with contextlib.redirect_stderr(io.StringIO()):
      handler.process(_prepare(text))
    return _music(handler.tokens, header, abc_format)
  except Exception:  # noqa: BLE001 - music21 raises many types on malformed text
    return None


def _music(tokens, header: dict[str, str], abc_format) -> ParsedTune | None:
  """The measures and melody of a processed token list (see ParsedTune)."""
  length = bar_length(header.get("M", "none"))
  measures: list[Measure] = []
  bars_before, bars_after, spent = [], [], Fraction(0)
  closing = length  # the meter in force where the current measure's music ends
  pitches, onsets, durations = [], [], []
  now, events, tied = Fraction(0), 0, False
  for token in tokens:
    if isinstance(token, abc_format.ABCMetadata):
      if token.tag == "M":
        length = bar_length(token.data)
      continue
    if isinstance(token, abc_format.ABCBar):
      if spent and not bars_after:
        closing = length
      (bars_after if spent else bars_before).append(token.src.strip())
      continue
    if token.src == LINE_END:
      if spent and not bars_after and length is not None and spent == length:
        closing = length  # the line ends a full bar: a bar line there, unwritten
        bars_after.append("")
      continue
    if not isinstance(token, abc_format.ABCNote) or token.inGrace:
      continue
    events += 1
    if events > MAX_NOTES:
      return None
    if bars_after:  # music after bar lines: the measure before them is complete
      measures.append(Measure(spent, closing, " ".join(bars_before), " ".join(bars_after)))
      bars_before, bars_after, spent = bars_after, [], Fraction(0)
    duration = _ql(token.quarterLength)
    if token.activeTuplet is not None:
      duration *= _ql(token.activeTuplet.tupletMultiplier())
    spent += duration
    if isinstance(token, abc_format.ABCChord):
      names = [t.pitchName for t in token.subTokens if t.pitchName]
      pitch = max(_midi(n) for n in names) if names else None
    else:
      pitch = None if token.isRest else _midi(token.pitchName)
    if pitch is not None:
      if tied and pitches[-1] == pitch:
        durations[-1] += duration  # a tie: one longer note
      else:
        pitches.append(pitch)
        onsets.append(now)
        durations.append(duration)
    tied = pitch is not None and token.tie in ("start", "continue")
    now += duration
  if spent:
    measures.append(Measure(spent, closing if bars_after else length,
                            " ".join(bars_before), " ".join(bars_after)))
  if not pitches:
    return None
  return ParsedTune(header.get("M", ""), header.get("L", ""), header.get("K", ""),
                    tuple(measures), np.asarray(pitches, np.int16),
                    np.asarray([float(x) for x in onsets]),
                    np.asarray([float(x) for x in durations]))


def _is_section_bar(bars: str) -> bool:
  """Whether bar lines start or end a section: a repeat, a double or final bar, an
  ending (`[1`, `|2`); anything but plain `|`."""
  return bool(_REPEAT_OR_SECTION.search(bars))


def wrong_bars(parsed: ParsedTune) -> list[int]:
  """Indices of the measures whose duration is not what the meter says.

  A measure must last exactly a bar of the meter in force (exact fractions), except that
  one may be shorter (never longer) where a phrase may begin or end mid-bar:
  - the first and the last measure (a pickup; the bar that completes it);
  - a measure next to a section bar line (`|:` `:|` `::` `||` `|]` `[|`, endings `[1`
    `|2`): the bar before a repeat sign, which with the pickup makes a full bar, the
    pickup after it, first and second endings;
  - two short measures in a row that make one bar together (a phrase's end and the next
    one's pickup, split by a plain bar line).
  Measures in free meter (`M:none`) are not checked."""
  measures = parsed.measures
  last = len(measures) - 1

  def short(i: int) -> bool:
    m = measures[i]
    return 0 <= i <= last and m.length is not None and m.duration < m.length

  def split_bar(i: int, j: int) -> bool:  # measures i and j (adjacent) make one bar
    return (short(i) and short(j) and measures[i].length == measures[j].length
            and measures[i].duration + measures[j].duration == measures[i].length)

  wrong = []
  for i, m in enumerate(measures):
    if m.length is None or m.duration == m.length:
      continue
    boundary = (i in (0, last) or _is_section_bar(m.left) or _is_section_bar(m.right)
                or split_bar(i - 1, i) or split_bar(i, i + 1))
    if not (boundary and m.duration < m.length):
      wrong.append(i)
  return wrong


def checked_bars(parsed: ParsedTune) -> int:
  """How many measures have a meter to check against (not in free meter)."""
  return sum(m.length is not None for m in parsed.measures)


def bar_durations_ok(parsed: ParsedTune, max_wrong_share: float = 0.0) -> bool:
  """Whether the measures last what the meter says (see `wrong_bars`): all of them by
  default; with `max_wrong_share`, all but that share of the checked ones (0.1: one in
  ten, rounded down). True for a tune in free meter."""
  return len(wrong_bars(parsed)) <= max_wrong_share * checked_bars(parsed)


def parse_all(tunes: Sequence[str | ParsedTune | None]) -> list[ParsedTune | None]:
  """Texts parsed (`parse_tune`), already parsed tunes (or None) kept as they are."""
  return [parse_tune(t) if isinstance(t, str) else t for t in tunes]


def validity(tunes: Sequence[str | ParsedTune | None],
             max_wrong_share: float = TOLERATED_WRONG_SHARE) -> dict[str, float]:
  """How many tunes (texts, or `parse_all` results) parse and keep their meter.

  Returns: `n` tunes; `parsed` and `parse_rate` (share of n); `bars_ok` (parsed tunes
  whose measures all last what the meter says) and `bars_ok_rate` (share of parsed);
  `valid` and `validity` (parse AND bars all ok, share of n: the headline figure; 0.0
  for no tunes); `validity_tolerant` (parse AND at most `max_wrong_share` of the
  measures wrong: a slip in a long tune forgiven); `bar_accuracy` (the share of all
  checked measures of parsed tunes that are right); `free_meter` (parsed tunes with no
  measure checked)."""
  parsed = [p for p in parse_all(tunes) if p is not None]
  n = len(tunes)
  wrong = [len(wrong_bars(p)) for p in parsed]
  checked = [checked_bars(p) for p in parsed]
  bars_ok = sum(w == 0 for w in wrong)
  tolerant = sum(w <= max_wrong_share * c for w, c in zip(wrong, checked, strict=True))
  return {"n": n, "parsed": len(parsed), "parse_rate": len(parsed) / max(n, 1),
          "bars_ok": bars_ok, "bars_ok_rate": bars_ok / max(len(parsed), 1),
          "valid": bars_ok, "validity": bars_ok / max(n, 1),
          "validity_tolerant": tolerant / max(n, 1),
          "bar_accuracy": 1.0 - sum(wrong) / max(sum(checked), 1),
          "free_meter": sum(c == 0 for c in checked)}


def key_consistency(parsed: ParsedTune, key: str | None = None) -> float:
  """The share of the melody's notes (by count: each sounded note once, whatever its
  length) whose pitch class is in the scale of `key` (default: the header's key); NaN
  when the key is `none` or unreadable."""
  scale = scale_pitch_classes(parsed.key if key is None else key)
  if scale is None or not len(parsed.pitches):
    return float("nan")
  return float(np.isin(parsed.pitches % 12, sorted(scale)).mean())


def ends_on_tonic(parsed: ParsedTune) -> bool | None:
  """Whether the last note is the header key's tonic (None when the key has none)."""
  tonic = key_tonic(parsed.key)
  return None if tonic is None else bool(int(parsed.pitches[-1]) % 12 == tonic)
