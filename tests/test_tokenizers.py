import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aigc_jax.data.text import stdlib_documents
from aigc_jax.data.tokenizers import BpeTokenizer, ByteTokenizer, load_tokenizer


@given(st.text())
def test_byte_tokenizer_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and (ids < 256).all()
  assert tok.decode(ids) == text
  assert len(ids) == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def bpe():
  pytest.importorskip("tokenizers", reason="BPE needs the `tokenizers` package (dev extra)")
  docs = stdlib_documents(limit_files=30)
  return BpeTokenizer.train((t for _, t in docs), vocab_size=600)


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("a document that spells <|endoftext|> is data, not a break")
def test_bpe_round_trip(bpe, text):
  assert bpe.decode(bpe.encode(text)) == text


def test_bpe_never_emits_eos_for_text(bpe):
  assert bpe.eos_id not in bpe.encode("x<|endoftext|>y")


def test_bpe_compresses_code_and_saves(bpe, tmp_path):
  code = "def function(self, value):\n    return self.value + value\n"
  assert len(bpe.encode(code)) < 0.6 * len(code.encode())
  lengths = bpe.token_byte_lengths()
  ids = bpe.encode(code)
  assert lengths[ids].sum() == len(code.encode())
  bpe.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert list(again.encode(code)) == list(ids) and again.eos_id == bpe.eos_id


def test_byte_tokenizer_saves_and_loads(tmp_path):
  ByteTokenizer().save(str(tmp_path))
  assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
