"""LM data faults: settings the chosen source ignores, binary and mis-encoded corpora.
Each is one UserError naming the setting or file and the fix, before any training."""

import glob
import re

import ml_collections
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.data import text
from aigc_jax.data.text import load_documents, stdlib_documents, text_documents
from aigc_jax.errors import UserError
from aigc_jax.families import lm
from tests.conftest import ROOT, TINY_CONFIG, run_cli

LATIN1 = "caf\xe9 cr\xe8me br\xfbl\xe9e\n" * 20  # é at offset 3 once encoded


def data_cfg(**kw):
  return ml_collections.ConfigDict({**lm.default_config().data.to_dict(), **kw})


def tiny(**overrides):
  return config_from_file(TINY_CONFIG, overrides)


def test_every_lm_config_still_validates():
  paths = sorted(glob.glob(str(ROOT / "configs" / "lm_*.py")))
  assert len(paths) >= 6
  for path in paths:
    lm.validate(config_from_file(path))


@pytest.mark.parametrize("overrides, message", [
    # data.name left at 'stdlib': data.path used to be ignored without a word.
    ({"data.limit_files": 0, "data.path": "{file}"},
     r"config 'data.path' is set \('.*corpus.txt'\) but data.name is 'stdlib', which does "
     r"not read it: set data.name='text' to train on data.path, or unset data.path"),
    # lm_tiny's limit_files=40 is a stdlib setting.
    ({"data.name": "text", "data.path": "{file}"},
     r"config 'data.limit_files' is set \(40\) but data.name is 'text', which does not read "
     r"it: set data.name='stdlib' to read the standard library, or set data.limit_files=0"),
    ({"data.tfds_name": "lm1b"},
     r"'data.tfds_name' is set \('lm1b'\) but data.name is 'stdlib'.*set data.name='tfds' "
     r"to read a tfds dataset, or unset data.tfds_name"),
    ({"data.tfds_split": "test"},
     r"'data.tfds_split' is set \('test'\) .*or set data.tfds_split='train'"),
    ({"data.tfds_text_key": "content"}, r"'data.tfds_text_key' is set \('content'\)"),
    ({"data.tfds_data_dir": "/data/tfds"}, r"'data.tfds_data_dir' is set \('/data/tfds'\)"),
    ({"data.val_path": "{file}", "data.val_fraction": 0.2},
     r"'data.val_fraction' is set \(0.2\) but data.val_path is given, which replaces the "
     r"split: unset data.val_path to split off val_fraction, or set data.val_fraction=0.05"),
    ({"data.encoding": "utf-8-ish"},
     r"'data.encoding' must be a text encoding Python knows .*got 'utf-8-ish'"),
    ({"data.encoding": "hex"}, r"'data.encoding' must be a text encoding"),  # bytes-to-bytes
    ({"data.encoding": "latin-1"},
     r"'data.encoding' is set \('latin-1'\) but data.name is 'stdlib' and data.val_path is "
     r"unset, so no file is read with it"),
])
def test_settings_the_source_does_not_read_are_refused(tmp_path, overrides, message):
  (tmp_path / "corpus.txt").write_text("hello\n" * 50)
  overrides = {k: v.format(file=tmp_path / "corpus.txt") if isinstance(v, str) else v
               for k, v in overrides.items()}
  with pytest.raises(UserError, match=message):
    lm.validate(tiny(**overrides))


def test_settings_at_their_defaults_or_read_are_accepted(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("hello\n" * 50)
  lm.validate(tiny(**{"data.tfds_split": "train", "data.encoding": "UTF8"}))  # = defaults
  lm.validate(tiny(**{"data.name": "text", "data.path": str(corpus), "data.limit_files": 0,
                      "data.encoding": "latin-1", "data.val_fraction": 0.2}))
  # val_path is read for every source, so its encoding is used with stdlib too.
  lm.validate(tiny(**{"data.val_path": str(corpus), "data.encoding": "cp1252"}))
  lm.validate(tiny(**{"data.name": "tfds", "data.tfds_name": "lm1b", "data.limit_files": 0,
                      "data.tfds_split": "test"}))


def test_a_binary_file_given_directly_is_refused(tmp_path):
  exe = tmp_path / "ls"
  exe.write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)) * 8)
  with pytest.raises(UserError, match=rf"data file '{re.escape(str(exe))}' looks binary "
                     r"\(NUL byte at offset 7\): point data.path at text"):
    load_documents(data_cfg(name="text", path=str(exe)))
  # latin-1 decodes any byte: the NUL character still gives a binary file away.
  with pytest.raises(UserError, match=r"looks binary \(NUL byte at offset 7\)"):
    load_documents(data_cfg(name="text", path=str(exe), encoding="latin-1"))
  good = tmp_path / "good.txt"
  good.write_text("line\n" * 20)
  with pytest.raises(UserError, match=r"'.*ls' looks binary .*point data.val_path at text"):
    load_documents(data_cfg(name="text", path=str(good), val_path=str(exe)))


def test_a_latin1_file_is_refused_with_the_offset_and_read_with_its_encoding(tmp_path):
  f = tmp_path / "fr.txt"
  f.write_bytes(LATIN1.encode("latin-1"))
  with pytest.raises(UserError, match=rf"data file '{re.escape(str(f))}' is not valid utf-8 "
                     r"\(byte 0xe9 at offset 3\): set data.encoding to the file's encoding "
                     r"\(e.g. data.encoding='latin-1' or 'cp1252'\), or convert the file"):
    load_documents(data_cfg(name="text", path=str(f)))
  train, val = load_documents(data_cfg(name="text", path=str(f), encoding="latin-1"))
  assert train[0][1].startswith("caf\xe9 cr\xe8me") and "\ufffd" not in train[0][1] + val[0][1]
  assert len(train[0][1]) + len(val[0][1]) == len(LATIN1)


def test_a_latin1_val_path_is_refused(tmp_path):
  good, bad = tmp_path / "good.txt", tmp_path / "val.txt"
  good.write_text("line\n" * 20)
  bad.write_bytes(LATIN1.encode("latin-1"))
  with pytest.raises(UserError, match=r"'.*val.txt' is not valid utf-8 \(byte 0xe9"):
    load_documents(data_cfg(name="text", path=str(good), val_path=str(bad)))
  with pytest.raises(UserError, match=r"'.*val.txt' is not valid utf-8"):
    load_documents(data_cfg(name="stdlib", limit_files=3, val_path=str(bad)))


def test_folder_skips_binaries_but_refuses_a_mis_encoded_text_file(tmp_path):
  (tmp_path / "a.txt").write_text("hello\n")
  (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
  (tmp_path / "b.txt").write_bytes(LATIN1.encode("latin-1"))
  with pytest.raises(UserError, match=r"'.*b.txt' is not valid utf-8 \(byte 0xe9 at offset 3"):
    text_documents(str(tmp_path))
  docs = dict(text_documents(str(tmp_path), "latin-1"))
  assert sorted(docs) == ["a.txt", "b.txt"] and docs["b.txt"] == LATIN1


def test_wide_encodings_and_byte_order_marks(tmp_path):
  """UTF-16 text has NUL bytes but is not binary; offsets count the file's bytes."""
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "u16.txt").write_bytes("h\xe9llo\r\nw\xf6rld\n".encode("utf-16"))
  assert text_documents(str(tmp_path / "d"), "utf-16") == [("u16.txt", "h\xe9llo\nw\xf6rld\n")]
  sig = tmp_path / "sig.txt"
  sig.write_bytes(b"\xef\xbb\xbfab\xffc")
  with pytest.raises(UserError, match=r"is not valid utf-8-sig \(byte 0xff at offset 5\)"):
    text_documents(str(sig), "utf-8-sig")


def test_stdlib_corpus_decodes_strictly(monkeypatch, tmp_path):
  # Every corpus file of this Python is valid UTF-8: nothing was ever replaced.
  for name, doc in stdlib_documents():
    raw = (text.stdlib_root() / name).read_bytes().decode("utf-8")
    assert doc == raw.replace("\r\n", "\n").replace("\r", "\n"), name
  # A PEP 263 cookie is honoured, as Python itself reads the file.
  (tmp_path / "old.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = 'caf\xe9'\n")
  monkeypatch.setattr(text, "stdlib_root", lambda: tmp_path)
  assert stdlib_documents() == [("old.py", "# -*- coding: latin-1 -*-\nx = 'caf\xe9'\n")]


def _assert_one_line_error(proc, message):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("setup, args, message", [
    (lambda p: (p / "ls").write_bytes(b"\x7fELF\x02\x01\x01\0" + bytes(range(256))),
     ["--config.data.name=text", "--config.data.path={dir}/ls", "--config.data.limit_files=0"],
     r"^error: data file '.*/ls' looks binary \(NUL byte at offset 7\): point data.path"),
    (lambda p: (p / "fr.txt").write_bytes(LATIN1.encode("latin-1")),
     ["--config.data.name=text", "--config.data.path={dir}/fr.txt",
      "--config.data.limit_files=0"],
     r"^error: data file '.*/fr.txt' is not valid utf-8 \(byte 0xe9 at offset 3\).*"
     r"data.encoding='latin-1'"),
    (lambda p: (p / "fr.txt").write_bytes(LATIN1.encode("latin-1")),
     ["--config.data.path={dir}/fr.txt"],
     r"^error: config 'data.path' is set .* but data.name is 'stdlib', which does not read"),
])
def test_cli_reports_data_faults_in_one_line(tmp_path, setup, args, message):
  setup(tmp_path)
  proc = run_cli("train", "--config", TINY_CONFIG, "--workdir", str(tmp_path / "run"),
                 *[a.format(dir=tmp_path) for a in args])
  _assert_one_line_error(proc, message)
  assert not list((tmp_path / "run").glob("checkpoints/[0-9]*"))  # no step was trained
