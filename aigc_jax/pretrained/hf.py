"""Hugging Face Llama checkpoints (`config.json` + `*.safetensors`): import and export.

Hugging Face stores Q/K in the "rotate half" layout our rotary embeddings use, so the
weights map one to one (transposed: files hold [out, in]). Checkpoints sharded over
several `.safetensors` files are read whole. A `tokenizer.json` (and the chat template in
`tokenizer_config.json`) beside the weights is read too and written on export.

An export is all or nothing: the files go to a sibling folder `OUT.tmp-<pid>`, are synced,
and the folder then takes OUT's place in one rename (an atomic exchange with a previous
export). Its last file, `aigc_jax_export.json`, lists what was written; the loader refuses
a folder of ours without it (an interrupted export). Folders from elsewhere load as they
are. An export never lands in a run folder (config.json + checkpoints/) or replaces a
folder it did not write.

  model, tokenizer = load_hf("path/to/llama_dir")
  export_hf("out_dir", cfg, params, tokenizer)
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import time

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import fsync_path
from aigc_jax.models.transformer import TransformerConfig
from aigc_jax.pretrained import llama
from aigc_jax.pretrained.tokenizer import PretrainedTokenizer

SUPPORTED_MODEL_TYPES = ("llama",)
EXPORT_MARKER = "aigc_jax_export.json"  # written last: the export is complete
EXPORTER = "aigc_jax"  # in the marker and in the weights' safetensors metadata


def _safetensors():
  try:
    from safetensors import numpy as st_numpy
    from safetensors import safe_open
  except ImportError as e:
    raise UserError("Hugging Face checkpoints need the `safetensors` package: "
                    "pip install 'aigc_jax[pretrained]'") from e
  return safe_open, st_numpy


def read_config_json(directory: str) -> tuple[dict, str]:
  """(the parsed config.json of a Hugging Face checkpoint folder, its path); UserError
  when it is missing or not JSON."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"no config.json in {directory!r}: not a Hugging Face checkpoint folder")
  try:
    with open(path) as f:
      return json.load(f), path
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e})") from e


def read_hf_config(directory: str) -> TransformerConfig:
  """The TransformerConfig of a Hugging Face Llama folder's config.json (UserError when
  the folder or architecture does not fit)."""
  c, path = read_config_json(directory)
  if c.get("model_type") not in SUPPORTED_MODEL_TYPES:
    raise UserError(f"model_type {c.get('model_type')!r} in {path} is not supported: only "
                    f"{SUPPORTED_MODEL_TYPES} (Llama-family decoders)")
  unsupported = {"rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                 "hidden_act": "silu"}
  for key, wanted in unsupported.items():
    if c.get(key, wanted) != wanted:
      raise UserError(f"{path} sets {key}={c[key]!r}, which aigc_jax's transformer does not "
                      f"implement (it needs {wanted!r})")
  missing = [k for k in ("vocab_size", "num_hidden_layers", "num_attention_heads",
                         "hidden_size", "intermediate_size") if k not in c]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}: not a complete Llama config")
  heads = int(c["num_attention_heads"])
  head_dim = int(c.get("head_dim") or 0)
  if head_dim * heads == int(c["hidden_size"]):
    head_dim = 0  # the default: hidden_size // heads
  return TransformerConfig(
      vocab_size=int(c["vocab_size"]), num_layers=int(c["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
      embed_dim=int(c["hidden_size"]), mlp_dim=int(c["intermediate_size"]),
      head_dim=head_dim,
      max_seq_len=int(c.get("max_position_embeddings", 2048)),
      pretrained_max_seq_len=int(c.get("max_position_embeddings", 2048)),
      rope_base=float(c.get("rope_theta", 10000.0)),
      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def read_hf(directory: str) -> tuple[TransformerConfig, dict]:
  """(config, params as float32 pure dict) from a Hugging Face Llama folder."""
  check_export_complete(directory)
  cfg = read_hf_config(directory)
  safe_open, _ = _safetensors()
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise UserError(f"no *.safetensors file in {directory!r}")
  where = {}
  for file in files:
    try:
      with safe_open(file, framework="np") as f:
        where.update({name: file for name in f.keys()})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise UserError(f"{file} is not a readable safetensors file ({e})") from e

  def tensor(name: str) -> np.ndarray:
    if name not in where:
      raise UserError(f"tensor {name!r} is missing from the safetensors files in "
                      f"{directory!r}")
    with safe_open(where[name], framework="np") as f:
      return np.asarray(f.get_tensor(name), np.float32)

  return cfg, llama.params_from_tensors(cfg, "hf", tensor)


def hf_tokenizer(directory: str) -> PretrainedTokenizer | None:
  """The folder's `tokenizer.json` (None when there is none)."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  extra = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      extra = json.load(f)
  return PretrainedTokenizer.from_file(path, bos=extra.get("bos_token"),
                                       eos=extra.get("eos_token"),
                                       chat_template=extra.get("chat_template") or "")


def load_hf(directory: str, **config_overrides):
  """(Transformer with the folder's weights, its tokenizer or None)."""
  cfg, params = read_hf(directory)
  model = llama.build_model(cfg, params, f"the checkpoint in {directory!r}", **config_overrides)
  return model, hf_tokenizer(directory)


def export_hf(directory: str, cfg: TransformerConfig, params: dict,
              tokenizer: PretrainedTokenizer | None = None, dtype: str = "float32", *,
              workdir: str | None = None, source: dict | None = None,
              extra_tensors: dict[str, dict[str, np.ndarray]] | None = None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer files, + `extra_tensors`: file
  name -> tensors) that Hugging Face `transformers` loads as LlamaForCausalLM, all at once
  (see the module docstring); returns the weights' path. The context length written
  (`max_position_embeddings`) is the pretrained file's when the model came from one
  (`cfg.pretrained_max_seq_len`), not the shorter `max_seq_len` it may run with.
  `workdir`: the run exported, whose folder the export must stay out of; `source`: what
  the marker records about it (JSON values)."""
  _, st_numpy = _safetensors()
  if dtype not in ("float32", "bfloat16", "float16"):
    raise UserError(f"export dtype must be float32, bfloat16 or float16, got {dtype!r}")
  import ml_dtypes

  out = check_export_target(directory, workdir)
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  tensors = {name: np.ascontiguousarray(np.asarray(v, np.float32).astype(np_dtype))
             for name, v in llama.tensors_from_params(cfg, "hf", params).items()}
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "head_dim": cfg.resolved_head_dim,
      "max_position_embeddings": cfg.pretrained_max_seq_len or cfg.max_seq_len,
      "rope_theta": cfg.rope_base, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "rope_scaling": None,
      "torch_dtype": dtype}
  if tokenizer is not None:
    config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  metadata = {"format": "pt", "exporter": EXPORTER}

  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write_file(os.path.join(tmp, "model.safetensors"),
                lambda path: st_numpy.save_file(tensors, path, metadata=metadata))
    for name, extra in (extra_tensors or {}).items():
      _write_file(os.path.join(tmp, name),
                  lambda path, extra=extra: st_numpy.save_file(
                      {k: np.ascontiguousarray(v) for k, v in extra.items()}, path,
                      metadata=metadata))
    if tokenizer is not None:
      _write_file(tmp, tokenizer.save)  # tokenizer.json + tokenizer_config.json
    _write_file(os.path.join(tmp, "config.json"), lambda path: _dump_json(config, path))
    marker = {"exporter": EXPORTER, "version": 1, "format": "hf-llama", "dtype": dtype,
              "files": sorted(os.listdir(tmp)), "source": source,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_file(os.path.join(tmp, EXPORT_MARKER), lambda path: _dump_json(marker, path))
    fsync_path(tmp)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(directory, "model.safetensors")


# --- all-or-nothing export folders ---------------------------------------------------
def _dump_json(value, path: str) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)



def _write_file(path: str, write) -> None:
  """`write(path)`, then the file (or each file of the folder `path`) synced to disk."""
  write(path)
  paths = ([os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path)
           else [path])
  for p in paths:
    fsync_path(p)


def _is_run(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def _read_marker(directory: str) -> dict | None:
  """The completion marker of an export folder of ours (None when absent or not ours)."""
  try:
    with open(os.path.join(directory, EXPORT_MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and marker.get("exporter") == EXPORTER else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _leftovers(out: str) -> list[tuple[str, str]]:
  """(kind 'tmp'|'old', path) of the siblings `OUT.tmp-<pid>` / `OUT.old-<pid>` that
  exports by processes no longer running left behind."""
  parent, name = os.path.split(out)
  pattern = re.compile(re.escape(name) + r"\.(tmp|old)-(\d+)$")
  found = []
  for entry in os.listdir(parent) if os.path.isdir(parent) else ():
    m = pattern.match(entry)
    if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
      found.append((m.group(1), os.path.join(parent, entry)))
  return found


def _stranded(out: str) -> str | None:
  """A complete previous export that a process killed between moving it aside and moving
  the new one in left at `OUT.old-<pid>` (None when there is none, or OUT exists)."""
  if os.path.lexists(out):
    return None
  for kind, path in _leftovers(out):
    if kind == "old" and _read_marker(path) is not None:
      return path
  return None


# What a run folder holds (train/loop.py, train/metrics.py, the families): an export may
# go into a new sub-folder of a run, never into one of these.
RUN_ENTRIES = ("config.json", "checkpoints", "metrics.jsonl", "tensorboard", "samples", "plots",
               "tokenizer.json", "fid_classifier", "eval.json", "summary.json")


def check_export_target(directory: str, workdir: str | None = None) -> str:
  """The absolute export folder, after refusing (UserError) one that is a run folder
  (config.json + checkpoints/, or `workdir`), lies inside one of its own entries
  (RUN_ENTRIES), holds a run, or already holds anything but a previous export of ours.
  Leftovers of interrupted exports beside it are removed (a stranded previous export is
  put back first)."""
  out = os.path.realpath(os.path.expanduser(directory))
  fix = ("choose a new or empty folder for the export (--out), outside any run's own files "
         "(a new sub-folder of a run, such as WORKDIR/hf, is fine)")
  runs = [os.path.realpath(os.path.expanduser(workdir))] if workdir else []
  path = out
  while True:  # the run folders `out` is, or lies inside
    if _is_run(path):
      runs.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  for run in runs:
    if out == run:
      raise UserError(f"export folder {directory!r} is the run folder {run!r} (config.json + "
                      f"checkpoints/): exporting there would overwrite the run's files; {fix}")
    if out.startswith(run + os.sep):
      entry = os.path.relpath(out, run).split(os.sep)[0]
      if entry in RUN_ENTRIES or entry.startswith("."):
        raise UserError(f"export folder {directory!r} lies inside the run folder {run!r}'s "
                        f"own {entry!r}: exporting there would mix with the run's files; {fix}")
    if run.startswith(out + os.sep):
      raise UserError(f"export folder {directory!r} holds the run folder {run!r}; {fix}")
  stranded = _stranded(out)
  if stranded:
    os.rename(stranded, out)
  _check_replaceable(directory, out)
  for _, leftover in _leftovers(out):
    shutil.rmtree(leftover, ignore_errors=True)
  return out


def _check_replaceable(directory: str, out: str) -> None:
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out) or os.path.islink(out):
    raise UserError(f"export folder {directory!r} exists and is not a folder; choose a new "
                    "or empty folder for the export (--out)")
  entries = os.listdir(out)
  if not entries:
    return
  if _read_marker(out) is None:
    raise UserError(f"export folder {directory!r} already holds files that aigc_jax's export "
                    f"did not write ({', '.join(sorted(entries)[:3])}"
                    f"{', ...' if len(entries) > 3 else ''}): it is not replaced; choose a new "
                    "or empty folder for the export (--out), or delete this one")
  folders = [e for e in entries if os.path.isdir(os.path.join(out, e))]
  if folders:  # an export holds files only: a folder in it was put there by someone
    raise UserError(f"export folder {directory!r} is a previous export but now also holds "
                    f"the folder {folders[0]!r}: move it out, or choose another folder for "
                    "the export (--out)")


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE); False when this system
  or file system cannot."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), a, None, b)


def _publish(tmp: str, out: str) -> None:
  """Puts the complete folder `tmp` at `out`: one rename when `out` is absent or empty, an
  atomic exchange with a previous export (or, where that is unavailable, the old one moved
  aside, the new one in, the old one deleted: a crash between the two leaves the old one
  at OUT.old-<pid>, which the next export puts back and the loader names)."""
  _check_replaceable(out, out)  # again: the folder may have changed while we wrote
  if not os.path.lexists(out) or not os.listdir(out):
    try:
      os.replace(tmp, out)
      fsync_path(os.path.dirname(out))
      return
    except OSError as e:  # another export got there first: replace it as below
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
      _check_replaceable(out, out)
  if _exchange(tmp, out):
    shutil.rmtree(tmp)  # now the previous export
  else:
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(os.path.dirname(out))
    shutil.rmtree(old)
  fsync_path(os.path.dirname(out))


def check_export_complete(directory: str) -> None:
  """UserError when `directory` is an export of ours that did not finish: its marker is
  missing (weights marked as ours) or names files that are not there. Folders from
  elsewhere (no marker, weights not ours) pass."""
  again = "re-run the export (`aigc-jax export`) into it"
  if not os.path.isdir(directory):
    stranded = _stranded(os.path.realpath(directory))
    if stranded:
      raise UserError(f"{directory!r} is missing, but an interrupted export left the previous "
                      f"complete one at {stranded!r}: rename it back to {directory!r} or "
                      f"{again}")
    return
  marker_path = os.path.join(directory, EXPORT_MARKER)
  if os.path.exists(marker_path):
    marker = _read_marker(directory)
    if marker is None or not isinstance(marker.get("files"), list):
      raise UserError(f"{marker_path} is damaged: the export in {directory!r} cannot be "
                      f"trusted; {again}")
    missing = [f for f in marker["files"] if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise UserError(f"the export in {directory!r} is incomplete: {', '.join(missing)} "
                      f"listed in {EXPORT_MARKER} are missing; {again}")
    return
  safe_open, _ = _safetensors()
  for file in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    try:
      with safe_open(file, framework="np") as f:
        ours = (f.metadata() or {}).get("exporter") == EXPORTER
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader
      continue
    if ours:
      raise UserError(f"the export in {directory!r} is incomplete: {EXPORT_MARKER}, written "
                      f"last by aigc_jax's export, is missing (the export was interrupted, "
                      f"or this is its temporary folder); {again}")
