"""Fine-tuning task `sft`: supervised fine-tuning on prompt/response pairs through the
chat template; the loss counts response tokens only. The data: stdlib functions, prompt =
signature + docstring, response = body."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.families.finetune_base import FinetuneFamily, pad_rows
from aigc_jax.models.sampling import SAMPLING_KEYS, generate
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import LOSS_WEIGHT


class SftFamily(FinetuneFamily):
  task = "sft"
  datasets = ("stdlib_functions",)

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def pairs(self) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt/response pairs."""
    from aigc_jax.data.instructions import stdlib_function_pairs
    d = self.config.data
    return stdlib_function_pairs(d.limit_files, d.val_fraction, d.max_body_lines)

  def load_examples(self) -> tuple[dict, dict]:
    train, val = self.pairs
    return self._sft_arrays(train), self._sft_arrays(val)

  def sft_prompt_ids(self, prompt: str) -> np.ndarray:
    """The chat-templated prompt, ending where the assistant's reply begins."""
    return self.tokenizer.encode_chat([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True)

  def _sft_arrays(self, pairs: list[dict]) -> dict:
    """inputs/targets [N, T] and a loss mask [N, T] that is 1 on response tokens only."""
    T, tok = self.config.data.seq_len, self.tokenizer
    end_of_turn = tok.end_of_turn()
    inputs, targets, masks = [], [], []
    for pair in pairs:
      prompt = self.sft_prompt_ids(pair["prompt"])
      response = np.concatenate([tok.encode(pair["response"]), end_of_turn])
      ids = np.concatenate([prompt, response])[:T + 1]
      mask = np.concatenate([np.zeros(len(prompt), np.float32),
                             np.ones(len(response), np.float32)])[1:T + 1]
      if mask.sum() == 0:
        continue  # the prompt alone fills the window: nothing to learn from
      inputs.append(ids[:-1])
      targets.append(ids[1:])
      masks.append(mask[:len(ids) - 1])
    if not inputs:
      raise UserError(f"no example fits data.seq_len={T} with part of its response: raise it")
    x, _ = pad_rows(inputs, T, tok.eos_id)
    y, _ = pad_rows(targets, T, tok.eos_id)
    m = np.zeros((len(masks), T), np.float32)
    for i, row in enumerate(masks):
      m[i, :len(row)] = row
    return {"inputs": x, "targets": y, "mask": m}

  # --- objective --------------------------------------------------------------------
  def task_loss(self, model, batch):
    nll_sum = model.nll_sum(batch["inputs"], batch["targets"], batch["mask"])
    tokens = batch["mask"].sum()
    # loss_weight: micro-batches count by their response tokens (train.steps.LOSS_WEIGHT)
    return nll_sum / jnp.maximum(tokens, 1.0), {LOSS_WEIGHT: tokens}

  def eval_step(self, state: TrainState, batch) -> dict:
    return {"nll_sum": self.model(state).nll_sum(batch["inputs"], batch["targets"],
                                                 batch["mask"]),
            "count": batch["mask"].sum()}

  def summarize_eval(self, sums: dict) -> dict:
    loss = sums["nll_sum"] / sums["count"]
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

  # --- samples ----------------------------------------------------------------------
  def generate_replies(self, state: TrainState, prompts: list[str], *, max_new_tokens: int,
                       seed: int = 0, **sampling) -> list[str]:
    """The assistant's reply to each prompt, through the chat template; `sampling`:
    temperature (default 0: greedy), top_k, top_p, repetition_penalty."""
    ids = [self.sft_prompt_ids(p) for p in prompts]
    out = generate(self.model(state), ids, max_new_tokens=max_new_tokens,
                   key=jax.random.PRNGKey(seed), **{"temperature": 0.0, **sampling},
                   eos_id=int(self.tokenizer.end_of_turn()[0]))
    return [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]

  def _sample_prompts(self) -> list[str]:
    s = self.config.sample
    if s.prompt:
      return [s.prompt] * s.num
    return [p["prompt"] for p in self.pairs[1][:s.num]]

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    s = self.config.sample
    pick = lambda key: s[key] if options.get(key) is None else options[key]
    prompts = options.get("prompt") or self._sample_prompts()
    replies = self.generate_replies(
        state, prompts, max_new_tokens=pick("max_new_tokens"), seed=options.get("seed") or 0,
        **{key: pick(key) for key in SAMPLING_KEYS})
    return "\n".join(f"=== prompt {i} ===\n{p}\n=== reply ===\n{r}\n"
                     for i, (p, r) in enumerate(zip(prompts, replies, strict=True)))

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    if self.config.sample.num < 1:
      return []
    text = self.cli_sample(state, workdir, {})
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step:07d}.txt")
    with open(path, "w") as f:
      f.write(text)
    return [path]
