"""Sampled-music figures for an ABC language model: tunes prompted with the headers of
held-out tunes, measured against those tunes (validity, key consistency, histogram
overlaps: `abc_music_stats.compare`), and the conditioning checks (does a 6/8 prompt give
6/8 bars, does a G-major prompt give notes of G major).

`sample_metrics` is what `aigc-jax eval` and each evaluation of a music run report (the
run's `music.eval_samples`); `benchmarks.music_quality` adds the n-gram baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from aigc_jax.evaluation import abc_music, abc_music_stats

SIX_EIGHT = "X:1\nM:6/8\nL:1/8\n"  # the meter asked for; the model picks the key
G_MAJOR = "X:1\nM:4/4\nL:1/8\nK:G\n"  # the key asked for (and 4/4: the meter's control)
OTHER_MAJORS = ("C", "Db", "D", "Eb", "E", "F", "F#", "Ab", "A", "Bb", "B")
SAMPLE_KEYS = ("n", "parse_rate", "validity", "validity_tolerant", "bar_accuracy",
               "key_consistency", "ends_on_tonic", "pitch_class_overlap", "interval_overlap",
               "duration_overlap", "pitch_class_kl", "interval_kl", "duration_kl")


def tune_header(text: str) -> str:
  """A tune's header: its lines up to and including `K:` (all of it when there is none)."""
  lines = text.split("\n")
  end = next((i for i, line in enumerate(lines) if line.startswith("K:")), len(lines) - 1)
  return "\n".join(lines[:end + 1]) + "\n"


def room(family, prompt: str, max_new_tokens: int) -> int:
  """New tokens `prompt` leaves in the model's context, at most `max_new_tokens`."""
  return min(max_new_tokens, family.model_cfg.max_seq_len - len(family.tokenizer.encode(prompt)))


def sample_tunes(family, params, prompts: Sequence[str], max_new_tokens: int, seed: int,
                 batch: int = 50) -> list[str]:
  """Each prompt followed by the model's continuation at temperature 1 (the model's own
  distribution), `batch` prompts at a time so that memory stays bounded; each batch as
  long as its longest prompt leaves room for."""
  out = []
  for start in range(0, len(prompts), batch):
    part = list(prompts[start:start + batch])
    new = min(room(family, p, max_new_tokens) for p in part)
    texts = family.generate_text(params, part, max_new_tokens=max(new, 1), seed=seed + start,
                                 temperature=1.0)
    out += [family.joined(p, t) for p, t in zip(part, texts, strict=True)]
  return out


def sample_metrics(family, params, reference: Sequence[str | abc_music.ParsedTune | None],
                   headers: Sequence[str], num: int, max_new_tokens: int,
                   seed: int) -> dict[str, float]:
  """`num` tunes prompted with `headers` (cycled) against `reference` (texts or parsed
  held-out tunes): {'music_' + key: value} for the SAMPLE_KEYS of
  `abc_music_stats.compare`."""
  prompts = [headers[i % len(headers)] for i in range(num)]
  tunes = sample_tunes(family, params, prompts, max_new_tokens, seed)
  figures = abc_music_stats.compare(tunes, reference)
  return {f"music_{k}": float(figures[k]) for k in SAMPLE_KEYS}


def _mean(values) -> float:
  values = [v for v in values if not math.isnan(v)]
  return float(np.mean(values)) if values else math.nan


def bar_share(parsed: Sequence[abc_music.ParsedTune], length: Fraction) -> float:
  """The share of the tunes' measures (pooled) that last exactly `length` quarter lengths
  (first and last measures, which may be a pickup and its complement, left out)."""
  inner = [m.duration for p in parsed for m in p.measures[1:-1]]
  return float(np.mean([d == length for d in inner])) if inner else math.nan


def keeps_meter(parsed: abc_music.ParsedTune, meter: str) -> bool:
  """Whether a tune is in `meter` from its header to its end (no inline meter change)."""
  length = abc_music.bar_length(meter)
  return (abc_music.bar_length(parsed.meter) == length
          and all(m.length == length for m in parsed.measures))


def conditioning(six_eight: Sequence[str], g_major: Sequence[str], seed: int) -> dict:
  """Whether samples keep what their prompt asked, from tunes prompted with SIX_EIGHT and
  with G_MAJOR (the latter in 4/4: the control for the meter, as the former is in some
  key of the model's choosing).

  Meter: `six_eight_kept` is the share of the valid 6/8-prompted tunes (they parse and
  every bar lasts what their meter says) that stay in 6/8 to the end; since a valid tune's
  bars follow its meter, the sharper figures are `six_eight_bars` (the share of inner
  measures of every parsed 6/8-prompted tune lasting a 6/8 bar, 3 quarter lengths) beside
  `six_eight_bars_control` (the same share in the 4/4-prompted tunes).
  Key: the mean key consistency of G-prompted tunes under G beside the same tunes under a
  key drawn at random from the other eleven majors (`g_shuffled_key_consistency`)."""
  parsed_68 = [p for p in abc_music.parse_all(six_eight) if p is not None]
  valid_68 = [p for p in parsed_68 if not abc_music.wrong_bars(p)]
  parsed_g = [p for p in abc_music.parse_all(g_major) if p is not None]
  rng = np.random.default_rng(seed)
  bar = abc_music.bar_length("6/8")
  return {
      "six_eight_samples": len(six_eight), "six_eight_parsed": len(parsed_68),
      "six_eight_valid": len(valid_68),
      "six_eight_kept": _mean([float(keeps_meter(p, "6/8")) for p in valid_68]),
      "six_eight_bars": bar_share(parsed_68, bar),
      "six_eight_bars_control": bar_share(parsed_g, bar),
      "g_samples": len(g_major), "g_parsed": len(parsed_g),
      "g_key_consistency": _mean([abc_music.key_consistency(p) for p in parsed_g]),
      "g_shuffled_key_consistency": _mean(
          [abc_music.key_consistency(p, str(rng.choice(OTHER_MAJORS))) for p in parsed_g])}


def conditioning_samples(family, params, num: int, max_new_tokens: int, seed: int) -> dict:
  """`conditioning` of `num` tunes sampled from each of SIX_EIGHT and G_MAJOR."""
  return conditioning(sample_tunes(family, params, [SIX_EIGHT] * num, max_new_tokens, seed + 1),
                      sample_tunes(family, params, [G_MAJOR] * num, max_new_tokens, seed + 2),
                      seed)
