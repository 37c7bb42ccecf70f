"""ABC tunes rendered to files a person can use: .abc, .mid (read back note for note),
.wav (FluidSynth: duration and loudness checked) and a piano-roll PNG."""

import shutil

import numpy as np
import pytest

from aigc_jax.errors import UserError
from aigc_jax.music import render

music21 = pytest.importorskip("music21", reason="rendering needs the music extra")

JIG = "X:1\nM:6/8\nL:1/8\nQ:1/4=120\nK:D\nDFA dAF | GBd gdB | AFD [DA]2 z |]\n"


def test_midi_holds_every_note_of_the_tune(tmp_path):
  score = render.parse_abc(JIG)
  events = render.note_events(score)
  assert len(events) == 6 + 6 + 3 + 2  # single notes, then the chord [DA]: two rows; no rest
  path = render.write_midi(events, str(tmp_path / "jig.mid"), render.tempo_bpm(score))
  with open(path, "rb") as f:
    np.testing.assert_allclose(read_midi_notes(f.read()), events)
  assert render.tempo_bpm(score) == 120.0
  # music21 reads the file too (it splits the last chord at the beat: same pitches).
  back = music21.converter.parse(path, quantizePost=False)
  assert {p.midi for n in back.flatten().notes for p in n.pitches} == set(events[:, 2])


def read_midi_notes(data: bytes) -> np.ndarray:
  """[N, 3] (onset, duration in quarter notes, pitch) of a one-track MIDI file whose
  events are tempo, program change, note on / off and end of track (what we write)."""
  assert data[:4] == b"MThd" and data[14:18] == b"MTrk"
  ticks = int.from_bytes(data[12:14], "big")
  i, now, playing, notes = 22, 0, {}, []
  while i < len(data):
    delta = 0
    while True:  # a variable-length quantity
      delta = (delta << 7) | (data[i] & 0x7F)
      i += 1
      if data[i - 1] < 0x80:
        break
    now += delta
    status = data[i]
    if status == 0xFF:  # meta: type, length, payload
      i += 3 + data[i + 2]
    elif status == 0xC0:
      i += 2
    else:
      pitch = data[i + 1]
      if status == 0x90:
        playing[pitch] = now
      else:
        start = playing.pop(pitch)
        notes.append((start / ticks, (now - start) / ticks, pitch))
      i += 3
  return np.asarray(sorted(notes), np.float64)


@pytest.mark.skipif(shutil.which("fluidsynth") is None,
                    reason="no fluidsynth: `make data` installs it as root")
def test_a_real_tune_becomes_abc_midi_audio_and_a_piano_roll(tmp_path):
  from aigc_jax.data.abc_corpus import load_abc_tunes
  tunes, _ = load_abc_tunes(collections=["oneills1850"])
  tune = tunes[5]
  paths = render.write_tune(tune.text, str(tmp_path / "tune"))
  assert paths["valid"] and (tmp_path / "tune.abc").read_text() == tune.text
  events = render.note_events(render.parse_abc(tune.text))
  expected = (events[:, 0] + events[:, 1]).max() * 60 / 120  # quarter notes at 120 bpm
  stats = render.wav_stats(paths["wav"])
  assert expected < stats["seconds"] < expected + 3  # plus the last notes' release
  assert stats["rms"] > 0.01  # audible, not silence
  assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_unreadable_abc_is_kept_as_text_only(tmp_path):
  paths = render.write_tune("X:1\nK:C\n][ not music\n", str(tmp_path / "bad"))
  assert paths == {"abc": str(tmp_path / "bad.abc"), "valid": False}


def test_missing_fluidsynth_names_make_data_after_writing_the_rest(tmp_path, monkeypatch):
  monkeypatch.setenv(render.FLUIDSYNTH_ENV, str(tmp_path / "no-such-fluidsynth"))
  with pytest.raises(UserError, match="make data"):
    render.write_tune(JIG, str(tmp_path / "jig"))
  assert {p.suffix for p in tmp_path.iterdir()} == {".abc", ".mid", ".png"}
  monkeypatch.delenv(render.FLUIDSYNTH_ENV)
  monkeypatch.setenv(render.SOUNDFONT_ENV, str(tmp_path / "none.sf2"))
  if shutil.which("fluidsynth"):
    with pytest.raises(UserError, match="SoundFont.*make data"):
      render.fluidsynth_and_soundfont()


def test_samples_keep_every_tune_and_name_make_data_without_fluidsynth(tmp_path, monkeypatch):
  monkeypatch.setenv(render.FLUIDSYNTH_ENV, str(tmp_path / "no-such-fluidsynth"))
  with pytest.raises(UserError, match=r"wrote 2 tunes .*1 read as music.*make data"):
    render.write_samples([JIG, "X:1\nK:C\n][\n"], str(tmp_path / "out"), "s")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "s_0.abc", "s_0.mid", "s_0.png", "s_1.abc"]
