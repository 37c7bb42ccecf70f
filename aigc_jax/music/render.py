"""Music as files a person can use: the text (`.abc`, or a chorale's event words in `.txt`),
a `.mid` file, a `.wav` rendered by FluidSynth with a General MIDI SoundFont, and a
piano-roll PNG.

FluidSynth and the SoundFont are Debian packages (`fluidsynth`, `fluid-soundfont-gm`)
that `make data` installs; $AIGC_JAX_FLUIDSYNTH and $AIGC_JAX_SOUNDFONT point elsewhere.
Every file is written atomically; FluidSynth runs under a deadline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import replaced_atomically, write_text

SOUNDFONT_ENV, FLUIDSYNTH_ENV = "AIGC_JAX_SOUNDFONT", "AIGC_JAX_FLUIDSYNTH"
SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2",
              "/usr/share/sounds/sf2/TimGM6mb.sf2")
SAMPLE_RATE = 44_100
RENDER_TIMEOUT_S = 120  # a folk tune renders in about a second
_MISSING = ("run `make data` (it installs Debian's fluidsynth and fluid-soundfont-gm), or "
            "set ${env} to {what}")


def _music21():
  try:
    import music21
  except ImportError as e:
    raise UserError("rendering ABC needs music21: pip install 'aigc_jax[music]'") from e
  return music21


def parse_abc(text: str):
  """A music21 Score of one ABC tune, or None when music21 cannot read it."""
  music21 = _music21()
  try:
    score = music21.converter.parse(text, format="abc", forceSource=True)
  except Exception:  # music21 raises many kinds of errors on malformed ABC
    return None
  return score if score.flatten().notes else None


def note_events(score) -> np.ndarray:
  """[N, 3] float64 rows (onset, duration, MIDI pitch), onsets and durations in quarter
  notes, every pitch of a chord its own row, sorted by onset."""
  rows = []
  for n in score.flatten().notes:
    for p in getattr(n, "pitches", ()):
      rows.append((float(n.offset), float(n.quarterLength), float(p.midi)))
  return np.asarray(sorted(rows), np.float64).reshape(-1, 3)


def _vlq(n: int) -> bytes:
  """MIDI's variable-length quantity: 7 bits a byte, high bit set on all but the last."""
  out = [n & 0x7F]
  while n > 0x7F:
    n >>= 7
    out.append(0x80 | (n & 0x7F))
  return bytes(reversed(out))


def midi_bytes(events: np.ndarray, bpm: float = 120.0, program: int = 0,
               ticks_per_quarter: int = 480) -> bytes:
  """A standard MIDI file (format 0, one track) of `events` [N, 3] (onset, duration in
  quarter notes, MIDI pitch) at `bpm` quarter notes a minute, General MIDI `program`.
  Written here rather than by music21, whose MIDI writer fails on some ABC scores (a
  time signature found twice in its conductor track)."""
  timed = []  # (tick, order: offs before ons at the same tick, status, pitch, velocity)
  for onset, duration, pitch in events:
    start = round(onset * ticks_per_quarter)
    end = max(start + 1, round((onset + duration) * ticks_per_quarter))
    timed += [(start, 1, 0x90, int(pitch), 80), (end, 0, 0x80, int(pitch), 0)]
  tempo = round(60_000_000 / bpm)
  track = bytearray(b"\x00\xff\x51\x03" + tempo.to_bytes(3, "big") + bytes([0, 0xC0, program]))
  now = 0
  for tick, _, status, pitch, velocity in sorted(timed):
    track += _vlq(tick - now) + bytes([status, pitch, velocity])
    now = tick
  track += b"\x00\xff\x2f\x00"
  header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
  header += ticks_per_quarter.to_bytes(2, "big")
  return header + b"MTrk" + len(track).to_bytes(4, "big") + bytes(track)


def tempo_bpm(score, default: float = 120.0) -> float:
  """The tune's tempo in quarter notes a minute (its `Q:` field), else `default`."""
  marks = score.flatten().getElementsByClass("MetronomeMark")
  return float(marks[0].getQuarterBPM()) if marks else default


def write_midi(events: np.ndarray, path: str, bpm: float = 120.0, program: int = 0) -> str:
  with replaced_atomically(path, suffix=".mid") as tmp, open(tmp, "wb") as f:
    f.write(midi_bytes(events, bpm, program))
  return path


def write_piano_roll(events: np.ndarray, path: str, title: str = "") -> str:
  """A piano roll of `events` [N, 3] (onset, duration, pitch): time in quarter notes
  across, pitch up."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  end = float((events[:, 0] + events[:, 1]).max()) if len(events) else 1.0
  fig, ax = plt.subplots(figsize=(min(16, 2 + end / 4), 3.5))
  ax.broken_barh([(0, 0)], (0, 0))  # keeps an empty roll a valid plot
  for onset, duration, pitch in events:
    ax.broken_barh([(onset, max(duration, 0.05))], (pitch - 0.4, 0.8), color="tab:blue")
  if len(events):
    ax.set_ylim(events[:, 2].min() - 2, events[:, 2].max() + 2)
  ax.set_xlim(0, end)
  ax.set_xlabel("quarter notes")
  ax.set_ylabel("MIDI pitch")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  with replaced_atomically(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path


def fluidsynth_and_soundfont() -> tuple[str, str]:
  """The FluidSynth program and a General MIDI SoundFont, or one UserError saying how to
  get them."""
  program = os.environ.get(FLUIDSYNTH_ENV) or shutil.which("fluidsynth")
  if not program or not os.access(program, os.X_OK):
    raise UserError("FluidSynth is not installed, so no .wav can be rendered: "
                    + _MISSING.format(env=FLUIDSYNTH_ENV, what="the fluidsynth program"))
  candidates = [os.environ[SOUNDFONT_ENV]] if os.environ.get(SOUNDFONT_ENV) else SOUNDFONTS
  soundfont = next((f for f in candidates if os.path.isfile(f)), None)
  if soundfont is None:
    raise UserError(f"no General MIDI SoundFont at {', '.join(candidates)}: "
                    + _MISSING.format(env=SOUNDFONT_ENV, what="an .sf2 file"))
  return program, soundfont


def render_wav(midi_path: str, wav_path: str, sample_rate: int = SAMPLE_RATE) -> str:
  """The MIDI file rendered to a 16-bit stereo WAV by FluidSynth (no audio device)."""
  program, soundfont = fluidsynth_and_soundfont()
  with replaced_atomically(wav_path, suffix=".wav") as tmp:
    try:
      command = [program, "-ni", "-q", "-g", "1.0", "-F", tmp, "-r", str(sample_rate),
                 soundfont, midi_path]
      proc = subprocess.run(command, capture_output=True, text=True,
                            timeout=RENDER_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
      raise UserError(f"FluidSynth did not finish rendering {midi_path} in "
                      f"{RENDER_TIMEOUT_S} s") from e
    if proc.returncode != 0 or not os.path.exists(tmp):
      raise UserError(f"FluidSynth failed on {midi_path} (exit {proc.returncode}): "
                      f"{(proc.stderr or proc.stdout).strip()[-500:]}")
  return wav_path


def wav_stats(path: str) -> dict:
  """{"seconds", "rms"} of a 16-bit WAV file (rms of the samples in [-1, 1])."""
  with wave.open(path, "rb") as w:
    frames, rate = w.getnframes(), w.getframerate()
    if w.getsampwidth() != 2:
      raise ValueError(f"{path}: expected 16-bit samples, got {8 * w.getsampwidth()}-bit")
    samples = np.frombuffer(w.readframes(frames), np.int16).astype(np.float64) / 32768.0
  rms = float(np.sqrt(np.mean(samples ** 2))) if samples.size else 0.0
  return {"seconds": frames / rate, "rms": rms}


def write_tune(text: str, stem: str, audio: bool = True) -> dict:
  """`stem`.abc always; `stem`.mid and `stem`.png when music21 reads the tune; `stem`.wav
  too when `audio`. Returns {"abc", "mid", "png", "wav": paths (absent: not written),
  "valid": whether music21 read it}. A missing FluidSynth raises its UserError after the
  other files are written."""
  paths = {"abc": write_text(stem + ".abc", text if text.endswith("\n") else text + "\n")}
  score = parse_abc(text)
  paths["valid"] = score is not None
  if score is None:
    return paths
  events = note_events(score)
  paths["mid"] = write_midi(events, stem + ".mid", tempo_bpm(score))
  paths["png"] = write_piano_roll(events, stem + ".png", os.path.basename(stem))
  if audio:
    paths["wav"] = render_wav(paths["mid"], stem + ".wav")
  return paths


CHORALE_BPM, CHURCH_ORGAN = 80.0, 19  # General MIDI program 20, counted from 0


def write_chorale(text: str, stem: str, audio: bool = True) -> dict:
  """A chorale's event text as `stem`.txt always; `stem`.mid (an organ, 80 quarter notes
  a minute) and `stem`.png when it holds a note (malformed words skipped, counted in
  "skipped"); `stem`.wav too when `audio`. Returns the paths as `write_tune` does."""
  from aigc_jax.data.chorales import chorale_events, read_events
  paths = {"txt": write_text(stem + ".txt", text if text.endswith("\n") else text + "\n")}
  chorale, report = read_events(text)
  events = chorale_events(chorale)[:, :3]  # (onset, duration, pitch); all voices alike
  paths.update(valid=len(events) > 0, skipped=report["skipped"])
  if len(events):
    paths["mid"] = write_midi(events, stem + ".mid", CHORALE_BPM, CHURCH_ORGAN)
    paths["png"] = write_piano_roll(events, stem + ".png", os.path.basename(stem))
    if audio:
      paths["wav"] = render_wav(paths["mid"], stem + ".wav")
  return paths


def write_samples(tunes: list[str], out_dir: str, tag: str, kind: str = "abc",
                  audio: bool = True) -> tuple[list[dict], str]:
  """Each tune (ABC text; kind 'chorale': event text) as `out_dir`/`tag`_i.{abc or txt,
  mid,png,wav} (`write_tune`, `write_chorale`); returns the paths and a one-line summary.
  The text, .mid and .png of every tune are written before any audio, so a missing
  FluidSynth (its UserError, raised last) loses none of them; `audio=False`: no .wav."""
  os.makedirs(out_dir, exist_ok=True)
  stems = [os.path.join(out_dir, f"{tag}_{i}") for i in range(len(tunes))]
  write = write_chorale if kind == "chorale" else write_tune
  written = [write(t, stem, audio=False) for t, stem in zip(tunes, stems, strict=True)]
  valid = [w for w in written if w["valid"]]
  suffix = "txt" if kind == "chorale" else "abc"
  summary = (f"wrote {len(tunes)} tunes to {out_dir} ({tag}_*.{suffix}; {len(valid)} read "
             "as music: .mid, .png")
  for w in valid if audio else ():
    try:
      w["wav"] = render_wav(w["mid"], w["mid"][:-len(".mid")] + ".wav")
    except UserError as e:
      raise UserError(f"{summary}; no .wav: {e}") from e
  return written, summary + (", .wav)" if audio else ")")
