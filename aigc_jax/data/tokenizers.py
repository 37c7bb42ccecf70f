"""Tokenizers: byte-level (no dependency, the default) and byte-level BPE trained offline.

Both round-trip exactly: decode(encode(text)) == text for any str.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import replaced_atomically

EOS_TEXT = "<|endoftext|>"


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; id 256 is end-of-sequence (separates documents)."""

  kind = "byte"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> np.ndarray:
    """text -> ids [N] int32 (its UTF-8 bytes)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text (end-of-sequence ids dropped, invalid UTF-8 replaced)."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for; end-of-sequence counts as one (a separator)."""
    return np.ones(self.vocab_size, np.int32)

  def save(self, directory: str) -> None:
    """Writes the tokenizer's description into `directory`."""
    with replaced_atomically(os.path.join(directory, "tokenizer.json")) as tmp, \
        open(tmp, "w") as f:
      json.dump({"kind": self.kind}, f)


class BpeTokenizer:
  """Byte-level BPE from Hugging Face `tokenizers`, trained on the corpus and saved with
  the run (`tokenizer.json`)."""

  kind = "bpe"

  def __init__(self, tokenizer):
    self._tok = tokenizer
    # Text that spells "<|endoftext|>" is data, not a document break: only the
    # pipeline inserts `eos_id`, so decode(encode(text)) == text for every str.
    self._tok.encode_special_tokens = True
    self.vocab_size = tokenizer.get_vocab_size()
    self.eos_id = tokenizer.token_to_id(EOS_TEXT)

  @staticmethod
  def _lib():
    try:
      import tokenizers
    except ImportError as e:
      raise UserError("data.tokenizer='bpe' needs the `tokenizers` package: "
                      "pip install 'aigc_jax[bpe]' (or use data.tokenizer='byte')") from e
    return tokenizers

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """A byte-level BPE tokenizer of `vocab_size` ids trained on `texts`."""
    tk = cls._lib()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TEXT], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @classmethod
  def load(cls, path: str) -> BpeTokenizer:
    """The tokenizer saved in `directory`."""
    return cls(cls._lib().Tokenizer.from_file(path))

  def encode(self, text: str) -> np.ndarray:
    """text -> ids [N] int32."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """texts -> one ids array [N_i] int32 per text."""
    return [np.asarray(e.ids, np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text (end-of-sequence ids dropped)."""
    ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids
                                      ).reshape(-1) if int(i) != self.eos_id]
    return self._tok.decode(ids, skip_special_tokens=True)

  def token_byte_lengths(self) -> np.ndarray:
    # Byte-level BPE spells each byte as one character, so a token's length in
    # characters is its length in bytes.
    """[V] int: the UTF-8 length of each token (bits per byte from bits per token)."""
    lengths = np.ones(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if i != self.eos_id:
        lengths[i] = len(self._tok.id_to_token(i))
    return lengths

  def save(self, directory: str) -> None:
    """Writes tokenizer.json into `directory`."""
    with replaced_atomically(os.path.join(directory, "tokenizer.json")) as tmp:
      self._tok.save(tmp)




def load_tokenizer(directory: str):
  """The tokenizer saved in a run's workdir by `save`."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    raise UserError(f"no tokenizer at {path}: is {directory} the workdir of a trained LM run?")
  with open(path) as f:
    head = json.load(f)
  if head.get("kind") == "byte":
    return ByteTokenizer()
  if head.get("kind") == "chorale":
    from aigc_jax.data.chorale_tokenizer import ChoraleTokenizer
    return ChoraleTokenizer.load(path)
  if head.get("kind") == "abc":
    from aigc_jax.data.abc_tokenizer import AbcTokenizer  # it imports this module
    return AbcTokenizer.load(path)
  return BpeTokenizer.load(path)
