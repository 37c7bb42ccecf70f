"""Fine-tuning task `lm`: more language modelling, on other documents, from a language
model this library trained (`pretrained.format='run'`): e.g. a music LM pretrained on
every ABC tune, then fully or LoRA fine-tuned on one collection or one tune type
(`data.abc_collections`, `data.abc_fields=('M:6/8',)`). Data, evaluation (loss, bits per
token and byte, music figures) and samples are the `lm` family's (`lm_text.TextLm`); the
pretrained model, adapters, frozen patterns and the step are fine-tuning's."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_collections

from aigc_jax.data import text as text_data
from aigc_jax.errors import UserError
from aigc_jax.families.finetune_base import FinetuneFamily
from aigc_jax.families.lm_text import TextLm
from aigc_jax.train.state import TrainState


def lm_data_section(d) -> ml_collections.ConfigDict:
  """The `lm` family's data section (what `text.load_documents` reads) for a fine-tuning
  config's: data.path is the text file or folder (`text`), or the folder of .abc files
  (`abc`; empty: music21's corpus)."""
  abc = d.name == "abc"
  return ml_collections.ConfigDict(dict(
      name=d.name, path="" if abc else d.path, abc_path=d.path if abc else "",
      abc_collections=tuple(d.abc_collections), abc_strict=d.abc_strict,
      abc_fields=tuple(d.abc_fields), val_fraction=d.val_fraction, val_path="",
      encoding="utf-8", limit_files=d.limit_files))


class LmTaskFamily(TextLm, FinetuneFamily):
  task = "lm"
  datasets = ("abc", "text")
  plot_keys = ("loss", "bits_per_byte")

  def __init__(self, config, workdir: str):
    super().__init__(config, workdir)
    self.items_per_step = {"tokens": config.train.batch_size * config.data.seq_len}

  @property
  def eval_windows_batches(self) -> int:
    """Held-out windows in whole batches: data.max_eval_examples of them (0: up to 10,000)."""
    return max(1, (self.config.data.max_eval_examples or 10_000) // self.config.train.batch_size)

  @functools.cached_property
  def _documents(self):
    return text_data.load_documents(lm_data_section(self.config.data))

  def weights(self, state: TrainState) -> TrainState:
    """What `model` takes: the state (trained and frozen weights together)."""
    return state

  def task_loss(self, model, batch):
    targets_BT = batch["targets"]
    loss = model.nll_sum(batch["inputs"], targets_BT, jnp.ones(targets_BT.shape))
    loss = loss / targets_BT.size
    return loss, {"perplexity": jnp.exp(loss)}

  def export(self, state: TrainState, directory: str, dtype: str = "float32") -> str:
    raise UserError("export writes a Hugging Face Llama folder with its tokenizer, which a "
                    "run of this library's own tokenizer (byte, BPE or ABC) has no form for: "
                    "sample and evaluate the fine-tuning run itself (aigc-jax sample|eval "
                    "--workdir)")
