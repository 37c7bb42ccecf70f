"""The LM family trained on ABC tunes: the `abc` data source (split by tune) and the ABC
tokenizer saved with the run and read back."""

import json

import jax
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.data import text as text_data
from aigc_jax.data.abc_corpus import load_abc_tunes
from aigc_jax.data.tokenizers import load_tokenizer
from aigc_jax.errors import UserError
from aigc_jax.families import lm
from aigc_jax.train import train_and_evaluate
from tests.conftest import ROOT, TINY_CONFIG, run_cli

pytest.importorskip("music21", reason="the ABC corpus ships in music21 (the music extra)")


def abc_config(**data):
  c = config_from_file(TINY_CONFIG)
  c.data.update(**{"name": "abc", "tokenizer": "abc", "abc_collections": ("ryansMammoth",),
                   "seq_len": 64, "limit_files": 0, **data})
  c.train.update(steps=6, eval_every=6, checkpoint_every=6, log_every=3)
  c.music.update(eval_samples=3, eval_max_new_tokens=40)
  return c


def test_the_abc_source_splits_by_tune_and_the_lm_trains_on_abc_tokens(tmp_path):
  c = abc_config()
  train, val = text_data.load_documents(c.data)
  tunes, _ = load_abc_tunes(collections=["ryansMammoth"])
  assert len(train) + len(val) == len(tunes) and 0 < len(val) < 0.1 * len(tunes)
  assert not {text for _, text in train} & {text for _, text in val}
  assert all(text.startswith("X:1\nM:") for _, text in train[:50])  # the prompt order

  summary = train_and_evaluate(c, str(tmp_path), progress=False)
  assert np.isfinite(summary["val_loss"])
  assert summary["val_bits_per_token"] == pytest.approx(summary["val_loss"] / np.log(2))
  # Each evaluation samples music.eval_samples tunes and measures them beside the held-out
  # tunes (after 6 steps the tunes are noise: few parse, and none keeps its meter).
  assert summary["music_n"] == 3 and 0 <= summary["music_validity"] <= 0.34
  assert 0 <= summary["music_parse_rate"] <= 1 and 0 < summary["music_pitch_class_kl"]
  saved = json.loads((tmp_path / "tokenizer.json").read_text())
  assert saved["kind"] == "abc"
  tokenizer = load_tokenizer(str(tmp_path))
  assert all(tokenizer.decode(tokenizer.encode(text)) == text for _, text in val)
  # Fewer tokens than bytes: the units are ABC's (a byte tokenizer gives one per byte;
  # this vocabulary, from one collection's ~1,000 tunes, gives ~0.77; test_abc checks the
  # whole corpus's).
  ids = text_data.tokenize_documents(tokenizer, val)
  assert len(ids) < 0.85 * text_data.corpus_size_bytes(val)

  family = lm.Family(c, str(tmp_path))  # the run's own tokenizer, read back
  assert family.tokenizer.kind == "abc" and family.tokenizer.vocab_size == tokenizer.vocab_size
  params = jax.tree.map(np.asarray, family.init_state(jax.random.PRNGKey(0)).params)
  [out] = family.generate_text(params, ["X:1\nM:6/8\nL:1/8\nK:D\n"], max_new_tokens=8)
  assert isinstance(out, str) and out  # a continuation of the header prompt

  # `aigc-jax sample` on a music run also writes each tune as .abc (and, where music21
  # reads it, .mid and a piano roll; no FluidSynth here: then one error naming make data).
  proc = run_cli("sample", "--workdir", str(tmp_path), "--num", "2", "--max-new-tokens",
                 "30", env_extra={"AIGC_JAX_FLUIDSYNTH": str(tmp_path / "none")})
  music = tmp_path / "samples" / "music"
  assert sorted(p.name for p in music.glob("*.abc")) == ["sample_seed0_0.abc",
                                                         "sample_seed0_1.abc"]
  if proc.returncode == 0:  # no sample read as music: nothing to render
    assert "0 read as music" in proc.stderr
  else:
    assert proc.returncode == 2 and "make data" in proc.stderr, proc.stderr[-2000:]

  # With --out, the tunes go beside that file (a read-only run folder stays untouched).
  out = tmp_path / "elsewhere" / "tunes.txt"
  out.parent.mkdir()
  proc = run_cli("sample", "--workdir", str(tmp_path), "--num", "1", "--max-new-tokens",
                 "30", "--out", str(out), env_extra={"AIGC_JAX_FLUIDSYNTH": str(tmp_path / "x")})
  assert (out.parent / "tunes_0.abc").read_text().startswith(c.sample.prompt)
  if proc.returncode == 0:  # no tune read as music, so none to render: the text is out
    assert (out.parent / "tunes_0.abc").read_text().strip() in out.read_text()
  else:
    assert proc.returncode == 2 and "make data" in proc.stderr, proc.stderr[-2000:]
  assert sorted(p.name for p in music.glob("*.abc")) == ["sample_seed0_0.abc",
                                                         "sample_seed0_1.abc"]

  # The quality table: the LM beside the n-gram baseline and the held-out tunes.
  from benchmarks import music_quality
  r = music_quality.main(["--ours", str(tmp_path), "--samples", "3",
                          "--out", str(tmp_path / "quality.json")])
  assert r["transformer"]["n"] == r["ngram"]["n"] == 3 and r["held_out"]["n"] == len(val)
  assert r["ngram"]["bits_per_token"] < r["transformer"]["bits_per_token"]  # 6 steps only
  assert r["held_out"]["validity"] > 0.8 and r["held_out"]["pitch_class_overlap"] > 0.9
  assert "| transformer |" in (tmp_path / "quality.md").read_text()


def test_a_folder_of_abc_files_and_settings_the_source_does_not_read(tmp_path):
  (tmp_path / "mine.abc").write_text(
      "X:1\nT:One\nM:6/8\nL:1/8\nK:D\nDFA dAF | GBd gdB |]\n\n"
      "X:2\nT:No key\nM:6/8\nDFA |]\n\n"
      "X:3\nT:Two\nM:2/4\nL:1/8\nK:G\nGABc dBGB |]\n")
  c = abc_config(abc_path=str(tmp_path), abc_collections=(), val_fraction=0.5)
  train, val = text_data.load_documents(c.data)
  assert len(train) + len(val) == 2  # the tune without K: skipped, counted in the log
  c.data.abc_strict = True
  with pytest.raises(UserError, match=r"mine\.abc:8: malformed ABC tune \(no K:"):
    text_data.load_documents(c.data)

  stdlib = config_from_file(TINY_CONFIG)
  stdlib.data.abc_path = str(tmp_path)
  with pytest.raises(UserError, match="data.abc_path.*data.name='abc'"):
    lm.validate(stdlib)
  stdlib = config_from_file(TINY_CONFIG)
  stdlib.music.eval_samples = 8
  with pytest.raises(UserError, match="music.eval_samples.*data.tokenizer='abc'"):
    lm.validate(stdlib)
  music = abc_config()
  music.music.update(eval_samples=0)
  with pytest.raises(UserError, match="music.eval_max_new_tokens.*music.eval_samples is 0"):
    lm.validate(music)
  stdlib = config_from_file(TINY_CONFIG)
  stdlib.data.bpe_vocab_size = 512
  with pytest.raises(UserError, match="data.bpe_vocab_size.*tokenizer='bpe'"):
    lm.validate(stdlib)


def test_the_music_config_reads_the_corpus_with_the_abc_tokenizer():
  c = config_from_file(str(ROOT / "configs" / "music_abc.py"))
  lm.validate(c)
  assert c.data.name == "abc" and c.data.tokenizer == "abc"
  assert c.sample.prompt.startswith("X:1\nM:6/8\n")


def test_pretrain_then_fine_tune_on_one_meter(tmp_path):
  """An ABC LM fine-tuned on its 6/8 tunes with the fine-tuning machinery: it starts from
  the pretrained weights exactly, learns, keeps the held-out 6/8 tunes out of both runs,
  and samples music files; formats and tasks that do not go together are refused."""
  from aigc_jax.families import finetune
  pre = tmp_path / "pre"
  c = abc_config()
  train_and_evaluate(c, str(pre), progress=False)

  ft = config_from_file(str(ROOT / "configs" / "music_abc_jigs.py"))
  ft.pretrained.path = str(pre)
  ft.data.update(abc_collections=("ryansMammoth",), seq_len=64, max_eval_examples=32)
  ft.train.update(steps=8, batch_size=4, eval_every=8, checkpoint_every=8, log_every=4)
  ft.music.update(eval_samples=2, eval_max_new_tokens=24)
  ft.sample.update(num=1, max_new_tokens=16)
  finetune.validate(ft)
  family = finetune.Family(ft, str(tmp_path / "ft"))
  train_docs, val_docs = family._documents
  assert all("\nM:6/8\n" in text for _, text in train_docs + val_docs)
  _, pre_val = text_data.load_documents(c.data)  # the pretraining run's held-out tunes
  assert {t for _, t in val_docs} <= {t for _, t in pre_val}
  assert family.tokenizer.vocab_size == load_tokenizer(str(pre)).vocab_size

  summary = train_and_evaluate(ft, str(tmp_path / "ft"), progress=False)
  rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text()
          .splitlines()]
  evals = [r for r in rows if "val_loss" in r]
  assert evals[0]["step"] == 0 and summary["val_loss"] < evals[0]["val_loss"]
  # At step 0 the fine-tuning model is the pretrained one: its held-out loss there is the
  # pretrained model's on the same windows.
  from aigc_jax.train import open_run
  pre_run = open_run(c, str(pre), for_training=False)
  sums = {}
  for batch in family.eval_batches():
    for k, v in pre_run.family.eval_step(pre_run.state, batch).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  assert evals[0]["val_loss"] == pytest.approx(sums["nll_sum"] / sums["tokens"], rel=1e-5)
  assert summary["music_n"] == 2 and 0 <= summary["music_parse_rate"] <= 1

  proc = run_cli("sample", "--workdir", str(tmp_path / "ft"), "--num", "1",
                 "--max-new-tokens", "20", env_extra={"AIGC_JAX_FLUIDSYNTH": "/nonexistent"})
  assert (tmp_path / "ft" / "samples" / "music" / "sample_seed0_0.abc").exists()
  assert proc.returncode in (0, 2), proc.stderr[-2000:]

  bad = config_from_file(str(ROOT / "configs" / "music_abc_jigs.py"))
  bad.task.name, bad.data.name, bad.data.abc_fields = "sft", "stdlib_functions", ()
  with pytest.raises(UserError, match="pretrained.format.*task 'lm'"):
    finetune.validate(bad)
  bad = config_from_file(str(ROOT / "configs" / "music_abc_jigs.py"))
  bad.data.name = "text"
  with pytest.raises(UserError, match="data.abc_fields.*data.name='abc'"):
    finetune.validate(bad)
  bad = config_from_file(str(ROOT / "configs" / "music_abc_jigs.py"))
  bad.pretrained.path = str(tmp_path / "nowhere")
  with pytest.raises(UserError, match="is not a folder"):
    finetune.Family(bad, str(tmp_path / "ft2"))


@pytest.mark.sharded
@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 devices: `make test-8dev` runs it on 8 fake CPUs")
def test_a_music_run_on_8_devices_equals_one_device_and_resumes_on_either(tmp_path):
  """The ABC LM under fsdp4 x tensor2 trains as on one device (same losses and weights);
  its evaluation (likelihood and sampled-tune figures) is the same after resuming the
  sharded run on one device."""
  from tests.conftest import MUSIC_CONFIG
  from tests.test_sharding import ONE_DEVICE, _assert_same_training, _train
  mesh = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "optim.eps": 1e-6}
  one = _train(MUSIC_CONFIG, {**ONE_DEVICE, "optim.eps": 1e-6}, tmp_path / "one")
  sharded = _train(MUSIC_CONFIG, mesh, tmp_path / "mesh")
  _assert_same_training(one, sharded)

  cfg = config_from_file(MUSIC_CONFIG, {**mesh, "train.steps": 4, "train.eval_every": 4,
                                        "train.checkpoint_every": 4})
  summary = train_and_evaluate(cfg, str(tmp_path / "run"), progress=False)
  assert summary["music_n"] == 4 and (tmp_path / "run" / "tokenizer.json").exists()
  resumed = train_and_evaluate(config_from_file(MUSIC_CONFIG, {**ONE_DEVICE,
                                                               "train.steps": 4}),
                               str(tmp_path / "run"), progress=False)
  assert resumed["start_step"] == 4
  for key in ("val_loss", "music_parse_rate", "music_bar_accuracy", "music_pitch_class_kl"):
    assert resumed[key] == pytest.approx(summary[key], abs=1e-5), key
