"""Fine-tuning task `contrastive`: a BERT encoder's sentence embeddings trained so that a
query lands next to its passage (InfoNCE with in-batch negatives: each query's passage
is its positive, the batch's other passages its negatives; logits are cosine
similarities over `task.temperature`). The data: the standard library's documentation
(`data.name='stdlib_docs'`): a function's docstring summary -> its passage without that
summary, held-out packages for evaluation (`data.docs_corpus.retrieval_pairs`).

Evaluation: the held-out InfoNCE loss and in-batch accuracy, and retrieval among the
first `data.max_eval_examples` held-out pairs (each query against all their passages):
recall@1/5/10 and MRR.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aigc_jax.errors import UserError
from aigc_jax.families.finetune_base import FinetuneFamily
from aigc_jax.models.bert import l2_normalize, masked_mean
from aigc_jax.train.state import TrainState


def _mask(tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
  return (jnp.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]).astype(jnp.int32)


class ContrastiveFamily(FinetuneFamily):
  task = "contrastive"
  datasets = ("stdlib_docs",)
  plot_keys = ("loss", "accuracy")

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def pairs(self):
    """`retrieval_pairs` of the standard-library collection (train, held_out, passages)."""
    from aigc_jax.data.docs_corpus import retrieval_pairs, stdlib_passages
    d = self.config.data
    corpus = stdlib_passages()
    return retrieval_pairs(corpus.passages[:d.limit_files or None], d.val_fraction,
                           self.config.seed)

  @functools.cached_property
  def _passage_text(self) -> dict[str, str]:
    return {p.id: p.text for p in self.pairs.passages}

  def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask, _ = self.tokenizer.encode_batch(texts, self.config.data.seq_len,
                                                  pad_to_max_len=True)
    return np.asarray(tokens, np.int32), np.asarray(mask, np.int32).sum(1).astype(np.int32)

  def _pair_arrays(self, pairs: list[tuple[str, str]]) -> dict:
    if not pairs:
      raise UserError("no (query, passage) pairs: lower data.val_fraction or raise "
                      "data.limit_files")
    q_tokens, q_lengths = self._encode([q for q, _ in pairs])
    p_tokens, p_lengths = self._encode([self._passage_text[pid] for _, pid in pairs])
    return {"q_tokens": q_tokens, "q_lengths": q_lengths, "p_tokens": p_tokens,
            "p_lengths": p_lengths}

  def load_examples(self) -> tuple[dict, dict]:
    return self._pair_arrays(self.pairs.train), self._pair_arrays(self.pairs.held_out)

  # --- objective --------------------------------------------------------------------
  def _embed(self, model, tokens_BT, lengths_B) -> jax.Array:
    mask_BT = _mask(tokens_BT, lengths_B)
    return l2_normalize(masked_mean(model(tokens_BT, mask_BT), mask_BT))

  def _info_nce(self, model, batch) -> tuple[jax.Array, jax.Array]:
    """([B] loss per query, [B] whether its own passage scored highest)."""
    q_BD = self._embed(model, batch["q_tokens"], batch["q_lengths"])
    p_BD = self._embed(model, batch["p_tokens"], batch["p_lengths"])
    logits_BB = (q_BD @ p_BD.T) / self.config.task.temperature
    labels_B = jnp.arange(logits_BB.shape[0])
    loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels_B)
    return loss_B, logits_BB.argmax(-1) == labels_B

  def task_loss(self, model, batch):
    loss_B, hit_B = self._info_nce(model, batch)
    return loss_B.mean(), {"accuracy": hit_B.mean()}

  def eval_step(self, state: TrainState, batch) -> dict:
    loss_B, hit_B = self._info_nce(self.model(state), batch)
    return {"nll_sum": loss_B.sum(), "correct": hit_B.sum(),
            "count": jnp.float32(loss_B.size)}

  def summarize_eval(self, sums: dict) -> dict:
    return {"val_loss": sums["nll_sum"] / sums["count"],
            "val_accuracy": sums["correct"] / sums["count"]}

  def sample_metrics(self, state: TrainState) -> dict:
    """Recall@1/5/10 and MRR of the held-out queries among their passages."""
    from aigc_jax.evaluation.retrieval import mrr, recall_at_k
    from aigc_jax.retrieval.index import embed_texts
    pairs = self.pairs.held_out[:self.config.data.max_eval_examples or None]
    encoder, T = self.model(state), self.config.data.seq_len
    with warnings.catch_warnings():  # passages cut at seq_len: the training windows too
      warnings.simplefilter("ignore")
      q_QD = embed_texts(encoder, self.tokenizer, [q for q, _ in pairs], T)
      p_PD = embed_texts(encoder, self.tokenizer, [self._passage_text[p] for _, p in pairs], T)
    k = min(10, len(pairs))
    ranked = np.argsort(-(q_QD @ p_PD.T), axis=1, kind="stable")[:, :k]
    recall = recall_at_k(ranked, np.arange(len(pairs)), tuple(x for x in (1, 5, 10) if x <= k))
    return {**{f"recall_at_{x}": v for x, v in recall.items()},
            "mrr": mrr(ranked, np.arange(len(pairs))), "retrieval_pairs": len(pairs)}

  # --- samples ----------------------------------------------------------------------
  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    raise UserError("an embedding run has no text to sample: use `aigc-jax eval`, or export "
                    "it and build an index with it (aigc-jax index)")

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    return []
