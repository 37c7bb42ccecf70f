"""Batch inference for a classification run (`finetune`, task `classify`) and opinion
monitoring on top of it: `aigc-jax classify --workdir RUN --input FILE --out FILE
[--monitor]`.

Texts are tokenized once, sorted by length and cut into batches of `batch_size` whose
width is the batch's longest row rounded up to a multiple of `BUCKET` tokens: a handful
of shapes, each compiled once, with little padding. The last batch is filled with copies
of its first row (dropped after) so that it compiles to the same shape.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import write_text

BUCKET = 16  # batch widths are multiples of this many tokens


def class_names(family) -> tuple[str, ...]:
  """The run's class names: its dataset's labels, else 'class_0', 'class_1', ..."""
  d = family.config.data
  if d.name == "opinion":
    from aigc_jax.data.opinion import LABELS
    return LABELS
  if d.name == "vader":
    from aigc_jax.data.sentiment import LABELS
    return LABELS
  return tuple(f"class_{c}" for c in range(family.config.task.num_classes))


def length_batches(lengths_N: np.ndarray, batch_size: int, max_len: int) -> list[tuple]:
  """[(row indices [<= batch_size], width)] covering every row once: rows sorted by
  length, each batch as wide as its longest row rounded up to a multiple of BUCKET (at
  most max_len)."""
  order = np.argsort(lengths_N, kind="stable")
  out = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = int(-(-max(int(lengths_N[rows].max()), 1) // BUCKET) * BUCKET)
    out.append((rows, min(width, max_len)))
  return out


def classify_texts(run, texts: list[str], batch_size: int = 64,
                   progress: bool = True) -> tuple[np.ndarray, dict]:
  """(class probabilities [N, C] float32, {'texts', 'seconds', 'texts_per_second',
  'shapes', 'truncated'}) of `texts` under the run's classifier."""
  family = run.family
  if getattr(family, "task", None) != "classify":
    raise UserError(f"classify needs a classification run (a finetune config with "
                    f"task.name='classify'); {run.workdir!r} holds a "
                    f"{getattr(family, 'task', None) or family.name!r} run")
  if batch_size < 1:
    raise UserError(f"--batch-size must be at least 1, got {batch_size}")
  arrays = family._classify_arrays(list(texts), np.zeros(len(texts), np.int32))
  tokens_NT, lengths_N = arrays["tokens"], arrays["lengths"]
  max_len = tokens_NT.shape[1]
  truncated = int(sum(len(t) > 0 and n >= max_len for t, n in zip(texts, lengths_N,
                                                                   strict=True)))
  model_of = family.model

  @jax.jit
  def probabilities(state, tokens_BT, lengths_B):
    return jax.nn.softmax(model_of(state)(tokens_BT, lengths_B), axis=-1)

  batches = length_batches(lengths_N, batch_size, max_len)
  out = np.zeros((len(texts), family.config.task.num_classes), np.float32)
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(texts), desc="classify", unit="text", file=sys.stderr,
               dynamic_ncols=True)
  start = time.perf_counter()
  for rows, width in batches:
    filled = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows))])
    with run.sharded():
      probs = probabilities(run.state, run.put_batch(tokens_NT[filled, :width]),
                            run.put_batch(lengths_N[filled].astype(np.int32)))
    out[rows] = np.asarray(jax.device_get(probs))[:len(rows)]
    if bar is not None:
      bar.update(len(rows))
  seconds = time.perf_counter() - start
  if bar is not None:
    bar.close()
  stats = {"texts": len(texts), "seconds": seconds,
           "texts_per_second": len(texts) / max(seconds, 1e-9),
           "shapes": sorted({w for _, w in batches}), "truncated": truncated}
  return out, stats


def write_predictions(path: str, texts: list[str], probs_NC: np.ndarray, names,
                      extra: list[dict] | None = None) -> str:
  """One JSON object per text at `path` (jsonl, atomically): the text, its label, the
  probability of each class, and the fields of `extra` (e.g. the record's time)."""
  lines = []
  for i, text in enumerate(texts):
    row = {**(extra[i] if extra else {}), "text": text,
           "label": names[int(probs_NC[i].argmax())],
           "probs": {n: round(float(p), 6) for n, p in zip(names, probs_NC[i], strict=True)}}
    lines.append(json.dumps(row, ensure_ascii=False))
  try:
    return write_text(path, "\n".join(lines) + "\n")
  except OSError as e:
    raise UserError(f"cannot write --out {path} ({e.strerror or e}): pass a writable file "
                    "path") from e


def monitor(run, records: list[dict], probs_NC: np.ndarray, out_path: str,
            window_seconds: float, z_threshold: float, warmup: int) -> dict:
  """Negative-share surges over time windows: writes OUT's stem + '_alerts.jsonl' and
  '_monitor.png'; returns {'windows', 'alerts', 'alerts_path', 'plot_path'}."""
  from aigc_jax.evaluation import monitor as monitor_lib
  names = class_names(run.family)
  if "negative" not in names:
    raise UserError(f"--monitor watches the share of negative texts, but this run's classes "
                    f"are {list(names)}: use a run trained on data.name='opinion' or 'vader'")
  negative = names.index("negative")
  labels_N = probs_NC.argmax(1)
  starts_W, counts_WC, shares_WC = monitor_lib.window_shares(
      [r["time"] for r in records], labels_N, window_seconds, len(names))
  alerts = monitor_lib.negative_alerts(shares_WC[:, negative], counts_WC.sum(1), z_threshold,
                                       warmup, window_starts=starts_W)
  stem = os.path.splitext(out_path)[0]
  alerts_path = monitor_lib.write_alerts(alerts, stem + "_alerts.jsonl")
  plot_path = monitor_lib.plot_monitor(starts_W, shares_WC, alerts, stem + "_monitor.png",
                                       class_names=names, negative_class=negative)
  return {"windows": len(starts_W), "alerts": alerts, "alerts_path": alerts_path,
          "plot_path": plot_path}

