"""LM train-step benchmark cases: our compiled step on random tokens, beside an eager
PyTorch GPT of the same shape (nanoGPT's architecture) on CPU. Run them through
`python -m benchmarks.run --families lm`."""

from __future__ import annotations

import functools

import numpy as np

from aigc_jax.families.lm import Family, default_config
from benchmarks.common import measure_step, step_row

# name: (layers, heads, width, SwiGLU width, context, batch, vocabulary). The SwiGLU
# widths keep the FLOPs of a 4x GELU MLP (2/3 of 4 x width); 257 is the byte vocabulary.
# Batches of 8 and 16 split over 8 devices (the cpu8 preset, the sharded tests).
CASES = {
    "tiny": (1, 2, 32, 64, 16, 8, 257),
    "nanogpt": (4, 4, 128, 344, 64, 12, 257),  # nanoGPT's CPU shape
    "nanogpt_b16": (4, 4, 128, 344, 64, 16, 257),
    "w384": (6, 6, 384, 1024, 256, 16, 257),
    "gpt2_124m": (12, 12, 768, 2048, 1024, 16, 50304),
    "gpt_350m": (24, 16, 1024, 2736, 1024, 8, 50304),
}


def family_and_batch(case: str, dtype: str) -> tuple[Family, dict]:
  """The case's LM family (no data) and a batch of random tokens."""
  layers, heads, width, mlp, context, batch, vocab = CASES[case]
  c = default_config()
  c.model.update(num_layers=layers, num_heads=heads, num_kv_heads=heads, embed_dim=width,
                 mlp_dim=mlp, dtype=dtype, vocab_size=vocab)
  c.data.update(seq_len=context)
  c.train.update(batch_size=batch)
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, context + 1), dtype=np.int32)
  return Family(c, None), {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def bench(case: str, steps: int, dtype: str = "float32", torch: bool = False,
          mesh: dict | None = None) -> dict:
  layers, heads, width, _, context, batch, vocab = CASES[case]
  family, host_batch = family_and_batch(case, dtype)
  measured = measure_step(family, host_batch, "loss", steps, mesh=mesh)
  torch_fn = None
  if torch:
    from benchmarks.torch_gpt import time_step
    torch_fn = functools.partial(time_step, vocab=vocab, layers=layers, heads=heads,
                                 width=width, context=context, batch=batch, steps=steps)
  row = step_row("lm", case, f"L{layers} H{heads} D{width} T{context}", dtype, batch,
                 measured, family.model_cfg.flops_per_token(context) * batch * context,
                 torch_fn)
  row["tokens_per_s"] = row["examples_per_s"] * context
  return row
