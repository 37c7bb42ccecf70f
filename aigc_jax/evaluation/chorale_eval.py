"""Figures that say whether sampled chorales are four-part harmony, measured the same way
on real chorales so that a sample's figure has a reference beside it.

- `word_validity`: the share of event words `read_events` accepts (grammar);
- `key_consistency`: the share of notes whose pitch class is in the key signature's
  diatonic scale (minor keys raise their 6th and 7th, so real chorales score below 1);
- `four_voices`: the share of sounding time (32nd-note grid steps with any note) in which
  all four voices sound;
- `voice_order`: of the steps where all four sound, the share with soprano >= alto >=
  tenor >= bass (no crossed voices);
- `pitch_class_overlap`: overlap of the pooled pitch-class histograms with a reference set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from aigc_jax.data.chorale_tokenizer import GRID, Chorale, read_events
from aigc_jax.evaluation.abc_music_stats import histogram_overlap

_MAJOR = (0, 2, 4, 5, 7, 9, 11)


def key_scale(key_sharps: int) -> frozenset[int]:
  """Pitch classes of the major scale with `key_sharps` sharps (negative: flats)."""
  tonic = (7 * key_sharps) % 12
  return frozenset((tonic + step) % 12 for step in _MAJOR)


def voice_grid(chorale: Chorale) -> np.ndarray:
  """[4, S] int: each voice's MIDI pitch at every grid step (-1: silent)."""
  ends = [n.onset + n.duration for voice in chorale.voices for n in voice]
  steps = int(max(ends) * GRID) if ends else 0
  grid = np.full((4, steps), -1, np.int64)
  for v, voice in enumerate(chorale.voices[:4]):
    for n in voice:
      grid[v, int(n.onset * GRID):int((n.onset + n.duration) * GRID)] = n.pitch
  return grid


def chorale_figures(chorale: Chorale) -> dict[str, float]:
  """One chorale's key_consistency, four_voices and voice_order (NaN when undefined)."""
  pitches = np.asarray([n.pitch for voice in chorale.voices for n in voice], np.int64)
  scale = sorted(key_scale(chorale.key_sharps))
  grid = voice_grid(chorale)
  sounding = (grid >= 0).any(0)
  full = (grid >= 0).all(0)
  ordered = (np.diff(grid[:, full], axis=0) <= 0).all(0)
  mean = lambda x: float(x.mean()) if x.size else math.nan
  return {"key_consistency": mean(np.isin(pitches % 12, scale)),
          "four_voices": mean(full[sounding]), "voice_order": mean(ordered)}


def pitch_class_histogram(chorales: Sequence[Chorale]) -> np.ndarray:
  """[12] int: notes per pitch class over all voices of all chorales."""
  pcs = [n.pitch % 12 for c in chorales for voice in c.voices for n in voice]
  return np.bincount(np.asarray(pcs, np.int64), minlength=12)


def compare(samples: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
  """Sampled event texts against real ones: the mean of each figure over the samples
  (word_validity pooled over all words; chorales with no note left out of the rest),
  the same for the reference ('reference_' + name), and pitch_class_overlap."""

  def summary(texts):
    read = [read_events(t) for t in texts]
    words = sum(r["words"] for _, r in read)
    kept = [c for c, _ in read if any(c.voices)]
    figures = [chorale_figures(c) for c in kept]
    out = {"n": len(texts), "with_notes": len(kept),
           "word_validity": 1.0 - sum(r["skipped"] for _, r in read) / max(words, 1)}
    for key in ("key_consistency", "four_voices", "voice_order"):
      values = [f[key] for f in figures if not math.isnan(f[key])]
      out[key] = float(np.mean(values)) if values else math.nan
    return out, pitch_class_histogram(kept)

  (mine, p), (theirs, q) = summary(samples), summary(reference)
  return {**mine, **{f"reference_{k}": v for k, v in theirs.items() if k != "n"},
          "pitch_class_overlap": histogram_overlap(p, q)}
