import ml_collections
import numpy as np
import pytest

from aigc_jax.data.batching import TokenWindows, eval_windows
from aigc_jax.data.text import (
  load_documents,
  split_documents,
  stdlib_documents,
  text_documents,
  tokenize_documents,
)
from aigc_jax.data.tokenizers import ByteTokenizer
from aigc_jax.errors import UserError


def data_cfg(**kw):
  base = dict(name="stdlib", path="", val_path="", val_fraction=0.1, limit_files=0,
              tfds_name="", tfds_split="train", tfds_text_key="text", tfds_data_dir="")
  return ml_collections.ConfigDict({**base, **kw})


def test_stdlib_corpus_is_real_code_without_tests():
  docs = stdlib_documents()
  names = [n for n, _ in docs]
  assert len(docs) > 300 and all(n.endswith(".py") for n in names)
  assert not any("/test/" in f"/{n}" or "site-packages" in n for n in names)
  assert any(n == "json/decoder.py" for n in names)
  assert "def " in dict(docs)["json/decoder.py"]


def test_split_is_deterministic_and_disjoint():
  docs = stdlib_documents(limit_files=200)
  train, val = split_documents(docs, 0.1)
  again_train, again_val = split_documents(list(reversed(docs)), 0.1)
  assert {n for n, _ in val} == {n for n, _ in again_val}
  assert not {n for n, _ in train} & {n for n, _ in val}
  assert len(train) + len(val) == len(docs) and 5 <= len(val) <= 40


def test_single_file_is_split_by_lines(tmp_path):
  f = tmp_path / "a.txt"
  f.write_text("".join(f"line {i}\n" for i in range(100)))
  train, val = load_documents(data_cfg(name="text", path=str(f)))
  assert train[0][1].endswith("line 89\n") and val[0][1].startswith("line 90\n")


def test_folder_and_val_path(tmp_path):
  (tmp_path / "tr").mkdir()
  (tmp_path / "tr" / "x.txt").write_text("hello")
  (tmp_path / "tr" / "y.bin").write_bytes(b"\0\1\2")
  (tmp_path / "v.txt").write_text("world")
  train, val = load_documents(data_cfg(name="text", path=str(tmp_path / "tr"),
                                       val_path=str(tmp_path / "v.txt")))
  assert train == [("x.txt", "hello")] and val == [("v.txt", "world")]


@pytest.mark.parametrize("setup, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), "empty"),
    (lambda p: (p / "d").mkdir() or str(p / "d"), "no text files"),
])
def test_bad_text_paths(tmp_path, setup, message):
  with pytest.raises(UserError, match=message):
    text_documents(setup(tmp_path))


def test_token_windows_are_seeded_random_access_and_resumable():
  ids = tokenize_documents(ByteTokenizer(), stdlib_documents(limit_files=5))
  a = TokenWindows(ids, batch_size=4, seq_len=16, seed=1)
  first = [next(a) for _ in range(3)]
  np.testing.assert_array_equal(first[0]["targets"][:, :-1], first[0]["inputs"][:, 1:])
  b = TokenWindows(ids, batch_size=4, seq_len=16, seed=1)
  b.set_state(a.get_state())
  np.testing.assert_array_equal(next(b)["inputs"], a.batch(3)["inputs"])
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  other = TokenWindows(ids, batch_size=4, seq_len=16, seed=2)
  with pytest.raises(UserError, match="seed"):
    other.set_state(a.get_state())


def test_eval_windows_cover_the_stream_without_overlap():
  ids = np.arange(1000, dtype=np.uint16)
  batches = eval_windows(ids, batch_size=4, seq_len=10, max_batches=3)
  starts = np.concatenate([b["inputs"][:, 0] for b in batches])
  assert len(batches) == 3 and np.all(np.diff(starts) >= 10) and starts[-1] > 900
  with pytest.raises(UserError, match="validation split"):
    eval_windows(ids[:30], batch_size=4, seq_len=10, max_batches=3)


def test_too_short_training_stream():
  with pytest.raises(UserError, match="fewer than"):
    TokenWindows(np.arange(10), batch_size=2, seq_len=16, seed=0)


def test_tfds_source_fails_clearly_when_unavailable(tmp_path):
  """Without the tfds extra: how to install it; with it: the dataset is not prepared in
  an empty data_dir (no download at run time)."""
  cfg = data_cfg(name="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path))
  with pytest.raises(UserError, match=r"aigc_jax\[tfds\]|not prepared"):
    load_documents(cfg)
