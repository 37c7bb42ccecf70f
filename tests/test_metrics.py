"""The run's metric records: JSON lines and TensorBoard events."""

import glob
import math
import struct
import sys

import pytest

from aigc_jax.train.metrics import MetricsWriter, read_metrics
from tests.conftest import run_python

tensorboardX = pytest.importorskip("tensorboardX")

WRITE = """
import sys
from aigc_jax.train.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1])
w.write(3, "train", {"loss": 1.5, "lr": 0.25})
w.write(6, "val", {"loss": 1.25, "nan": float("nan")})
w.close()
print("torch imported:", "torch" in sys.modules)
"""


def _scalars(event_file: str) -> dict[tuple[int, str], float]:
  """{(step, tag): value} of a TensorBoard event file (TFRecord framing: length u64,
  its CRC u32, the Event proto, its CRC u32)."""
  from tensorboardX.proto.event_pb2 import Event

  scalars = {}
  data = open(event_file, "rb").read()
  at = 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    event = Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4
    for value in event.summary.value:
      scalars[(event.step, value.tag)] = value.simple_value
  return scalars


def test_records_and_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
  proc = run_python(WRITE, args=[str(tmp_path)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  # tensorboardX imports torch when it can (1.8 s, and PyTorch's thread pools in a JAX
  # process); the writer hides it.
  assert "torch imported: False" in proc.stdout
  train, val = read_metrics(str(tmp_path))
  assert train == {"step": 3, "split": "train", "loss": 1.5, "lr": 0.25}
  assert math.isnan(val.pop("nan")) and val == {"step": 6, "split": "val", "loss": 1.25}
  [events] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  # Non-finite values are left out of TensorBoard (its charts cannot show them).
  assert _scalars(events) == {(3, "train/loss"): 1.5, (3, "train/lr"): 0.25,
                              (6, "val/loss"): 1.25}


def test_a_process_that_imported_torch_keeps_it(tmp_path):
  torch = pytest.importorskip("torch")
  MetricsWriter(str(tmp_path)).close()
  assert sys.modules["torch"] is torch
