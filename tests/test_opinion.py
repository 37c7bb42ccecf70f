"""Opinion monitoring on VADER's real ground truth (NYT editorials + tweets): the three-way
split, the TF-IDF baseline, and the negativity alerts on a stream of held-out snippets."""

import datetime
import json
import os

import numpy as np
import pytest

from aigc_jax.data.opinion import macro_f1, opinion_split, tfidf_lr_baseline
from aigc_jax.errors import UserError
from aigc_jax.evaluation.monitor import (
  negative_alerts,
  plot_monitor,
  read_records,
  read_texts,
  window_shares,
  write_alerts,
)

UNIQUE_TEXTS = 9319  # 5,190 NYT + 4,200 tweets, less 71 repeated NYT snippets
HOUR = 3600.0
T0 = 1714564800.0  # 2024-05-01T12:00:00Z, on the hour
BURST = (40, 41, 42)


@pytest.fixture(scope="module")
def split():
  from aigc_jax.data.sentiment import find_archive
  try:
    find_archive()
  except UserError as e:
    pytest.fail(f"VADER's data is missing ({e}); `make data` fetches it")
  return opinion_split()


def test_split_sizes_disjoint_stratified_and_labelled_by_the_thresholds(split):
  sizes = {name: len(part["texts"]) for name, part in split.items()}
  assert sum(sizes.values()) == UNIQUE_TEXTS
  for name, fraction in (("test", 0.2), ("val", 0.1), ("train", 0.7)):
    assert abs(sizes[name] - fraction * UNIQUE_TEXTS) <= 3, sizes
  texts = {name: set(part["texts"]) for name, part in split.items()}
  assert all(len(texts[name]) == sizes[name] for name in split)  # deduplicated
  assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"]
              or texts["val"] & texts["test"])
  pooled = np.bincount(np.concatenate([p["labels"] for p in split.values()])) / UNIQUE_TEXTS
  assert pooled.min() > 0.25  # no class starved by the thresholds
  for part in split.values():
    labels, ratings = part["labels"], part["ratings"]
    assert len(labels) == len(ratings) == len(part["sources"]) == len(part["texts"])
    assert labels.dtype == np.int32 and set(part["sources"]) == {"nyt", "tweets"}
    np.testing.assert_allclose(np.bincount(labels, minlength=3) / len(labels), pooled,
                               atol=0.01)  # stratified: every class in every part
    assert (ratings[labels == 0] < -0.5).all()
    assert ((ratings[labels == 1] >= -0.5) & (ratings[labels == 1] <= 0.5)).all()
    assert (ratings[labels == 2] > 0.5).all()
  assert not (split["train"]["labels"][:50] == np.sort(split["train"]["labels"][:50])).all()


def test_split_is_the_same_every_time(split):
  again = opinion_split()
  for name in split:
    assert again[name]["texts"] == split[name]["texts"]
    np.testing.assert_array_equal(again[name]["labels"], split[name]["labels"])
  with pytest.raises(UserError, match="sum to less than 1"):
    opinion_split(test_fraction=0.6, val_fraction=0.4)


def test_tfidf_baseline_beats_the_majority_class(split):
  pytest.importorskip("sklearn", reason="the TF-IDF baseline needs scikit-learn (dev extra)")
  result = tfidf_lr_baseline(split["train"], split["test"])
  majority = np.bincount(split["test"]["labels"]).max() / len(split["test"]["labels"])
  assert result["majority_rate"] == pytest.approx(majority)
  assert result["accuracy"] > majority + 0.15, result  # 0.589 against 0.363
  assert 0.5 < result["macro_f1"] < 0.7 and 0.5 < result["accuracy"] < 0.7, result


def test_macro_f1_equals_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  cases = [(rng.integers(0, 3, 200), rng.integers(0, 3, 200)),
           (rng.integers(0, 3, 50), np.zeros(50, int)),  # two classes never predicted
           (np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])),  # class 2 nowhere
           (np.array([0, 1, 2]), np.array([0, 1, 2]))]
  for y_true, y_pred in cases:
    ours = macro_f1(y_true, y_pred, 3)
    assert ours == pytest.approx(
        sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
  assert macro_f1([0, 1, 2], [0, 1, 2], 3) == 1.0
  with pytest.raises(UserError, match="classes 0..2"):
    macro_f1([0, 3], [0, 1], 3)


def _write_stream(split, path, burst: bool, per_window: int = 20, windows: int = 60):
  """Held-out snippets at random times in hourly windows, written as jsonl with ISO times;
  in the burst windows 16 of 20 records are negative. Returns {text: true label}.

  The stream is fixed (seed 7): with z_threshold 3 and 20 records a window, ~0.25% of
  windows cross it by chance, and here the largest chance z is 1.8 (the burst's: 4.3-4.7)."""
  test = split["test"]
  rng = np.random.default_rng(7)
  picks = rng.permutation(len(test["texts"]))[:windows * per_window].reshape(windows, -1)
  if burst:
    negatives = np.flatnonzero(test["labels"] == 0)
    for w in BURST:
      picks[w, :16] = rng.choice(negatives, 16, replace=False)
  offsets = rng.uniform(0, HOUR, picks.shape)
  lines = []
  for w in range(windows):
    for i, o in zip(picks[w], offsets[w], strict=True):
      moment = datetime.datetime.fromtimestamp(T0 + w * HOUR + o, datetime.timezone.utc)
      lines.append(json.dumps({"text": test["texts"][i], "time": moment.isoformat()}))
  rng.shuffle(lines)  # records need not come in time order
  path.write_text("\n".join(lines) + "\n")
  return dict(zip(test["texts"], test["labels"].tolist(), strict=True))


def _alerts_of(path, truth):
  records = read_records(str(path))
  # The true labels stand in for a classifier's output: this is a test of the alerting.
  labels = [truth[r["text"]] for r in records]
  starts, counts, shares = window_shares([r["time"] for r in records], labels, HOUR, 3)
  return starts, counts, shares, negative_alerts(shares[:, 0], counts.sum(axis=1),
                                                 window_starts=starts)


def test_a_burst_of_negatives_is_flagged_exactly(split, tmp_path):
  truth = _write_stream(split, tmp_path / "burst.jsonl", burst=True)
  starts, counts, shares, alerts = _alerts_of(tmp_path / "burst.jsonl", truth)
  assert len(starts) == 60 and starts[0] == T0 and (counts.sum(axis=1) == 20).all()
  assert [a["window"] for a in alerts] == list(BURST)
  for a in alerts:  # flagged windows stay out of the baseline, so all three share it
    assert a["share"] >= 0.8 and a["z"] > 3 and a["baseline_windows"] == 40
    assert 0.2 < a["baseline_mean"] < 0.4 and a["start"] == T0 + a["window"] * HOUR
    assert a["z"] == pytest.approx((a["share"] - a["baseline_mean"]) / a["baseline_std"])
  assert alerts[0]["start_utc"] == "2024-05-03T04:00:00+00:00"
  out = write_alerts(alerts, str(tmp_path / "out" / "alerts.jsonl"))
  assert [json.loads(line) for line in open(out)] == alerts
  png = plot_monitor(starts, shares, alerts, str(tmp_path / "out" / "monitor.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(os.listdir(tmp_path / "out")) == ["alerts.jsonl", "monitor.png"]  # no temps


def test_the_same_stream_without_a_burst_raises_no_alert(split, tmp_path):
  truth = _write_stream(split, tmp_path / "calm.jsonl", burst=False)
  _, _, shares, alerts = _alerts_of(tmp_path / "calm.jsonl", truth)
  assert alerts == []
  assert 0.2 < shares[:, 0].mean() < 0.4  # the real class mix
  assert write_alerts(alerts, str(tmp_path / "none.jsonl")) and not (
      tmp_path / "none.jsonl").read_text()


def test_alert_rule_std_floor_warmup_and_long_bursts():
  counts = np.full(30, 20)
  flat = np.full(30, 0.3)
  flat[20] = 0.4  # 2 more negatives of 20 against a history with std 0: noise, not a surge
  assert negative_alerts(flat, counts) == []
  flat[20] = 0.9
  assert [a["window"] for a in negative_alerts(flat, counts)] == [20]
  early = np.full(30, 0.3)
  early[3] = 0.9  # before the warmup of 5 windows nothing is judged
  assert negative_alerts(early, counts) == []
  assert [a["window"] for a in negative_alerts(early, counts, warmup=3)] == [3]
  long = np.full(30, 0.3)
  long[10:20] = 0.8  # a ten-window burst is flagged throughout
  assert [a["window"] for a in negative_alerts(long, counts)] == list(range(10, 20))
  sparse = flat.copy()
  sparse_counts = counts.copy()
  sparse_counts[20] = 2  # too few records to judge
  assert negative_alerts(sparse, sparse_counts, min_count=5) == []


def test_windows_are_aligned_and_keep_empty_ones():
  starts, counts, shares = window_shares([5000.0, 5100.0, 12000.0, 5200.0], [0, 2, 1, 2],
                                         HOUR, 3)
  np.testing.assert_array_equal(starts, [3600.0, 7200.0, 10800.0])  # on the hour
  np.testing.assert_array_equal(counts, [[1, 0, 2], [0, 0, 0], [0, 1, 0]])
  np.testing.assert_allclose(shares, [[1 / 3, 0, 2 / 3], [0, 0, 0], [0, 1, 0]])
  with pytest.raises(UserError, match="classes 0..2"):
    window_shares([0.0], [3], HOUR, 3)


def test_bad_input_names_the_line_and_the_fix(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(UserError, match=f"no records in {empty}"):
    read_records(str(empty))
  no_time = tmp_path / "no_time.jsonl"
  no_time.write_text('{"text": "fine", "time": 0}\n{"text": "no time here"}\n')
  with pytest.raises(UserError, match=r"line 2 has no 'time' field"):
    read_records(str(no_time))
  no_text = tmp_path / "no_text.jsonl"
  no_text.write_text('{"body": "x", "time": 0}\n')
  with pytest.raises(UserError, match=r"line 1 has no 'text' field"):
    read_records(str(no_text))
  assert read_records(str(no_text), text_field="body")[0]["text"] == "x"
  not_json = tmp_path / "not_json.jsonl"
  not_json.write_text('{"text": "a", "time": 1}\n\n{"text": "b", "time": 2\n')
  with pytest.raises(UserError, match="line 3 is not JSON"):
    read_records(str(not_json))
  bad_time = tmp_path / "bad_time.jsonl"
  bad_time.write_text('{"text": "a", "time": "yesterday"}\n')
  with pytest.raises(UserError, match="line 1 field 'time' is 'yesterday'"):
    read_records(str(bad_time))
  times = tmp_path / "times.jsonl"
  times.write_text('{"text": "a", "time": "2024-05-01T12:00:00Z"}\n'
                   '{"text": "b", "time": "2024-05-01T14:00:00+02:00"}\n'
                   '{"text": "c", "time": 1714564800}\n')
  assert [r["time"] for r in read_records(str(times))] == [T0] * 3
  with pytest.raises(UserError, match="no such file"):
    read_records(str(tmp_path / "missing.jsonl"))


def test_read_texts(tmp_path):
  txt = tmp_path / "posts.txt"
  txt.write_text("first post\n\n  second post  \n")
  assert read_texts(str(txt)) == ["first post", "second post"]
  jsonl = tmp_path / "posts.jsonl"
  jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
  assert read_texts(str(jsonl)) == ["a", "b"]
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(UserError, match="no texts in"):
    read_texts(str(tmp_path / "blank.txt"))
  with pytest.raises(UserError, match="give a .txt file"):
    read_texts(str(tmp_path / "posts.csv"))

