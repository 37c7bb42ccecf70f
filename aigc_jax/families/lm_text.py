"""What a language model trained on documents does, whether trained from scratch (the
`lm` family) or fine-tuned from a pretrained one (`finetune`'s task `lm`): random windows
of the token stream for training, held-out windows for evaluation (loss, perplexity, bits
per token and per byte), samples as text, and for music (an ABC tokenizer) sampled-tune
figures at each evaluation and .abc/.mid/.wav/.png files per sample.

A family using `TextLm` provides `config`, `tokenizer`, `model_cfg`, `_documents` ((train,
val) documents), `model(weights)` (the model in evaluation mode) and `weights(state)`
(what `model` takes: the parameters, or the state when frozen weights live beside them).
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.data import text as text_data
from aigc_jax.data.batching import TokenWindows, eval_windows
from aigc_jax.files import write_text
from aigc_jax.models.sampling import SAMPLING_KEYS, generate
from aigc_jax.train.state import TrainState


class TextLm:
  """Data, evaluation and samples of a document language model (see the module doc)."""

  eval_windows_batches: int = 0  # evaluation batches; 0: config.train.eval_batches

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def _token_streams(self) -> tuple[np.ndarray, np.ndarray]:
    train_docs, val_docs = self._documents
    return (text_data.tokenize_documents(self.tokenizer, train_docs),
            text_data.tokenize_documents(self.tokenizer, val_docs))

  @functools.cached_property
  def train_data(self) -> TokenWindows:
    c = self.config
    return TokenWindows(self._token_streams[0], c.train.batch_size, c.data.seq_len, c.seed)

  @functools.cached_property
  def _eval_windows(self) -> list[dict]:
    c = self.config
    return eval_windows(self._token_streams[1], c.train.batch_size, c.data.seq_len,
                        self.eval_windows_batches or c.train.eval_batches)

  def eval_batches(self):
    return self._eval_windows

  # --- evaluation -------------------------------------------------------------------
  @functools.cached_property
  def _byte_lengths(self) -> jax.Array:
    return jnp.asarray(self.tokenizer.token_byte_lengths())

  def eval_step(self, state: TrainState, batch) -> dict:
    targets_BT = batch["targets"]
    nll_sum = self.model(self.weights(state)).nll_sum(batch["inputs"], targets_BT,
                                                      jnp.ones(targets_BT.shape))
    return {"nll_sum": nll_sum, "tokens": jnp.float32(targets_BT.size),
            "bytes": self._byte_lengths[targets_BT].sum().astype(jnp.float32)}

  def summarize_eval(self, sums: dict) -> dict:
    loss = sums["nll_sum"] / sums["tokens"]
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_bits_per_token": loss / math.log(2),
            "val_bits_per_byte": sums["nll_sum"] / (math.log(2) * sums["bytes"])}

  @functools.cached_property
  def _held_out_tunes(self) -> tuple[list, list[str]]:
    """(the validation tunes parsed, their headers): the music figures' reference."""
    from aigc_jax.evaluation import abc_music, music_eval
    texts = [text for _, text in self._documents[1]]
    return abc_music.parse_all(texts), [music_eval.tune_header(t) for t in texts]

  def sample_metrics(self, state: TrainState) -> dict:
    """A text LM is measured by its held-out likelihood alone; a music run with
    music.eval_samples also by tunes it samples (`music_eval.sample_metrics`)."""
    music = self.config.get("music") or {}
    if not music.get("eval_samples"):
      return {}
    from aigc_jax.evaluation import music_eval
    reference, headers = self._held_out_tunes
    return music_eval.sample_metrics(
        self, self.weights(state), reference, headers, music.eval_samples,
        music.eval_max_new_tokens or self.model_cfg.max_seq_len, seed=self.config.seed + 7)

  # --- samples ----------------------------------------------------------------------
  def generate_text(self, weights, prompts: list[str], *, max_new_tokens: int, seed: int = 0,
                    **sampling) -> list[str]:
    """Continuations of each prompt (an empty prompt starts a new document); `weights`:
    what `model` takes; `sampling`: temperature, top_k, top_p, repetition_penalty (see
    `models.sampling.generate`)."""
    eos = self.tokenizer.eos_id
    ids = [self.tokenizer.encode(p) if p else np.asarray([eos]) for p in prompts]
    out = generate(self.model(weights), ids, max_new_tokens=max_new_tokens,
                   key=jax.random.PRNGKey(seed), eos_id=eos,
                   **{"temperature": 0.8, **sampling})
    return [self.tokenizer.decode(o) for o in out]

  def joined(self, prompt: str, continuation: str) -> str:
    """The prompt and what the model wrote after it, as one text (event words are
    separated by spaces: the prompt's last word and the first new one too)."""
    if self.tokenizer.kind == "chorale":
      return f"{prompt.rstrip()} {continuation}".strip()
    return prompt + continuation

  def cli_sample(self, state: TrainState, workdir: str, options: dict) -> str:
    """`aigc-jax sample`: continuations of each prompt, as text (and for music, each tune
    as .abc, .mid, .wav and a piano roll under WORKDIR/samples/music, or beside the
    `sample --out` file: options['music_stem'])."""
    s = self.config.sample
    pick = lambda key: s[key] if options.get(key) is None else options[key]
    prompts = options.get("prompt") or [s.prompt]
    num = pick("num")
    texts = self.generate_text(
        self.weights(state), [p for p in prompts for _ in range(num)],
        max_new_tokens=pick("max_new_tokens"), seed=options.get("seed") or 0,
        **{key: pick(key) for key in SAMPLING_KEYS})
    kind = self.tokenizer.kind
    full = [self.joined(prompts[i // num], text) for i, text in enumerate(texts)]
    if kind in ("abc", "chorale"):  # music: also .mid, .wav and a piano roll each
      from aigc_jax.music.render import write_samples
      stem = options.get("music_stem")  # `sample --out PATH`: beside PATH, not in the run
      out_dir, tag = ((os.path.dirname(stem), os.path.basename(stem)) if stem else
                      (os.path.join(workdir, "samples", "music"),
                       f"sample_seed{options.get('seed') or 0}"))
      _, summary = write_samples(full, out_dir, tag, kind)
      print(summary, file=sys.stderr)
    return "\n".join(f"=== sample {i} ===\n{text}\n" for i, text in enumerate(full))

  def write_samples(self, state: TrainState, step: int, workdir: str) -> list[str]:
    s = self.config.sample
    prompt_len = len(self.tokenizer.encode(s.prompt)) or 1
    budget = min(s.max_new_tokens, self.model_cfg.max_seq_len - prompt_len)
    if budget < 1 or s.num < 1:
      return []
    texts = self.generate_text(self.weights(state), [s.prompt] * s.num,
                               max_new_tokens=budget, seed=step,
                               **{key: s[key] for key in SAMPLING_KEYS})
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    return [write_text(os.path.join(out_dir, f"step_{step:07d}.txt"), "".join(
        f"=== sample {i} (step {step}) ===\n{self.joined(s.prompt, text)}\n\n"
        for i, text in enumerate(texts)))]
