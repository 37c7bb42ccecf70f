"""Fine-tuning task `classify`: a linear head on the last token's hidden state
(`models.classifier.SequenceClassifier`). The data: VADER's movie-review snippets,
positive vs negative; evaluation reports accuracy beside a TF-IDF + logistic-regression
baseline on the same split."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.families.finetune_base import FinetuneFamily, pad_rows
from aigc_jax.models.classifier import SequenceClassifier
from aigc_jax.models.transformer import Transformer
from aigc_jax.train.state import TrainState


class ClassifyFamily(FinetuneFamily):
  task = "classify"
  datasets = ("vader",)
  plot_keys = ("loss", "accuracy")
  lm_key = "lm"
  head_patterns = (r"^head\.",)  # the classification head always trains

  def wrap(self, lm: Transformer, rngs: nnx.Rngs) -> nnx.Module:
    return SequenceClassifier(lm, self.config.task.num_classes, rngs=rngs)

  def export_extras(self, state: TrainState) -> dict[str, dict[str, np.ndarray]]:
    """The head beside the Llama folder, in `classifier_head.safetensors` (weight [C, D]),
    written in the same atomic export as the model."""
    kernel = np.asarray(jax.device_get(state.params["head"]["kernel"]), np.float32)
    return {"classifier_head.safetensors": {"weight": np.ascontiguousarray(kernel.T)}}

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def split_texts(self) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """((train texts, labels), (test texts, labels))."""
    from aigc_jax.data.sentiment import sentiment_split
    d = self.config.data
    return sentiment_split(d.path, d.vader_set, d.test_fraction)

  def load_examples(self) -> tuple[dict, dict]:
    train, test = self.split_texts
    return self._classify_arrays(*train), self._classify_arrays(*test)

  def _classify_arrays(self, texts: list[str], labels: np.ndarray) -> dict:
    # Each snippet ends with end-of-sequence: the token whose state the head reads.
    eos = np.asarray([self.tokenizer.eos_id], np.int32)
    rows = [np.concatenate([self.tokenizer.encode(t)[:self.config.data.seq_len - 1], eos])
            for t in texts]
    tokens, lengths = pad_rows(rows, self.config.data.seq_len, self.tokenizer.eos_id)
    return {"tokens": tokens, "lengths": lengths, "labels": labels.astype(np.int32)}

  # --- objective --------------------------------------------------------------------
  def task_loss(self, model, batch):
    logits = model(batch["tokens"], batch["lengths"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    accuracy = (logits.argmax(-1) == batch["labels"]).mean()
    return loss, {"accuracy": accuracy}

  def eval_step(self, state: TrainState, batch) -> dict:
    logits = self.model(state)(batch["tokens"], batch["lengths"])
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return {"nll_sum": nll_B.sum(), "correct": (logits.argmax(-1) == batch["labels"]).sum(),
            "count": jnp.float32(nll_B.size)}

  def summarize_eval(self, sums: dict) -> dict:
    loss = sums["nll_sum"] / sums["count"]
    return {"val_loss": loss, "val_accuracy": sums["correct"] / sums["count"],
            "baseline_tfidf_accuracy": self.baseline_accuracy}

  @functools.cached_property
  def baseline_accuracy(self) -> float:
    """TF-IDF + logistic regression on the same split (all held-out snippets)."""
    from aigc_jax.data.sentiment import tfidf_baseline
    return tfidf_baseline(*self.split_texts)

  # --- samples ----------------------------------------------------------------------
  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    raise UserError("a classification run has no text to sample: use `aigc-jax eval`")

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    return []
