"""ABC folk tunes (music21's corpus, user folders) and the ABC tokenizer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aigc_jax.data import abc_corpus
from aigc_jax.data.abc_corpus import (
    DEFAULT_COLLECTIONS,
    ENV_VAR,
    load_abc_tunes,
    read_abc_folder,
    split_tunes,
)
from aigc_jax.data.abc_tokenizer import AbcTokenizer, split_units
from aigc_jax.data.text import tokenize_documents
from aigc_jax.errors import UserError

HAS_MUSIC21 = importlib.util.find_spec("music21") is not None
needs_music21 = pytest.mark.skipif(
    not HAS_MUSIC21, reason="the ABC corpus comes with music21: pip install 'aigc_jax[music]'")

TUNE = "X:{x}\nT:{title}\nM:6/8\nL:1/8\nK:D\n{body}\n"
JIG = "|:dfe dBA|B2d AFD|1 E3 E2:|2 E3 D3|]"


def _write(folder: Path, name: str, text: str | bytes) -> Path:
  path = folder / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
  return path


@pytest.fixture(scope="module")
def corpus():
  """(tunes, report) of music21's three folk collections, whatever $AIGC_JAX_ABC_CORPUS."""
  if not HAS_MUSIC21:
    pytest.skip("the ABC corpus comes with music21: pip install 'aigc_jax[music]'")
  root = abc_corpus.music21_corpus_root()
  return load_abc_tunes(root, collections=DEFAULT_COLLECTIONS)


@pytest.fixture(scope="module")
def split(corpus):
  return split_tunes(corpus[0])


@pytest.fixture(scope="module")
def tokenizer(split):
  return AbcTokenizer.train(t.text for t in split[0])


# --- corpus ---------------------------------------------------------------------------


@needs_music21
def test_corpus_counts_are_plausible(corpus):
  tunes, report = corpus
  print(f"\nABC corpus: {report}; skipped {report.by_reason()}")
  assert list(report.found) == list(DEFAULT_COLLECTIONS)
  # music21 10.5 ships 8514, 2009 and 1059 tunes; a later release may differ a little.
  for name, low, high in [("essenFolksong", 8000, 9000), ("oneills1850", 1900, 2100),
                          ("ryansMammoth", 1000, 1100)]:
    assert low <= report.found[name] <= high
    assert report.kept[name] >= 0.95 * report.found[name]
  assert len(tunes) == sum(report.kept.values())
  assert [t.collection for t in tunes] == sorted(
      (t.collection for t in tunes), key=DEFAULT_COLLECTIONS.index)
  for t in tunes:
    assert t.text.startswith("X:1\n") and t.text.endswith("\n") and t.body.strip()
    assert not any(line != line.rstrip() for line in t.text.split("\n"))
    assert "K" in t.fields and "M" in t.fields and "X" in t.fields
    assert not os.path.isabs(t.source) and t.source.startswith(t.collection + "/")
  assert len({t.music_id for t in tunes}) == len(tunes)  # duplicates are gone


@needs_music21
def test_split_is_by_tune_deterministic_and_stable(corpus, split):
  tunes = corpus[0]
  train, val = split
  print(f"\nABC split: {len(train)} train, {len(val)} validation")
  assert len(train) + len(val) == len(tunes)
  assert 0.03 < len(val) / len(tunes) < 0.07
  assert not {t.body for t in val} & {t.body for t in train}
  assert not {t.music_id for t in val} & {t.music_id for t in train}
  assert split_tunes(tunes) == (train, val)
  # Membership is per tune: the split of a subset is the subset of the split, so adding
  # files never moves the tunes already there.
  val_ids = {t.music_id for t in val}
  sub_train, sub_val = split_tunes(tunes[::3])
  assert {t.music_id for t in sub_val} == val_ids & {t.music_id for t in tunes[::3]}
  assert {t.music_id for t in split_tunes(tunes, seed=1)[1]} != val_ids


def test_duplicates_ignore_title_number_and_layout(tmp_path):
  body = JIG.replace(" AFD", "\nAFD")  # the same music laid out on two lines
  _write(tmp_path, "a.abc", TUNE.format(x=1, title="The Jig", body=JIG) + "\n"
         + TUNE.format(x=2, title="Another Jig", body=JIG.replace("dBA", "dBB")))
  _write(tmp_path, "b.abc", "X:7\nT:Its Other Name\nN:a note\nM:6/8\nL:1/8\nK: D\n"
         + body.replace("|", " | ") + "\n")
  tunes, report = read_abc_folder(str(tmp_path), collection="mine")
  assert [t.fields["T"] for t in tunes] == ["The Jig", "Another Jig"]
  assert report.count("duplicate") == 1 and report.kept == {"mine": 2}
  # Another key is other music.
  _write(tmp_path, "c.abc", TUNE.format(x=1, title="The Jig", body=JIG).replace("K:D", "K:G"))
  assert len(read_abc_folder(str(tmp_path))[0]) == 3


def test_malformed_tunes_are_skipped_or_refused(tmp_path):
  text = ("free text before the first tune\n\nX:1\nT:No key\nM:2/4\nabc|\n\n"
          "a stray line between tunes\n"
          "X:2\nT:No body\nM:2/4\nK:G\n% only a comment\n\n"
          + TUNE.format(x=3, title="Caf\u00e9 reel", body=JIG))
  _write(tmp_path, "sub/bad.abc", text.replace("\n", "\r\n").encode("latin-1"))
  tunes, report = read_abc_folder(str(tmp_path))
  assert [t.fields["T"] for t in tunes] == ["Caf\u00e9 reel"]  # Latin-1 read, CRLF gone
  assert "\r" not in tunes[0].text and tunes[0].source == "sub/bad.abc"
  assert report.by_reason() == {"no_key": 1, "no_body": 1, "duplicate": 0}
  assert sum(report.stray_lines.values()) == 1
  with pytest.raises(UserError, match=r"sub[/\\]bad\.abc:3: .*no K:"):
    read_abc_folder(str(tmp_path), strict=True)
  with pytest.raises(UserError, match=r"bad\.abc:3:"):
    load_abc_tunes(str(tmp_path), strict=True)


def test_text_normalisation_and_file_header(tmp_path):
  _write(tmp_path, "h.abc", "% a file header\nL:1/16\nZ:someone@example.org\n\n"
         "X: 12\nT: Spaced  \nZ:a transcriber\nN:a note\nM:C|\n%Q:80\nK: Dmix \nA4 B4 |]  \n")
  [tune], _ = read_abc_folder(str(tmp_path))
  # The title stays in `fields`; the header is in the prompt order X, M, L, R, ..., K.
  assert tune.text == "X:1\nM:C|\nL:1/16\nK:Dmix\nA4 B4 |]\n"
  assert tune.fields == {"X": "12", "T": "Spaced", "Z": "a transcriber", "N": "a note",
                         "M": "C|", "K": "Dmix", "L": "1/16"}
  assert tune.line == 5
  [whole], _ = read_abc_folder(str(tmp_path), text_fields=None)  # every field kept
  assert "N:a note\n" in whole.text and "Z:a transcriber\n" in whole.text


def test_headers_are_put_in_the_order_a_prompt_conditions_on(tmp_path):
  _write(tmp_path, "o.abc", "X:3\nR:jig\nT:A title\nQ:120\n%%MIDI program 1\nL:1/8\n"
         "M:6/8\nK:D\nDFA dAF |]\n")
  [tune], _ = read_abc_folder(str(tmp_path))
  assert tune.text == "X:1\nM:6/8\nL:1/8\nR:jig\nQ:120\n%%MIDI program 1\nK:D\nDFA dAF |]\n"
  assert tune.fields["T"] == "A title"


def test_root_argument_and_environment_override(tmp_path, monkeypatch):
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  _write(mine, "reels/r.abc", TUNE.format(x=1, title="Reel", body=JIG))
  _write(mine, "jigs/deep/j.abc", TUNE.format(x=1, title="Jig", body=JIG.replace("D3", "d3")))
  _write(theirs, "t.abc", TUNE.format(x=1, title="Theirs", body=JIG))
  monkeypatch.setenv(ENV_VAR, str(mine))
  tunes, report = load_abc_tunes()
  assert [(t.collection, t.source) for t in tunes] == [("jigs", "jigs/deep/j.abc"),
                                                       ("reels", "reels/r.abc")]
  assert [t.collection for t in load_abc_tunes(collections=["reels"])[0]] == ["reels"]
  with pytest.raises(UserError, match="found: \\['jigs', 'reels'\\]"):
    load_abc_tunes(collections=["essenFolksong"])
  # The argument wins over the environment; files directly in the root form a
  # collection named after it.
  assert [(t.collection, t.source) for t in load_abc_tunes(str(theirs))[0]] == [
      ("theirs", "t.abc")]
  monkeypatch.setenv(ENV_VAR, str(tmp_path / "absent"))
  with pytest.raises(UserError, match=ENV_VAR):
    load_abc_tunes()


def test_missing_music21_is_one_clear_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "music21" else real(name, *a))
  monkeypatch.delenv(ENV_VAR, raising=False)
  with pytest.raises(UserError, match=r"pip install music21.*aigc_jax\[music\]"):
    load_abc_tunes()


# --- tokenizer ------------------------------------------------------------------------


@needs_music21
def test_round_trip_on_every_training_tune(split, tokenizer):
  train, val = split
  tokens = bytes_ = 0
  for t in train:
    ids = tokenizer.encode(t.text)
    assert tokenizer.decode(ids) == t.text, t.source
    tokens += len(ids)
    bytes_ += len(t.text.encode("utf-8"))
  val_tokens = sum(len(tokenizer.encode(t.text)) for t in val)
  val_bytes = sum(len(t.text.encode("utf-8")) for t in val)
  print(f"\nABC tokenizer: {tokenizer.vocab_size} ids; per training tune "
        f"{tokens / len(train):.1f} tokens vs {bytes_ / len(train):.1f} bytes "
        f"({bytes_ / tokens:.2f} bytes/token; validation {val_bytes / val_tokens:.2f})")
  assert 500 <= tokenizer.vocab_size <= 2048
  assert bytes_ / tokens > 1.5 and val_bytes / val_tokens > 1.5


ABC_CHARS = "ABCDEFGabcdefgzx^_=,'/0123456789|:[]()-<>{}~.!+\"% \nKMLTX\\"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=ABC_CHARS)))
@example("K:G\nT:\u00c9t\u00e9 \U0001f3b5 r\u00e9el\r\n|: ^^c''3/2 __B,,// :|2 [1 \x00\n")
@example("<|endoftext|><0x41>")
@example("X:")
def test_round_trip_on_any_text(tokenizer, text):
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and (ids >= 0).all() and (ids < tokenizer.vocab_size).all()
  assert tokenizer.eos_id not in ids
  assert tokenizer.decode(ids) == text
  assert "".join(split_units(text)) == text
  assert tokenizer.token_byte_lengths()[ids].sum() == len(text.encode("utf-8"))


def test_units_split_as_documented():
  assert split_units("^F,2") == ["^F,2"]
  assert split_units("|:") == ["|:"]
  assert split_units('"Am"') == ['"Am"']
  assert split_units("[CEG]3/2") == ["[", "C", "E", "G", "]", "3/2"]
  assert split_units("K: Dmix\nM:6/8\nA>B (3cde ~f2 z/ |1 d2 :|2 d4 |]") == [
      "K:", " Dmix", "\n", "M:", "6/8", "\n", "A", ">", "B", " ", "(3", "c", "d", "e", " ",
      "~", "f2", " ", "z/", " |1 ", "d2", " :|2 ", "d4", " |]"]
  assert split_units('[K:G] !trill!c2 "^Segno"{g}B % end') == [
      "[K:G]", " ", "!trill!", "c2", " ", '"^Segno"', "{", "g", "}", "B", " ", "% end"]


@needs_music21
def test_corpus_vocabulary_tokenizes_as_documented(tokenizer):
  def tokens(text: str) -> list[str]:
    return tokenizer.tokens(tokenizer.encode(text))
  assert tokens("^F,2") == ["^F,2"]  # a frequent note event is one token
  assert tokens("|:") == ["|:"]
  assert tokens("[CEG]3/2") == ["[", "C", "E", "G", "]", "3/2"]
  assert tokens("M:6/8\n") == ["M:", "6/8", "\n"]
  # The folk collections have almost no chord symbols: a rare unit falls back to its
  # parts (a rare note to note and duration), then characters, then bytes.
  assert tokens('"Am"') == ['"', "Am", '"']
  assert tokens("^^c'7") == ["^", "^", "c", "'", "7"]
  assert tokens("\u00e9") == ["<0xC3>", "<0xA9>"]


def test_frequent_units_are_single_tokens():
  tok = AbcTokenizer.train(['"Am"[CEG]3/2 ^F,2|:' * 3], min_count=3)
  assert tok.tokens(tok.encode('"Am"[CEG]3/2')) == ['"Am"', "[", "C", "E", "G", "]", "3/2"]
  # Nothing of `"Am7"` was seen on its own: bytes.
  assert tok.tokens(tok.encode('"Am7"')) == ["<0x22>", "<0x41>", "<0x6D>", "<0x37>", "<0x22>"]


def test_vocabulary_is_deterministic(split):
  texts = [t.text for t in split[0][:2000]]
  first = AbcTokenizer.train(texts)
  again = AbcTokenizer.train(reversed(texts))  # same data, another order
  assert first.units == again.units
  assert list(first.encode(texts[0])) == list(again.encode(texts[0]))


def test_save_load_and_lm_interface(tmp_path, tokenizer):
  tokenizer.save(str(tmp_path))
  assert os.listdir(tmp_path) == ["tokenizer.json"]  # no temporary file left
  for path in (tmp_path, tmp_path / "tokenizer.json"):
    again = AbcTokenizer.load(str(path))
    assert again.units == tokenizer.units and again.vocab_size == tokenizer.vocab_size
  text = TUNE.format(x=1, title="The Jig", body=JIG)
  ids = tokenizer.encode(text)
  assert list(again.encode(text)) == list(ids)
  assert tokenizer.decode(np.concatenate([ids, [tokenizer.eos_id]])) == text
  stream = tokenize_documents(tokenizer, [("a", text), ("b", text)])
  assert stream.dtype == np.uint16 and list(stream) == [*ids, 256, *ids, 256]
  (tmp_path / "tokenizer.json").write_text('{"kind": "byte"}')
  with pytest.raises(UserError, match="not an ABC tokenizer"):
    AbcTokenizer.load(str(tmp_path))
