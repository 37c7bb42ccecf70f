"""Metrics that cannot be written, with real files and real processes: a run whose
metrics.jsonl hits a full disk (a link to /dev/full: the kernel's own ENOSPC, as root too)
stops at once with one error line and exit 2, its checkpoints intact; the same command
resumes after a crash left metrics.jsonl ending mid-record, and plots; TensorBoard events
that cannot be written (the file-size limit standing in for a full disk) fail promptly as
one error instead of hanging the run; closing the writer after a failure adds no second
error."""

import errno
import json
import os
import subprocess
import sys

import pytest

from aigc_jax.errors import UserError
from aigc_jax.train import Checkpointer
from aigc_jax.train import metrics as metrics_lib
from aigc_jax.train.metrics import MetricsWriter, plot_curves, read_metrics
from tests.conftest import ROOT, TINY_CONFIG, run_cli
from tests.test_metrics import _scalars

ARGS = ["train", "--config", TINY_CONFIG, "--config.sample.num=0",
        "--config.train.checkpoint_every=4", "--config.train.eval_every=4",
        "--config.train.log_every=1"]
TORN = b'{"step": 9, "split": "train", "loss": 4.'  # a record cut short by a crash


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_metrics_stops_the_run_with_one_error_then_resume_plots(tmp_path):
  workdir = tmp_path / "run"
  run = lambda steps, timeout: run_cli(*ARGS, "--workdir", str(workdir),
                                       f"--config.train.steps={steps}", timeout=timeout)
  first = run(4, 300)
  assert first.returncode == 0, first.stderr[-3000:]
  metrics = workdir / "metrics.jsonl"
  kept = metrics.read_bytes()
  metrics.unlink()
  metrics.symlink_to("/dev/full")  # every write: ENOSPC

  full = run(8, 180)  # bounded: a writer that blocked would time out here
  assert full.returncode == 2, full.stderr[-3000:]
  [line] = _error_lines(full.stderr)
  assert line.startswith(f"error: cannot write the run's metrics to {metrics} (No space left "
                         "on device): free disk space"), full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [4]  # intact

  metrics.unlink()  # space again, and a crash had cut the last record short
  metrics.write_bytes(kept + TORN)
  resumed = run(8, 300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert json.loads(resumed.stdout)["start_step"] == 4
  assert "Traceback" not in resumed.stderr
  data = metrics.read_bytes()
  assert data.startswith(kept) and TORN not in data and data.endswith(b"\n")
  records = [json.loads(line) for line in data.splitlines()]  # every line whole
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
  assert (workdir / "plots" / "loss.png").stat().st_size > 0
  assert Checkpointer(str(workdir / "checkpoints")).all_steps() == [4, 8]


WRITE_UNTIL_FULL = """
import resource, signal, sys
# Files may not grow past 8 kB, and writes beyond fail with EFBIG instead of killing the
# process: what a full disk looks like to the writer.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
from aigc_jax.errors import UserError
from aigc_jax.train.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1])
# Short integer scalars: each record's TensorBoard event outgrows its JSON line, so the
# event file reaches the size limit first.
values = {k: 1 for k in "abcdefghijklmnop"}
try:
  for step in range(100_000):
    w.write(step, "train", values)
except UserError as e:
  print("error:", e, file=sys.stderr)
  try:
    w.write(step + 1, "train", values)
  except UserError as again:
    print("again:", again == e, file=sys.stderr)
  w.close()
  print("closed", step, file=sys.stderr)
  sys.exit(2)
"""


def test_tensorboard_events_that_cannot_be_written_fail_at_once_not_hang(tmp_path):
  proc = subprocess.run([sys.executable, "-c", WRITE_UNTIL_FULL, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr[-3000:]
  [events] = os.listdir(tmp_path / "tensorboard")
  events = str(tmp_path / "tensorboard" / events)
  [line] = _error_lines(proc.stderr)
  assert line.startswith(f"error: cannot write the run's metrics to {events} (File too "
                         "large): free disk space"), proc.stderr
  assert "again: True" in proc.stderr and "closed" in proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  # Every record either whole in both files or, for the failed one, in JSONL only: the
  # event cut short was cut off again, and the event file still reads to its end.
  records = read_metrics(str(tmp_path))
  step = int(proc.stderr.split("closed ")[1])
  assert [r["step"] for r in records] == list(range(step + 1))
  assert {s for s, _ in _scalars(events)} == set(range(step))


def test_unwritable_tensorboard_directory_is_one_error_naming_it(tmp_path):
  (tmp_path / "tensorboard").write_text("a file where the directory should be")
  with pytest.raises(UserError, match=r"cannot write the run's metrics to .*tensorboard"):
    MetricsWriter(str(tmp_path))
  os.remove(tmp_path / "tensorboard")
  MetricsWriter(str(tmp_path)).close()  # the JSONL file was not left open or broken


def test_a_torn_last_line_is_skipped_by_readers_and_repaired_by_the_writer(tmp_path, capsys):
  whole = b'{"step": 1, "split": "train", "loss": 2.0}\n'
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(whole + TORN)
  assert read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 2.0}]
  assert plot_curves(str(tmp_path)) is not None

  w = MetricsWriter(str(tmp_path))
  w.write(2, "train", {"loss": 1.5})
  w.close()
  assert path.read_bytes() == whole + b'{"step": 2, "split": "train", "loss": 1.5}\n'
  assert "cut short" in capsys.readouterr().err

  # A last record that is whole but lost its newline is kept, and ended.
  path.write_bytes(whole.rstrip(b"\n"))
  MetricsWriter(str(tmp_path)).close()
  assert path.read_bytes() == whole
  # A bad line before the last is not a crash's doing: an error naming it.
  path.write_bytes(TORN + b"\n" + whole)
  with pytest.raises(UserError, match="line 1 is not a JSON record"):
    read_metrics(str(tmp_path))


def test_close_after_a_failure_adds_no_second_error(tmp_path, monkeypatch, capsys):
  def failing_close(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)

  monkeypatch.setattr(metrics_lib._AppendFile, "close", failing_close)
  w = MetricsWriter(str(tmp_path))
  with pytest.raises(RuntimeError, match="the save failed"):
    try:
      raise RuntimeError("the save failed")
    finally:
      w.close()  # another error is propagating: one line, not a second traceback
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: cannot write the run's metrics"), err
  w = MetricsWriter(str(tmp_path))
  with pytest.raises(UserError, match="No space left on device"):
    w.close()  # nothing else to report: the close's own error
