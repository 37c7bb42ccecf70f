"""A tiny "pretrained" Llama folder for the loader and fine-tuning tests: random weights
(norm scales too, so a misplaced norm shows), a byte-level BPE trained here on stdlib
source with SmolLM2's special tokens and chat template, written in Hugging Face format."""

from __future__ import annotations

import numpy as np

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 1024):
  import tokenizers as tk

  from aigc_jax.data.text import stdlib_documents
  from aigc_jax.pretrained.tokenizer import PretrainedTokenizer

  tok = tk.Tokenizer(tk.models.BPE())
  tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                   show_progress=False,
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((t for _, t in stdlib_documents(limit_files=20)), trainer=trainer)
  return PretrainedTokenizer(tok, bos_id=1, eos_id=2, chat_template=SMOLLM2_TEMPLATE)


def tiny_config(vocab_size: int, tied: bool = True, **overrides):
  from aigc_jax.models.transformer import TransformerConfig

  values = dict(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2,
                embed_dim=32, mlp_dim=48, max_seq_len=256, rope_base=10000.0, norm_eps=1e-5,
                tie_embeddings=tied)
  values.update(overrides)
  return TransformerConfig(**values)


def random_params(cfg, seed: int = 0) -> dict:
  import jax
  from flax import nnx

  from aigc_jax.models.transformer import Transformer

  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(seed)

  def jitter(path, x):
    if path[-1].key == "scale":  # norms start at one: make them distinguishable
      return (x + rng.normal(scale=0.3, size=x.shape)).astype(np.float32)
    if path[-1].key == "embedding":  # a trained model's scale, so logits can be sharp
      return (x * 20.0).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(jitter, params)


def write_tiny_hf(directory, tied: bool = True, seed: int = 0):
  """(config, params, tokenizer) written to `directory` as a Hugging Face checkpoint."""
  from aigc_jax.pretrained.hf import export_hf

  tokenizer = tiny_tokenizer()
  cfg = tiny_config(tokenizer.vocab_size, tied)
  params = random_params(cfg, seed)
  export_hf(str(directory), cfg, params, tokenizer)
  return cfg, params, tokenizer
