"""`aigc-jax train|finetune|sample|eval|export`: a thin shell over the library.

  aigc-jax train --config configs/lm_code.py --workdir runs/lm [--config.train.steps=2000]
  aigc-jax finetune --config configs/ft_sft_smollm2.py --workdir runs/sft  (train, for
                  fine-tuning configs)
  aigc-jax sample --workdir runs/lm [--prompt TEXT] [--num N] [--max-new-tokens N]
                  [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
                  [--seed S]
  aigc-jax eval --workdir runs/lm
  aigc-jax export --workdir runs/sft --format safetensors --out DIR [--dtype bfloat16]
                  (a fine-tuned model, adapters merged, as a Hugging Face Llama folder)

Problems a user can fix print one line and exit with status 2 (--verbose: traceback).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging

from aigc_jax.errors import UserError
from aigc_jax.train.memory import keep_step_memory, reexec_with_malloc_tunables
from aigc_jax.xla_flags import apply_fast_cpu_flags

COMMANDS = ("train", "finetune", "sample", "eval", "export")
EXPORT_FORMATS = ("safetensors",)
USAGE = __doc__


def _define_flags(command: str) -> None:
  flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics, samples).",
                      required=True)
  flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")
  flags.DEFINE_bool("compilation_cache", True,
                    "Keep compiled programs in WORKDIR/jax_cache so a resumed run, sample or "
                    "eval does not compile from scratch.")
  if command in ("train", "finetune"):
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file exposing get_config().",
                                    lock_config=True)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                      "(multi-process runs: TPU pods and SLURM are detected; elsewhere give "
                      "--coordinator_address, --num_processes and --process_id).")
    flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of "
                        "process 0 (default: $JAX_COORDINATOR_ADDRESS or detected).")
    flags.DEFINE_integer("num_processes", None, "With --distributed: processes in the run.")
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
  elif command == "sample":
    flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for several prompts).")
    flags.DEFINE_integer("num", None, "LM: samples per prompt; GAN: images in the grid "
                         "(default: the config's sample.num).")
    flags.DEFINE_integer("max-new-tokens", None, "Tokens to generate per sample.")
    flags.DEFINE_float("temperature", None, "Sampling temperature (0: greedy).")
    flags.DEFINE_integer("top-k", None, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top-p", None, "Nucleus sampling mass (1.0: all).")
    flags.DEFINE_float("repetition-penalty", None, "Penalty on ids already in the prompt or "
                       "output (1.0: none; 1.1-1.3 curbs greedy loops).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
  elif command == "export":
    flags.DEFINE_enum("format", "safetensors", EXPORT_FORMATS, "Export format.")
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                      "Dtype of the exported weights.")


def _run(command: str) -> None:
  FLAGS = flags.FLAGS
  if FLAGS.compilation_cache:
    import jax
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(FLAGS.workdir), "jax_cache"))
  if command in ("train", "finetune"):
    cluster = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
               if FLAGS[name].value is not None]
    if cluster and not FLAGS.distributed:
      raise UserError(f"{', '.join(cluster)} set without --distributed: add --distributed")
    if FLAGS.distributed:
      import jax
      # Unset settings are detected from the environment (SLURM, TPU pods, ...).
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id)
    from aigc_jax.train.loop import train_and_evaluate
    try:
      config = FLAGS.config
      if config is not None:
        config.keys()  # a config file that failed to load raises only when used
    except OSError as e:  # config_flags loads the file lazily
      raise UserError(f"cannot load --config: {str(e).splitlines()[-1].strip()}") from e
    if config is None:
      raise UserError("--config is required: e.g. --config configs/lm_tiny.py")
    if command == "finetune" and config.get("family") != "finetune":
      raise UserError(f"`finetune` needs a fine-tuning config (family 'finetune'), but this "
                      f"one is family {config.get('family')!r}: use `aigc-jax train`")
    import jax
    if jax.default_backend() == "cpu":
      keep_step_memory()  # the step's temporaries stay mapped between steps
    summary = train_and_evaluate(config, FLAGS.workdir)
    print(json.dumps(summary, indent=2))
    return
  from aigc_jax import config as config_lib
  from aigc_jax.train import open_run
  if command == "export":  # refuse a bad --out before restoring the run
    from aigc_jax.pretrained.hf import check_export_target
    check_export_target(FLAGS.out, FLAGS.workdir)
  config = config_lib.load_config(FLAGS.workdir)
  run = open_run(config, FLAGS.workdir, for_training=False)
  if command == "eval":
    metrics = run.evaluate()
    print(json.dumps({"step": int(run.state.step), **metrics}))
    return
  if command == "export":
    if not hasattr(run.family, "export"):
      raise UserError(f"export needs a fine-tuning run; {FLAGS.workdir!r} holds a "
                      f"{run.family.name!r} run")
    print(run.family.export(run.state, FLAGS.out, dtype=FLAGS.dtype))
    return
  # Options the user gave (None: the run config's sample.* default); each family reads
  # the ones it understands.
  options = {name.replace("-", "_"): FLAGS[name].value
             for name in ("prompt", "num", "max-new-tokens", "temperature", "top-k", "top-p",
                          "repetition-penalty", "seed")}
  print(run.family.cli_sample(run.state, run.workdir, options))


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request after a checkpoint; re-run resumes


class _OneLineLogs(std_logging.Filter):
  """Without --verbose: a failure that aigc_jax reports itself (a checkpoint that could not
  be written) is not logged again by Orbax's writer threads, and other log records lose
  their tracebacks."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    orbax = f"{os.sep}orbax{os.sep}"
    # Orbax's own records, and asyncio's about Orbax's tasks ("exception never retrieved").
    if record.levelno >= std_logging.ERROR and (orbax in record.pathname
                                                or orbax in record.getMessage()):
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _from_orbax(unraisable) -> bool:
  """Whether an unraisable exception is Orbax's: raised in its code, or the "Event loop is
  closed" of a write callback (tensorstore's, from C, after a failed save) handed to
  asyncio's loop that Orbax has already closed."""
  orbax = f"{os.sep}orbax{os.sep}"
  frames = []
  tb = unraisable.exc_traceback
  while tb is not None:
    frames.append(tb.tb_frame.f_code)
    tb = tb.tb_next
  if any(orbax in code.co_filename for code in frames):
    return True
  closed_loop = (unraisable.exc_type is RuntimeError and frames
                 and frames[0].co_name == "call_soon_threadsafe"
                 and f"{os.sep}asyncio{os.sep}" in frames[0].co_filename)
  return bool(closed_loop) or orbax in repr(unraisable.object)


def _quiet_background_failures() -> None:
  for handler in (*std_logging.getLogger().handlers, logging.get_absl_handler()):
    handler.addFilter(_OneLineLogs())
  # Exceptions in Orbax's callbacks that cannot raise (write callbacks on an event loop
  # already closed after a failed save) are not printed; every other one still is.
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _from_orbax(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> None:
  """The `aigc-jax` entry point (see the module docstring for the commands)."""
  if argv is None and sys.argv[1:2] in (["train"], ["finetune"]):
    # A training process restarts once with the malloc settings that keep the step's
    # memory mapped (train/memory.py; ~2 s of start-up for 10-25 % faster CPU steps).
    reexec_with_malloc_tunables()
  apply_fast_cpu_flags()  # before JAX starts a backend
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(USAGE, file=sys.stderr)
    sys.exit(0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2)
  command = argv.pop(1)
  _define_flags(command)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as e:
      # Bad flags or --config.KEY overrides (ml_collections adds a "did you mean").
      message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
      if message[:1] == message[-1:] and message[:1] in "'\"":
        message = message[1:-1]
      print(f"error: {message}\n(see aigc-jax --help)", file=sys.stderr)
      sys.exit(2)

  def entry(_):
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
      _quiet_background_failures()
    from aigc_jax.train.loop import Preempted
    try:
      _run(command)
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    except UserError as e:
      if flags.FLAGS.verbose:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(entry, argv=argv, flags_parser=parse)


if __name__ == "__main__":
  main()
