"""Bach chorales from music21's corpus: loading, event texts, their tokenizer, the split."""

from __future__ import annotations

import importlib.util
import json
import os
from fractions import Fraction

import numpy as np
import pytest

from aigc_jax.data import chorales
from aigc_jax.data.chorales import (
    WORDS,
    Chorale,
    ChoraleTokenizer,
    Note,
    chorale_events,
    from_events,
    load_chorales,
    melody_key,
    read_events,
    split_chorales,
    to_events,
)
from aigc_jax.data.tokenizers import EOS_TEXT
from aigc_jax.errors import UserError

HAS_MUSIC21 = importlib.util.find_spec("music21") is not None
needs_music21 = pytest.mark.skipif(
    not HAS_MUSIC21, reason="the chorales come with music21: pip install 'aigc_jax[music]'")

# The hand-made chorale below (3/4, one sharp, a one-beat pickup): a soprano G5 tied
# over a bar line, a chord in the alto (its top note counts), tenor rests, a bass G2
# held for three bars (72 steps: d:64 d:8) and a grace note (dropped).
TINY_EVENTS = (
    "key:1 meter:3/4 pickup:8 "
    "bar v:0 n:74 d:8 v:1 n:71 d:8 v:2 n:67 d:8 v:3 n:55 d:8 "
    "bar v:0 n:79 d:32 v:1 n:71 d:24 v:2 n:62 d:8 v:3 n:43 d:64 d:8 p:16 v:2 n:62 d:8 "
    "bar v:1 n:72 d:16 p:8 v:0 n:78 d:16 p:16 v:1 n:69 d:8 "
    "bar v:0 n:79 d:24 v:1 n:71 d:24 v:2 n:62 d:24")


def _notes(*rows) -> tuple[Note, ...]:
  return tuple(Note(Fraction(o), Fraction(d), p) for o, d, p in rows)


TINY = Chorale("tiny", 1, "3/4", (
    _notes((0, 1, 74), (1, 4, 79), (5, 2, 78), (7, 3, 79)),
    _notes((0, 1, 71), (1, 3, 71), (4, 2, 72), (6, 1, 69), (7, 3, 71)),
    _notes((0, 1, 67), (1, 1, 62), (3, 1, 62), (7, 3, 62)),
    _notes((0, 1, 55), (1, 9, 43))), pickup=Fraction(1))


def _write_tiny_score(path: str) -> str:
  """TINY as a MusicXML score, written by music21 (ties, a chord, a grace note, rests)."""
  from music21 import chord, key, meter, note, stream, tie

  def n(name, ql, tie_type=None):
    x = note.Note(name, quarterLength=ql)
    if tie_type:
      x.tie = tie.Tie(tie_type)
    return x

  bars = {  # per part: the contents of the pickup bar and bars 1..3
      "Soprano": [[n("D5", 1)], [n("G5", 3, "start")], [n("G5", 1, "stop"), n("F#5", 2)],
                  [n("A5", 1).getGrace(), n("G5", 3)]],
      "Alto": [[n("B4", 1)], [n("B4", 3)], [chord.Chord(["A4", "C5"], quarterLength=2),
                                            n("A4", 1)], [n("B4", 3)]],
      "Tenor": [[n("G4", 1)], [n("D4", 1), note.Rest(quarterLength=1), n("D4", 1)],
                [note.Rest(quarterLength=3)], [n("D4", 3)]],
      "Bass": [[n("G3", 1)], [n("G2", 3, "start")], [n("G2", 3, "continue")],
               [n("G2", 3, "stop")]],
  }
  score = stream.Score()
  for name, contents in bars.items():
    part = stream.Part(id=name)
    part.partName = name
    for number, content in enumerate(contents):
      m = stream.Measure(number=number)
      if number == 0:
        m.append([key.KeySignature(1), meter.TimeSignature("3/4")])
        m.paddingLeft = 2
      m.append(content)
      part.append(m)
    score.insert(0, part)
  score.write("musicxml", fp=path)
  return path


@pytest.fixture(scope="session")
def corpus():
  """(chorales, report) of the whole corpus: parsed once (about half a minute), then read
  from the cache (~0.1 s)."""
  if not HAS_MUSIC21:
    pytest.skip("the chorales come with music21: pip install 'aigc_jax[music]'")
  return load_chorales()


# --- corpus ---------------------------------------------------------------------------
def test_corpus_counts(corpus):
  found, report = corpus
  assert 300 <= len(found) <= 410
  assert report["kept"] == len(found)
  assert report["read"] == len(found) + sum(report["skipped"].values())
  assert set(report["skipped"]) == set(chorales.SKIP_REASONS)
  assert report["skipped"]["duplicate"] >= 1  # the Humdrum twins of MusicXML files
  assert len({c.name for c in found}) == len(found)
  assert len({to_events(c) for c in found}) == len(found)  # no two alike
  assert {c.meter for c in found} >= {"4/4", "3/4"}
  assert any(c.pickup for c in found) and any(not c.pickup for c in found)


def test_every_chorale_round_trips(corpus):
  found, _ = corpus
  tok = ChoraleTokenizer()
  for c in found:
    assert len(c.voices) == 4 and all(c.voices), c.name
    assert all(n.duration > 0 for v in c.voices for n in v)
    assert all(a.onset + a.duration <= b.onset
               for v in c.voices for a, b in zip(v, v[1:], strict=False))
    text = to_events(c)
    back = from_events(text, name=c.name)
    assert back == c and back.voices == c.voices and back.pickup == c.pickup, c.name
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Bytes per token: a document and its end of sequence count len(text) + 1 bytes.
    lengths = tok.token_byte_lengths()
    assert lengths[ids].sum() + lengths[tok.eos_id] == len(text.encode()) + 1


def test_voices_are_soprano_to_bass(corpus):
  found, _ = corpus
  means = np.asarray([[np.mean([n.pitch for n in v]) for v in c.voices] for c in found])
  assert (np.diff(means.mean(0)) < -4).all()  # S > A > T > B by several semitones
  assert (np.diff(means, axis=1) < 0).mean() > 0.95


def test_chorale_events_array(corpus):
  c = corpus[0][0]
  rows = chorale_events(c)
  assert rows.shape == (sum(map(len, c.voices)), 4) and rows.dtype == np.float64
  assert (np.diff(rows[:, 0]) >= 0).all()
  for v, voice in enumerate(c.voices):
    mine = rows[rows[:, 3] == v]
    assert mine[:, 2].tolist() == [n.pitch for n in voice]
    assert mine[:, 0].tolist() == [float(n.onset) for n in voice]
    assert mine[:, 1].tolist() == [float(n.duration) for n in voice]
  assert chorale_events(Chorale("", 0, "4/4", ((),) * 4)).shape == (0, 4)


@needs_music21
def test_tiny_score_is_read_and_spelled_exactly(tmp_path):
  path = _write_tiny_score(str(tmp_path / "tiny.musicxml"))
  found, report = load_chorales([path], cache=False)
  assert report["kept"] == 1 and report["dropped"]["grace_notes"] == 1
  assert report["dropped"]["chord_notes"] == 1
  assert found[0] == TINY
  assert to_events(found[0]) == TINY_EVENTS
  assert from_events(TINY_EVENTS) == TINY
  assert ChoraleTokenizer().decode(ChoraleTokenizer().encode(TINY_EVENTS)) == TINY_EVENTS


def test_long_notes_and_empty_bars():
  c = Chorale("", 0, "4/4", (_notes((0, 4, 60), (12, 20, 62)), (), (), _notes((0, 36, 40))))
  text = to_events(c)
  # Two silent bars in the soprano are bare bar words; 160 steps are d:64 d:64 d:32.
  assert text == ("key:0 meter:4/4 pickup:0 bar v:0 n:60 d:32 v:3 n:40 d:64 d:64 d:64 "
                  "d:64 d:32 bar bar bar v:0 n:62 d:64 d:64 d:32")
  assert from_events(text) == c
  with pytest.raises(UserError, match="outside the event vocabulary"):
    to_events(Chorale("", 0, "5/4", c.voices))


# --- parsing model output ---------------------------------------------------------------
def test_strict_parse_names_the_bad_word():
  words = TINY_EVENTS.split()
  bad = list(words)
  bad[6] = "d:999"  # the soprano's first duration
  with pytest.raises(UserError, match=r"event word 6 'd:999'.*duration"):
    from_events(" ".join(bad))
  chorale, report = read_events(" ".join(bad))
  assert report["skipped"] == 3  # v:0 n:74 (a note without duration) and d:999
  assert report["reasons"] == {"note": 2, "unknown": 1}
  assert chorale.voices[0] == TINY.voices[0][1:] and chorale.voices[1:] == TINY.voices[1:]
  assert from_events(" ".join(bad), strict=False) == chorale


def test_out_of_order_and_overlapping_notes():
  # A second soprano note at the first onset, then an alto note that overlaps its own.
  extra = TINY_EVENTS.replace("v:1 n:71 d:8", "v:1 n:71 d:8 v:0 n:60 d:8", 1)
  with pytest.raises(UserError, match=r"event word 10 'v:0': voice 0 after voice 1"):
    from_events(extra)
  chorale, report = read_events(extra)
  assert chorale == TINY and report["reasons"] == {"voice_order": 3}
  overlap = TINY_EVENTS.replace("p:16 v:1 n:69", "p:16 v:0 n:69")  # F#5 sounds on
  with pytest.raises(UserError, match=r"event word 43 'v:0': the note overlaps the one "
                     "before it in voice 0"):
    from_events(overlap)
  chorale, report = read_events(overlap)
  assert report["reasons"] == {"overlap": 3} and chorale.voices[0] == TINY.voices[0]
  assert chorale.voices[1] == TINY.voices[1][:3] + TINY.voices[1][4:]
  backwards = TINY_EVENTS.replace("p:16 v:2 n:62 d:8", "p:16 v:2 n:62 d:8 p:8", 1)
  with pytest.raises(UserError, match="position 8 is not after 16"):
    from_events(backwards)
  assert read_events(backwards)[0] == TINY


def test_tolerant_parse_of_word_soup_never_raises():
  rng = np.random.default_rng(0)
  junk = ["", "bar", "p:0", "v:4", "n:200", "d:0", "key:9", "x", "d:", EOS_TEXT]
  vocab = np.asarray(list(WORDS) + junk)
  for size in [0, 1, 2, 5, 50, 400] * 20:
    words = rng.choice(vocab, size).tolist()
    if rng.random() < 0.5:  # a valid header, as a prompt would give
      words = ["key:0", "meter:3/4", "pickup:8", *words]
    text = " ".join(words)
    chorale, report = read_events(text)
    assert report["words"] == len(text.split())
    assert report["notes"] == sum(map(len, chorale.voices))
    assert report["notes"] * 3 + report["skipped"] <= report["words"]
    assert from_events(to_events(chorale)) == chorale  # whatever came out is well formed
  # Generated text ends at the end-of-sequence word; strict reading refuses it.
  chorale, report = read_events(TINY_EVENTS + f" {EOS_TEXT} bar v:0 n:60 d:8")
  assert chorale == TINY and report["reasons"] == {"after_end": 4}
  with pytest.raises(UserError, match="not an event word"):
    from_events(TINY_EVENTS + f" {EOS_TEXT}")
  with pytest.raises(UserError, match="event word 0 'meter:3/4'"):
    from_events(TINY_EVENTS.replace("key:1 ", "", 1))
  for text in ["key:0 meter:3/4 pickup:24", "key:0 meter:3/4 pickup:24 bar v:0 n:60 d:8"]:
    with pytest.raises(UserError, match="event word 2 'pickup:24'.*not shorter than a bar"):
      from_events(text)
    chorale, report = read_events(text)
    assert chorale.pickup == 0 and report["reasons"] == {"pickup": 1}


# --- tokenizer --------------------------------------------------------------------------
def test_tokenizer_vocabulary_save_and_load(tmp_path):
  tok = ChoraleTokenizer()
  assert tok.kind == "chorale" and tok.vocab_size == len(WORDS) + 1 < 600
  ids = tok.encode(TINY_EVENTS)
  assert ids.dtype == np.int32 and len(ids) == len(TINY_EVENTS.split())
  assert tok.eos_id not in ids and ids.min() >= 1 and ids.max() < tok.vocab_size
  assert tok.tokens(ids[:3]) == ["key:1", "meter:3/4", "pickup:8"]
  assert tok.decode([*ids[:3], tok.eos_id]) == f"key:1 meter:3/4 pickup:8 {EOS_TEXT}"
  assert [a.tolist() for a in tok.encode_batch([TINY_EVENTS, ""])] == [ids.tolist(), []]
  with pytest.raises(UserError, match=r"word 1 'meter:5/4'.*did you mean"):
    tok.encode("key:0 meter:5/4")
  lengths = tok.token_byte_lengths()
  assert lengths.shape == (tok.vocab_size,) and lengths[tok.encode("bar")[0]] == 4
  tok.save(str(tmp_path))
  with open(tmp_path / "tokenizer.json") as f:
    assert json.load(f)["kind"] == "chorale"
  again = ChoraleTokenizer.load(str(tmp_path))
  assert again.words == tok.words and again.encode(TINY_EVENTS).tolist() == ids.tolist()
  (tmp_path / "tokenizer.json").write_text('{"kind": "abc", "units": []}')
  with pytest.raises(UserError, match="not a chorale tokenizer"):
    ChoraleTokenizer.load(str(tmp_path))


# --- split and cache --------------------------------------------------------------------
def test_split_is_disjoint_deterministic_and_by_melody(corpus):
  found, _ = corpus
  train, val = split_chorales(found, 0.1)
  assert train and val and len(train) + len(val) == len(found)
  assert not {c.name for c in train} & {c.name for c in val}
  assert 0.04 < len(val) / len(found) < 0.2
  again = split_chorales(list(reversed(found)), 0.1)
  assert {c.name for c in again[1]} == {c.name for c in val}
  assert not {melody_key(c) for c in train} & {melody_key(c) for c in val}
  other = split_chorales(found, 0.1, seed=1)[1]
  assert {c.name for c in other} != {c.name for c in val}
  by_content = split_chorales(found, 0.1, by="content")
  assert by_content[0] and by_content[1]
  with pytest.raises(UserError):
    split_chorales(found, 1.0)


@needs_music21
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv(chorales.CACHE_ENV, str(tmp_path / "cache"))
  score = _write_tiny_score(str(tmp_path / "tiny.musicxml"))
  path = chorales.cache_path([score])
  assert path.startswith(str(tmp_path / "cache")) and path != chorales.cache_path()
  os.makedirs(os.path.dirname(path))
  for corrupt in ['{"version": 1, "chor', "[]", '{"version": 1, "music21": 0}', "\0\xff"]:
    with open(path, "w") as f:
      f.write(corrupt)
    found, report = load_chorales([score])
    assert report["source"] == "parsed" and found == [TINY]
  with open(path) as f:
    assert json.load(f)["chorales"][0][0] == "tiny"
  # Now a hit: the scores are not parsed again.
  monkeypatch.setattr(chorales, "_parse_corpus", lambda paths: pytest.fail("parsed"))
  found, report = load_chorales([score])
  assert report["source"] == "cache" and found == [TINY] and report["kept"] == 1


def test_an_lm_trains_on_the_chorales_and_samples_them_as_music(tmp_path):
  """The LM family on data.name='chorales': the event words as tokens (the run keeps its
  tokenizer), a held-out split by melody, and `aigc-jax sample` writing each chorale as
  event text, MIDI and a piano roll (no FluidSynth here: one error naming make data)."""
  from aigc_jax.config import config_from_file
  from aigc_jax.data import text as text_data
  from aigc_jax.data.tokenizers import load_tokenizer
  from aigc_jax.families import lm
  from aigc_jax.train import train_and_evaluate
  from tests.conftest import ROOT, run_cli

  c = config_from_file(str(ROOT / "configs" / "music_chorales.py"))
  lm.validate(c)
  c.model.update(num_layers=1, embed_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=1)
  c.data.seq_len = 64
  c.train.update(steps=4, batch_size=4, eval_every=4, checkpoint_every=4, log_every=2,
                 eval_batches=2)
  c.sample.update(num=1, max_new_tokens=24)
  train, val = text_data.load_documents(c.data)
  assert 300 < len(train) + len(val) and 0 < len(val) < 0.2 * (len(train) + len(val))
  assert all(text.startswith("key:") for _, text in train + val)
  summary = train_and_evaluate(c, str(tmp_path), progress=False)
  # ~262 ids: an untrained model starts near log2(262) = 8.0 bits per token.
  assert 5.0 < summary["val_bits_per_token"] < 9.0
  tokenizer = load_tokenizer(str(tmp_path))
  assert tokenizer.kind == "chorale" and all(
      tokenizer.decode(tokenizer.encode(t)) == t for _, t in val)

  proc = run_cli("sample", "--workdir", str(tmp_path), "--num", "2", "--max-new-tokens",
                 "40", env_extra={"AIGC_JAX_FLUIDSYNTH": str(tmp_path / "none")})
  music = tmp_path / "samples" / "music"
  texts = sorted(music.glob("*.txt"))
  assert [p.name for p in texts] == ["sample_seed0_0.txt", "sample_seed0_1.txt"]
  assert all(p.read_text().startswith("key:1 meter:4/4 pickup:0 ") for p in texts)
  if (music / "sample_seed0_0.mid").exists():
    assert (music / "sample_seed0_0.png").stat().st_size > 1000
    assert proc.returncode == 2 and "make data" in proc.stderr, proc.stderr[-2000:]

  # The quality table: the LM beside an n-gram over the same words, and real chorales.
  from benchmarks import chorale_quality
  r = chorale_quality.main(["--ours", str(tmp_path), "--samples", "2",
                            "--out", str(tmp_path / "quality.json")])
  assert r["transformer"]["n"] == r["ngram"]["n"] == 2 and r["held_out"]["n"] == len(val)
  assert r["held_out"]["word_validity"] == 1.0 and r["held_out"]["voice_order"] > 0.95
  assert "| transformer |" in (tmp_path / "quality.md").read_text()

  bad = config_from_file(str(ROOT / "configs" / "music_chorales.py"))
  bad.data.tokenizer = "byte"
  with pytest.raises(UserError, match="data.tokenizer.*'chorale'"):
    lm.validate(bad)


def test_a_real_chorale_becomes_midi_with_every_note_and_a_piano_roll(tmp_path):
  import music21

  from aigc_jax.music.render import write_samples
  found, _ = chorales.load_chorales()
  chorale = found[0]
  written, summary = write_samples([chorales.to_events(chorale)], str(tmp_path), "c",
                                   kind="chorale", audio=False)
  [w] = written
  assert w["valid"] and w["skipped"] == 0 and "1 read as music" in summary
  midi = music21.midi.MidiFile()  # the raw events: a score would split notes at bar lines
  midi.open(w["mid"])
  midi.read()
  midi.close()
  pitches = sorted(e.pitch for t in midi.tracks for e in t.events
                   if e.type == music21.midi.ChannelVoiceMessages.NOTE_ON and e.velocity > 0)
  assert pitches == sorted(n.pitch for voice in chorale.voices for n in voice)
  assert os.path.getsize(w["png"]) > 5000


def test_chorale_figures_are_high_on_real_chorales_and_low_on_scrambled_ones():
  """Real held-out chorales: every word valid, ~0.93 of notes in the key signature's
  scale, four voices sounding and in order; the same chorales with random pitches lose
  key and voice order but keep their rhythm (four voices sound)."""
  import dataclasses

  from aigc_jax.evaluation import chorale_eval
  found, _ = chorales.load_chorales()
  train, val = chorales.split_chorales(found, 0.1)
  real = chorale_eval.compare([chorales.to_events(c) for c in val],
                              [chorales.to_events(c) for c in train[:100]])
  assert real["word_validity"] == 1.0 and real["key_consistency"] > 0.88
  assert real["four_voices"] > 0.97 and real["voice_order"] > 0.95
  assert real["pitch_class_overlap"] > 0.85
  rng = np.random.default_rng(0)
  scrambled = [dataclasses.replace(c, voices=tuple(
      tuple(dataclasses.replace(n, pitch=int(rng.integers(40, 80))) for n in voice)
      for voice in c.voices)) for c in val]
  noise = chorale_eval.compare([chorales.to_events(c) for c in scrambled],
                               [chorales.to_events(c) for c in train[:100]])
  assert noise["key_consistency"] < 0.7 and noise["voice_order"] < 0.2
  assert noise["four_voices"] == pytest.approx(real["four_voices"])
  assert chorale_eval.key_scale(1) == {7, 9, 11, 0, 2, 4, 6}  # G major
  assert chorale_eval.key_scale(-3) == {3, 5, 7, 8, 10, 0, 2}  # E-flat major
