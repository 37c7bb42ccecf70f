"""What a run may change when it resumes or is read, checked before anything is
restored: the config against the checkpoint's own copy (`fixed_differences`), the
training data against its recorded fingerprint, and any start-up check agreed by every
process (`on_every_process`)."""

from __future__ import annotations

import os

import jax
import numpy as np

from aigc_jax import config as config_lib
from aigc_jax.errors import UserError

# Model settings a resume may change: how the same parameters are computed, not what
# they are (the layer layout, `scan_layers`, changes the parameters' shapes: not here).
RUNTIME_MODEL_KEYS = ("attention", "remat", "remat_policy", "logits_chunk", "dtype", "dropout",
                      "max_seq_len")
# Data settings that say where the data are and how they are read, not what they are: a
# resume may change them (the training data's fingerprint, checked on resume, says whether
# the data are the same), e.g. to move a corpus or to name its encoding.
DATA_READING_KEYS = ("path", "val_path", "tfds_data_dir", "encoding")


def fixed_differences(old, new) -> list[str]:
  """The differences ("field: old -> new") between two run configs in the settings a
  checkpoint depends on: the family, the seed, the parameters' shapes and the data."""
  free = ({f"model.{key}" for key in RUNTIME_MODEL_KEYS}
          | {f"data.{key}" for key in DATA_READING_KEYS})
  return [f for section in ("family", "seed", "model", "data")
          for f in config_lib.differing_fields({section: old.get(section)},
                                               {section: new.get(section)})
          if f.split(":")[0] not in free]


def _check_resume_config(config, workdir: str, module, checkpointer) -> None:
  """A resumed run must build the same parameters on the same data as the checkpoint it
  resumes (its own copy of the config decides, whatever config.json says); the
  schedule, the mesh, the model's runtime settings (RUNTIME_MODEL_KEYS) and how the data
  are found and read (DATA_READING_KEYS) may change."""
  saved = checkpointer.saved_config() if checkpointer.all_steps() else None
  if saved is not None:
    old, what = config_lib.complete_config(saved[0], module), f"step {saved[1]}'s checkpoint"
  elif os.path.exists(os.path.join(workdir, "config.json")):
    old, what = config_lib.load_config(workdir, family=module), "config.json"
  else:
    return
  fixed = fixed_differences(old, config)
  if fixed:
    raise UserError(f"workdir {workdir!r} holds a run with a different configuration "
                    f"({'; '.join(fixed)}; from {what}): use a new --workdir, or the "
                    "original settings")


def _check_read_config(config, workdir: str, module, checkpointer) -> None:
  """eval/sample: config.json must describe the parameters the checkpoints hold (a
  hand-edited config.json would otherwise make every checkpoint look damaged)."""
  saved = checkpointer.saved_config()
  if saved is None:
    return
  fixed = fixed_differences(config_lib.complete_config(saved[0], module), config)
  if fixed:
    raise UserError(f"{os.path.join(workdir, 'config.json')} differs from the config saved "
                    f"with the checkpoint of step {saved[1]} ({'; '.join(fixed)}): undo the "
                    "edit, or delete config.json to use the checkpoint's copy (of a run you "
                    "cannot write: copy its folder)")


def on_every_process(check) -> None:
  """Runs `check()`, a start-up check that may raise UserError. With several processes
  they agree first: if it failed on any, it raises on every one (a process that went on
  alone would wait forever in the first step's collectives)."""
  error = None
  try:
    check()
  except UserError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is None and failed.any():
      error = UserError(f"process {int(np.argmax(failed))} refused to start (its error "
                        "names the problem): see its output")
  if error is not None:
    raise error


def check_data_fingerprint(saved: dict, current: dict, workdir: str) -> None:
  """A resume must train on the data the checkpoint was trained on: the fingerprints
  (size and hash of the tokenized or decoded training data) recorded in the checkpoint's
  data state and computed now must agree (checkpoints without one are not checked)."""
  old, new = saved.get("data"), current.get("data")
  if old is None or new is None or old == new:
    return
  describe = lambda f: ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                 for k, v in sorted(f.items()))
  raise UserError(f"the training data differ from the data the run in {workdir!r} was "
                  f"trained on (then: {describe(old)}; now: {describe(new)}): restore the "
                  "original data, or start over in a new --workdir")
