"""The CLI's application commands: `aigc-jax index`, `ask` and `classify` (flags defined
in `aigc_jax.cli`, which calls these)."""

from __future__ import annotations

import json
import sys

from aigc_jax.errors import UserError


def retrieval(command: str, FLAGS, args: list[str]) -> None:
  """`aigc-jax index --config FILE` and `aigc-jax ask --index DIR "question"`."""
  from aigc_jax.apps import ask
  if command == "index":
    from aigc_jax.config import load_config_file
    print(json.dumps(ask.build(load_config_file(FLAGS.config))))
    return
  if len(args) != 1:
    raise UserError(f"ask takes one question (quote it), got {len(args)} arguments: "
                    "aigc-jax ask --index DIR \"How do I ...?\"")
  from aigc_jax.cli import _check_utf8
  _check_utf8("the question", args)
  result = ask.ask(ask.index_path_ok(FLAGS.index), args[0], FLAGS.k,
                   FLAGS["max-new-tokens"].value, FLAGS.generator)
  ask.print_answer(result)


def classify(run, FLAGS) -> None:
  """`aigc-jax classify`: labels for every text of --input, and with --monitor the
  windows, alerts and plot."""
  from aigc_jax.apps import classify as classify_lib
  from aigc_jax.evaluation import monitor as monitor_lib
  text_field, time_field = FLAGS["text-field"].value, FLAGS["time-field"].value
  records = None
  if FLAGS.monitor:
    if not FLAGS.input.endswith(".jsonl"):
      raise UserError(f"--monitor needs a .jsonl --input with a {time_field!r} field "
                      f"on every line, got {FLAGS.input}")
    records = monitor_lib.read_records(FLAGS.input, text_field, time_field)
    texts = [r["text"] for r in records]
  else:
    for name in ("window", "z", "warmup", "time-field"):
      if not FLAGS[name].using_default_value:
        raise UserError(f"--{name} is a --monitor setting: add --monitor, or drop it")
    texts = monitor_lib.read_texts(FLAGS.input, text_field)
  probs, stats = classify_lib.classify_texts(run, texts, FLAGS["batch-size"].value)
  names = classify_lib.class_names(run.family)
  extra = ([{"time": r["record"][time_field]} for r in records] if records else None)
  path = classify_lib.write_predictions(FLAGS.out, texts, probs, names, extra)
  if stats["truncated"]:
    print(f"warning: {stats['truncated']} texts were longer than the run's data.seq_len and "
          "were cut to it", file=sys.stderr)
  counts = [int((probs.argmax(1) == c).sum()) for c in range(len(names))]
  summary = {"out": path, **{k: stats[k] for k in ("texts", "seconds", "texts_per_second",
                                                   "shapes")},
             "labels": {n: int(c) for n, c in zip(names, counts, strict=True)}}
  if records is not None:
    found = classify_lib.monitor(run, records, probs, FLAGS.out, FLAGS.window, FLAGS.z,
                             FLAGS.warmup)
    summary.update(windows=found["windows"], alerts=len(found["alerts"]),
                   alerts_path=found["alerts_path"], plot_path=found["plot_path"])
  print(json.dumps(summary))

