"""A pretrained model's tokenizer (Hugging Face `tokenizers`) with its chat template.

Plain text is encoded with special tokens treated as text, so a document cannot smuggle
in `<|im_end|>`; `encode_chat` renders the chat template (Jinja, sandboxed, as
`transformers` does) and parses the special tokens the template writes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from aigc_jax.errors import UserError


def tokenizers_lib():
  """The `tokenizers` package (UserError naming the extra to install when missing)."""
  try:
    import tokenizers
  except ImportError as e:
    raise UserError("pretrained tokenizers need the `tokenizers` package: "
                    "pip install 'aigc_jax[pretrained]'") from e
  return tokenizers


def _token_text(token) -> str | None:
  return token.get("content") if isinstance(token, dict) else token


class PretrainedTokenizer:
  """A Hugging Face `tokenizers` tokenizer with its BOS/EOS ids and chat template: encode,
  decode, encode_chat."""

  kind = "pretrained"

  def __init__(self, tokenizer, bos_id: int, eos_id: int, chat_template: str = ""):
    self.tokenizer, self.bos_id, self.eos_id = tokenizer, int(bos_id), int(eos_id)
    self.chat_template = chat_template

  @classmethod
  def from_file(cls, path: str, bos=None, eos=None, chat_template: str = ""):
    """From a `tokenizer.json`; `bos`/`eos` are token strings (or HF's dicts)."""
    try:
      tok = tokenizers_lib().Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exception
      raise UserError(f"{path} is not a readable tokenizer.json ({e})") from e
    ids = []
    for token, fallback in ((bos, 1), (eos, 2)):
      text = _token_text(token)
      ids.append(tok.token_to_id(text) if text else fallback)
      if ids[-1] is None:
        raise UserError(f"special token {text!r} named in {os.path.dirname(path)}'s "
                        "tokenizer_config.json is not in tokenizer.json")
    return cls(tok, ids[0], ids[1], chat_template)

  @property
  def vocab_size(self) -> int:
    """The number of token ids (special tokens included)."""
    return self.tokenizer.get_vocab_size()

  def _encode(self, text: str, parse_special: bool) -> np.ndarray:
    self.tokenizer.encode_special_tokens = not parse_special
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode(self, text: str) -> np.ndarray:
    """Ids of plain text (special-token spellings in it stay text)."""
    return self._encode(text, parse_special=False)

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """ids (any shape) -> text."""
    return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                 skip_special_tokens=skip_special_tokens)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template applied to [{'role': ..., 'content': ...}, ...]."""
    if not self.chat_template:
      raise UserError("this tokenizer has no chat template: give a plain prompt instead")
    try:
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
      raise UserError("chat templates need the `jinja2` package: "
                      "pip install 'aigc_jax[pretrained]'") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(self.chat_template)
    special = {"bos_token": self.tokenizer.id_to_token(self.bos_id),
               "eos_token": self.tokenizer.id_to_token(self.eos_id)}
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           **special)

  def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> np.ndarray:
    """Ids of the rendered chat template (its special tokens parsed)."""
    return self._encode(self.render_chat(messages, add_generation_prompt), parse_special=True)

  def end_of_turn(self) -> np.ndarray:
    """Ids the template writes after a message's content (SmolLM2: '<|im_end|>', '\n'):
    appended to each SFT response, and the first one stops generation."""
    marker = "\x00END\x00"
    text = self.render_chat([{"role": "user", "content": marker}], add_generation_prompt=False)
    after = text[text.index(marker) + len(marker):]
    ids = self._encode(after, parse_special=True) if after else np.zeros(0, np.int32)
    return ids if len(ids) else np.asarray([self.eos_id], np.int32)

  def save(self, directory: str) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template), the files
    Hugging Face loaders read."""
    self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": self.tokenizer.id_to_token(self.bos_id),
              "eos_token": self.tokenizer.id_to_token(self.eos_id),
              "chat_template": self.chat_template, "kind": self.kind}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
