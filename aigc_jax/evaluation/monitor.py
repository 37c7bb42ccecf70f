"""Opinion monitoring: classified records bucketed into time windows, and an alert when the
share of negatives in a window surges above its own history. Pure numpy (no JAX), so it
runs wherever the classifier's labels end up.

The rule (`negative_alerts`): window w is flagged when its negative share exceeds the mean
of the baseline windows before it by more than `z_threshold` standard deviations, once the
baseline holds `warmup` windows. The baseline is every earlier window with at least
`min_count` records that was not itself flagged (or the last `history` of them):

- flagged windows stay out of it, so a burst of several windows is flagged throughout
  instead of raising its own baseline after the first window; the cost is that a lasting
  shift keeps alerting until the monitor is restarted from the new level (or `history`
  is set and the user re-baselines).
- the standard deviation is floored at the sampling noise of the window itself,
  sqrt(p (1 - p) / n) for baseline share p and n records, and at `min_std`: a perfectly
  flat history (std 0) would otherwise flag any wobble, and a window of 20 records cannot
  tell shares closer than ~0.1 apart whatever the history says.
- windows with fewer than `min_count` records (empty ones included) are neither judged nor
  part of the baseline: their share is mostly noise.

With z_threshold 3 and 20-40 records per window, a stream with no change at all crosses it
in about 1 window in 400 (0.25%, measured on streams of held-out VADER snippets: the
binomial's right tail is heavier than the normal's at these sizes); raise z_threshold or
lengthen the windows for fewer chance alerts.

Times are POSIX seconds (UTC); windows are aligned to multiples of `window_seconds` from
the epoch, so hourly windows start on the hour and daily ones at midnight UTC.
"""

from __future__ import annotations

import datetime
import json
import math
import os

import numpy as np

from aigc_jax.data.opinion import LABELS
from aigc_jax.errors import UserError
from aigc_jax.files import replaced_atomically, write_text

MAX_WINDOWS = 10_000_000  # more means a window far too short for the stream's time span


def _lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().splitlines()
  except FileNotFoundError as e:
    raise UserError(f"no such file: {path}: check the path") from e
  except IsADirectoryError as e:
    raise UserError(f"{path} is a folder: give the .jsonl or .txt file in it") from e
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from e


def _json_objects(path: str):
  """Yields (line number, dict) of each non-blank line of a jsonl file."""
  for number, line in enumerate(_lines(path), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} line {number} is not JSON ({e.msg}): write one JSON object "
                      "per line") from e
    if not isinstance(obj, dict):
      raise UserError(f"{path} line {number} is a JSON {type(obj).__name__}, not an object: "
                      "write one JSON object per line")
    yield number, obj


def _text(obj: dict, field: str, where: str) -> str:
  if field not in obj:
    raise UserError(f"{where} has no {field!r} field (fields: {sorted(obj)}): add it, or "
                    "name the field that holds the text")
  if not isinstance(obj[field], str):
    raise UserError(f"{where} field {field!r} is a {type(obj[field]).__name__}, not a string")
  return obj[field]


def _seconds(value, where: str) -> float:
  """An ISO-8601 string (UTC unless it names a zone) or a number of seconds -> POSIX
  seconds."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if math.isfinite(value):
      return float(value)
  elif isinstance(value, str):
    text = value.strip()
    if text[-1:] in ("Z", "z"):  # Python 3.10's fromisoformat does not read 'Z'
      text = text[:-1] + "+00:00"
    try:
      moment = datetime.datetime.fromisoformat(text)
    except ValueError:
      pass
    else:
      if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
      return moment.timestamp()
  raise UserError(f"{where} is {value!r}: give an ISO-8601 time (e.g. "
                  "'2024-05-01T12:00:00Z') or a number of seconds")


def read_records(path: str, text_field: str = "text", time_field: str = "time") -> list[dict]:
  """The records of a jsonl file (one JSON object per line, blank lines skipped), each as
  {'line': line number, 'text': str, 'time': POSIX seconds, 'record': the object}. Time is
  an ISO-8601 string (UTC unless it names a zone) or a number of seconds."""
  records = []
  for number, obj in _json_objects(path):
    where = f"{path} line {number}"
    text = _text(obj, text_field, where)
    if time_field not in obj:
      raise UserError(f"{where} has no {time_field!r} field (fields: {sorted(obj)}): add "
                      "it, or name the field that holds the time")
    time = _seconds(obj[time_field], f"{where} field {time_field!r}")
    records.append({"line": number, "text": text, "time": time, "record": obj})
  if not records:
    raise UserError(f"no records in {path}: write one JSON object per line")
  return records


def read_texts(path: str, text_field: str = "text") -> list[str]:
  """The texts of a .txt file (one per non-empty line) or of a .jsonl file (each object's
  `text_field`)."""
  if path.endswith(".jsonl"):
    texts = [_text(obj, text_field, f"{path} line {number}")
             for number, obj in _json_objects(path)]
  elif path.endswith(".txt"):
    texts = [line.strip() for line in _lines(path) if line.strip()]
  else:
    raise UserError(f"{path}: give a .txt file (one text per line) or a .jsonl file (one "
                    f"JSON object per line with a {text_field!r} field)")
  if not texts:
    raise UserError(f"no texts in {path}: write one text per line")
  return texts


def window_shares(times, labels, window_seconds: float, num_classes: int):
  """times [N] (seconds), labels [N] (0..num_classes-1) -> (window_starts float64 [W],
  counts int64 [W, C], shares float64 [W, C]): every window from the one holding the first
  record to the one holding the last, empty ones included (zero counts and shares)."""
  times = np.asarray(times, np.float64).ravel()
  labels = np.asarray(labels).ravel()
  if not len(times) or times.shape != labels.shape:
    raise UserError(f"window_shares needs one label per time (at least one), got "
                    f"{len(labels)} labels for {len(times)} times")
  if not (window_seconds > 0 and math.isfinite(window_seconds)):
    raise UserError(f"window_seconds must be a positive number of seconds, got "
                    f"{window_seconds}")
  if not np.isfinite(times).all():
    raise UserError("times must be finite seconds; found NaN or infinity")
  classes = labels.astype(np.int64)
  if (classes != labels).any() or classes.min() < 0 or classes.max() >= num_classes:
    raise UserError(f"labels must be classes 0..{num_classes - 1}, got "
                    f"{labels.min()}..{labels.max()}")
  first = math.floor(times.min() / window_seconds) * window_seconds
  index = np.floor((times - first) / window_seconds).astype(np.int64)
  num_windows = int(index.max()) + 1
  if num_windows > MAX_WINDOWS:
    raise UserError(f"{num_windows} windows of {window_seconds:g} s between the first and "
                    "last record: choose a longer window")
  counts = np.zeros((num_windows, num_classes), np.int64)
  np.add.at(counts, (index, classes), 1)
  totals = counts.sum(axis=1, keepdims=True)
  shares = counts / np.maximum(totals, 1)  # an empty window: all shares 0
  return first + window_seconds * np.arange(num_windows), counts, shares


def negative_alerts(shares_neg, counts_total, z_threshold: float = 3.0, warmup: int = 5,
                    min_count: int = 1, min_std: float = 0.02, history: int | None = None,
                    window_starts=None) -> list[dict]:
  """shares_neg [W], counts_total [W] -> one dict per flagged window: 'window' (index),
  'start' and 'start_utc' (from window_starts [W], else None), 'share', 'count',
  'baseline_mean', 'baseline_std' (after its floors, so z = (share - mean) / std), 'z' and
  'baseline_windows'. The rule is in the module docstring."""
  shares = np.asarray(shares_neg, np.float64).ravel()
  counts = np.asarray(counts_total, np.float64).ravel()
  if shares.shape != counts.shape:
    raise UserError(f"one count per window is needed: {len(shares)} shares, "
                    f"{len(counts)} counts")
  if warmup < 1 or (history is not None and history < warmup):
    raise UserError(f"warmup must be at least 1 window and history (if set) at least "
                    f"warmup, got warmup={warmup}, history={history}")
  if window_starts is not None and len(window_starts) != len(shares):
    raise UserError(f"{len(window_starts)} window starts for {len(shares)} windows")
  baseline: list[int] = []  # windows judged and not flagged, oldest first
  alerts = []
  for w in range(len(shares)):
    n = counts[w]
    if n < max(min_count, 1):
      continue
    past = shares[baseline[-history:] if history else baseline]
    if len(past) >= warmup:
      mean = float(past.mean())  # of window shares, unweighted: each window counts once
      spread = float(past.std(ddof=1)) if len(past) > 1 else 0.0
      std = max(spread, math.sqrt(mean * (1 - mean) / n), min_std)
      z = (shares[w] - mean) / std
      if z > z_threshold:
        start = None if window_starts is None else float(window_starts[w])
        alerts.append({
            "window": w, "start": start,
            "start_utc": None if start is None else datetime.datetime.fromtimestamp(
                start, datetime.timezone.utc).isoformat(),
            "share": float(shares[w]), "count": int(n), "baseline_mean": mean,
            "baseline_std": std, "z": float(z), "baseline_windows": len(past)})
        continue  # kept out of the baseline: a long burst stays flagged
    baseline.append(w)
  return alerts


def _write_error(path: str, e: OSError) -> UserError:
  return UserError(f"cannot write {path} ({e.strerror or e}): free disk space or fix the "
                   "permissions of that path")


def plot_monitor(window_starts, shares, alerts, path: str, class_names=LABELS,
                 negative_class: int = 0) -> str:
  """A PNG at `path` of each class's share [W, C] per window, the flagged windows shaded
  and marked on the negative line; returns `path`."""
  shares = np.asarray(shares, np.float64)
  starts = np.asarray(window_starts, np.float64)
  if shares.ndim != 2 or shares.shape[1] != len(class_names) or len(starts) != len(shares):
    raise UserError(f"shares must be [W, {len(class_names)}] with one start per window, got "
                    f"shares {shares.shape} and {len(starts)} starts")
  # A Figure of its own, not pyplot: the host's matplotlib backend and figures stay as
  # they are.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(max(6.0, min(16.0, 2 + len(shares) / 8)), 3.5))
  ax = fig.subplots()
  x = np.arange(len(shares))
  colors = {"negative": "tab:red", "neutral": "tab:gray", "positive": "tab:green"}
  for c, name in enumerate(class_names):
    ax.plot(x, shares[:, c], label=name, color=colors.get(name), lw=1.2)
  flagged = [a["window"] for a in alerts]
  for w in flagged:
    ax.axvspan(w - 0.5, w + 0.5, color="tab:red", alpha=0.15, lw=0)
  if flagged:
    ax.scatter(flagged, shares[flagged, negative_class], marker="v", color="black", zorder=3,
               label=f"alert ({len(flagged)})")
  step = float(starts[1] - starts[0]) if len(starts) > 1 else 0.0
  first = datetime.datetime.fromtimestamp(float(starts[0]), datetime.timezone.utc)
  ax.set_xlabel(f"window ({step:g} s each; the first starts {first:%Y-%m-%d %H:%M} UTC)")
  ax.set_ylabel("share of records")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  try:
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    with replaced_atomically(path, suffix=".png") as tmp:  # never half a picture
      fig.savefig(tmp, dpi=100, format="png")
  except OSError as e:
    raise _write_error(path, e) from e
  return path


def write_alerts(alerts, path: str) -> str:
  """The alerts as jsonl (one object per line; an empty file for none) at `path`,
  atomically; returns `path`."""
  plain = lambda v: v.item() if isinstance(v, np.generic) else str(v)
  text = "".join(json.dumps(a, default=plain) + "\n" for a in alerts)
  try:
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_text(path, text)
  except OSError as e:
    raise _write_error(path, e) from e
