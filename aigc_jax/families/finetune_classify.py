"""Fine-tuning task `classify`: a linear head on a pretrained model's hidden states: the
last token's of a decoder (`models.classifier.SequenceClassifier`), or the pooled ones of
a BERT encoder (`pretrained.format='bert'`, `EncoderClassifier`). The data: VADER's
movie-review snippets, positive vs negative (`vader`), or NYT editorial snippets and
tweets as negative / neutral / positive (`opinion`); evaluation reports accuracy and
macro-F1 beside a TF-IDF + logistic-regression baseline on the same split."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aigc_jax.errors import UserError
from aigc_jax.families.finetune_base import FinetuneFamily, pad_rows
from aigc_jax.models.classifier import EncoderClassifier, SequenceClassifier
from aigc_jax.models.transformer import Transformer
from aigc_jax.train.state import TrainState


class ClassifyFamily(FinetuneFamily):
  task = "classify"
  datasets = ("vader", "opinion")
  plot_keys = ("loss", "accuracy")
  lm_key = "lm"
  head_patterns = (r"^head\.",)  # the classification head always trains

  def wrap(self, lm, rngs: nnx.Rngs) -> nnx.Module:
    head = SequenceClassifier if isinstance(lm, Transformer) else EncoderClassifier
    return head(lm, self.config.task.num_classes, rngs=rngs)

  def export_extras(self, state: TrainState) -> dict[str, dict[str, np.ndarray]]:
    """The head beside the Llama folder, in `classifier_head.safetensors` (weight [C, D]),
    written in the same atomic export as the model."""
    kernel = np.asarray(jax.device_get(state.params["head"]["kernel"]), np.float32)
    return {"classifier_head.safetensors": {"weight": np.ascontiguousarray(kernel.T)}}

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def split_texts(self) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """((train texts, labels), (test texts, labels))."""
    d = self.config.data
    if d.name == "opinion":
      from aigc_jax.data.opinion import opinion_split
      parts = opinion_split(d.path, test_fraction=d.test_fraction)
      return tuple((list(parts[k]["texts"]), np.asarray(parts[k]["labels"]))
                   for k in ("train", "test"))
    from aigc_jax.data.sentiment import sentiment_split
    return sentiment_split(d.path, d.vader_set, d.test_fraction)

  def load_examples(self) -> tuple[dict, dict]:
    train, test = self.split_texts
    return self._classify_arrays(*train), self._classify_arrays(*test)

  def _classify_arrays(self, texts: list[str], labels: np.ndarray) -> dict:
    if hasattr(self.tokenizer, "encode_batch") and self.config.pretrained.format == "bert":
      # [CLS] text [SEP], cut to seq_len; the encoder pools over the real tokens.
      tokens, mask, _ = self.tokenizer.encode_batch(list(texts), self.config.data.seq_len,
                                                    pad_to_max_len=True)
      return {"tokens": np.asarray(tokens, np.int32),
              "lengths": np.asarray(mask, np.int32).sum(1).astype(np.int32),
              "labels": labels.astype(np.int32)}
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
    C = self.config.task.num_classes
    confusion_CC = jnp.zeros((C, C), jnp.float32).at[batch["labels"], logits.argmax(-1)].add(1.0)
    return {"nll_sum": nll_B.sum(), "correct": (logits.argmax(-1) == batch["labels"]).sum(),
            "count": jnp.float32(nll_B.size), "confusion": confusion_CC}

  def summarize_eval(self, sums: dict) -> dict:
    loss = sums["nll_sum"] / sums["count"]
    baseline = self.baseline
    return {"val_loss": loss, "val_accuracy": sums["correct"] / sums["count"],
            "val_macro_f1": macro_f1_from_confusion(np.asarray(sums["confusion"])),
            "baseline_tfidf_accuracy": baseline["accuracy"],
            "baseline_tfidf_macro_f1": baseline["macro_f1"]}

  @functools.cached_property
  def baseline(self) -> dict:
    """TF-IDF + logistic regression on the same split (all held-out texts): accuracy and
    macro-F1."""
    from aigc_jax.data.opinion import tfidf_lr_baseline
    (train_texts, train_labels), (test_texts, test_labels) = self.split_texts
    return tfidf_lr_baseline({"texts": train_texts, "labels": train_labels},
                             {"texts": test_texts, "labels": test_labels})

  # --- samples ----------------------------------------------------------------------
  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    raise UserError("a classification run has no text to sample: use `aigc-jax eval`")

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    return []


def macro_f1_from_confusion(confusion_CC: np.ndarray) -> float:
  """Macro-F1 from a confusion matrix [C, C] (rows: true class, columns: predicted): the
  mean over classes of 2 TP / (2 TP + FP + FN); a class never true nor predicted scores 0
  (as scikit-learn's f1_score with zero_division=0)."""
  tp = np.diag(confusion_CC)
  fp, fn = confusion_CC.sum(0) - tp, confusion_CC.sum(1) - tp
  denominator = 2 * tp + fp + fn
  return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 0.0)))
