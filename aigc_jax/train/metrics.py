"""Run metrics: JSON lines (one record per step and split), TensorBoard events, plots."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import socket
import struct
import sys
import time
import types

import numpy as np

from aigc_jax.errors import UserError
from aigc_jax.files import replaced_atomically


class MetricsWriter:
  """Appends {"step", "split", **metrics} records to `metrics.jsonl` and TensorBoard.

  Both files are written synchronously through descriptors opened here, one write() per
  whole record, so a write that cannot be made (a full disk, lost permissions) fails at
  once as one `UserError` naming the file and the fix, and never blocks the caller (no
  writer thread, no queue). A record that could not be written whole is cut off again,
  and a metrics.jsonl that a crash left ending mid-line is repaired on opening, so every
  record starts on a line of its own."""

  def __init__(self, workdir: str, enabled: bool = True):
    """enabled=False: records are formed but not written (a run's other processes)."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._jsonl = self._events = None
    self._error: UserError | None = None  # the failure already raised by write()
    if not enabled:
      return
    try:
      _repair_torn_tail(self.path)
      self._jsonl = _AppendFile(self.path)
    except OSError as e:
      raise _write_error(self.path, e) from e
    logdir = os.path.join(workdir, "tensorboard")
    try:
      self._events = _EventFile.create(logdir)
    except ImportError:  # TensorBoard events are optional; JSONL is the record
      pass
    except OSError as e:
      self._jsonl.close_quietly()
      self._jsonl = None
      raise _write_error(e.filename or logdir, e) from e

  def write(self, step: int, split: str, metrics: dict) -> dict:
    """Appends {"step", "split", **metrics} to metrics.jsonl (and TensorBoard); returns
    the record. A failed write raises `UserError` (and so does every later call)."""
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return record
    if self._error is not None:
      raise self._error
    scalars = {f"{split}/{k}": v for k, v in record.items()
               if k not in ("step", "split") and isinstance(v, (int, float))
               and math.isfinite(v)}  # TensorBoard's charts cannot show non-finite values
    for file, data in ((self._jsonl, (json.dumps(record) + "\n").encode()),
                       (self._events, self._events and self._events.scalars(step, scalars))):
      if file is None or not data:
        continue
      try:
        file.append(data)
      except OSError as e:
        self._error = _write_error(file.path, e)
        self._close_files()  # nothing more is written; close() has nothing left to report
        raise self._error from e
    return record

  def close(self) -> None:
    """Closes the files. A failure to close is a `UserError`, or, while another exception
    is propagating (the one to report), one line on stderr."""
    propagating = sys.exc_info()[1] is not None  # close() called in a finally or except
    try:
      self._close_files(raise_errors=True)
    except OSError as e:
      error = _write_error(e.filename, e)
      if propagating:
        print(f"warning: {error}", file=sys.stderr)
        return
      raise error from e

  def _close_files(self, raise_errors: bool = False) -> None:
    files = [f for f in (self._jsonl, self._events) if f is not None]
    self._jsonl = self._events = None
    first = None
    for f in files:
      try:
        f.close()
      except OSError as e:
        first = first or e
    if first is not None and raise_errors:
      raise first


def _write_error(path: str, e: OSError) -> UserError:
  """The one-line error for metrics that cannot be written, with the fix for its cause."""
  if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    fix = "free disk space (or raise the quota or file-size limit)"
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "fix the permissions of that path (owner, mode, `chattr -i`, a read-only mount)"
  elif e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
    fix = "move away what is in the way (a file where a directory belongs, or the reverse)"
  else:
    fix = "free disk space or fix the permissions of that path"
  return UserError(f"cannot write the run's metrics to {path} ({e.strerror or e}): {fix}, "
                   "then re-run the same command to resume from the last checkpoint")


class _AppendFile:
  """A file that grows only by whole records: each is one write() (continued after a short
  write), and one that fails part-way is cut off again."""

  def __init__(self, path: str, flags: int = os.O_CREAT):
    self.path = path
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | flags, 0o666)

  def append(self, data: bytes) -> None:
    start = os.fstat(self._fd).st_size
    view = memoryview(data)
    try:
      while view:
        written = os.write(self._fd, view)
        if written <= 0:
          raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        view = view[written:]
    except OSError as e:
      try:
        os.ftruncate(self._fd, start)  # no half record is left behind
      except OSError:
        pass
      raise OSError(e.errno, e.strerror, self.path) from e

  def close(self) -> None:
    fd, self._fd = self._fd, -1
    if fd >= 0:
      try:
        os.close(fd)
      except OSError as e:
        raise OSError(e.errno, e.strerror, self.path) from e

  def close_quietly(self) -> None:
    try:
      self.close()
    except OSError:
      pass


def _repair_torn_tail(path: str) -> None:
  """Ends `path` on a whole line: a last line that a crash cut short is removed (one that
  is whole but lacks its newline gets it), so the next record starts on its own line."""
  try:
    f = open(path, "rb+")
  except FileNotFoundError:
    return
  with f:
    size = f.seek(0, os.SEEK_END)
    tail, at = b"", size
    while at > 0 and b"\n" not in tail:  # back to the start of the last line
      step = min(at, 1 << 16)
      at -= step
      f.seek(at)
      tail = f.read(step) + tail
    if not tail or tail.endswith(b"\n"):
      return
    cut = at + tail.rfind(b"\n") + 1  # rfind's -1 (one line, no newline): 0
    if _parse(tail[cut - at:]) is not None:
      f.seek(0, os.SEEK_END)
      f.write(b"\n")
      return
    f.truncate(cut)
    print(f"note: {path} ended in a record cut short (a crash while writing it); it was "
          "removed", file=sys.stderr)


def _parse(line: bytes) -> dict | None:
  """The record of one JSON line, or None for a line that is not one."""
  try:
    record = json.loads(line)
  except ValueError:  # includes UnicodeDecodeError (a multi-byte character cut in two)
    return None
  return record if isinstance(record, dict) else None


class _EventFile(_AppendFile):
  """A TensorBoard event file (TFRecord framing: length u64, its masked CRC32C, the Event
  proto, its masked CRC32C), one Event of scalars per record, named as tensorboardX names
  them (events.out.tfevents.TIME.HOST)."""

  @classmethod
  def create(cls, logdir: str) -> _EventFile:
    protos = _tensorboard_protos()  # ImportError without tensorboardX
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    for i in itertools.count():
      try:  # never appends to (or truncates) another writer's file of the same second
        events = cls(base if i == 0 else f"{base}.{i}", os.O_CREAT | os.O_EXCL)
        break
      except FileExistsError:
        continue
    events._protos = protos
    try:
      events.append(events._record(protos.Event(wall_time=time.time(),
                                                file_version="brain.Event:2")))
    except OSError:
      events.close_quietly()
      raise
    return events

  def scalars(self, step: int, values: dict) -> bytes:
    """The framed Event of `values` ({tag: number}) at `step` (b"" for none)."""
    if not values:
      return b""
    p = self._protos
    summary = p.Summary(value=[p.Summary.Value(tag=tag, simple_value=float(v))
                               for tag, v in values.items()])
    return self._record(p.Event(wall_time=time.time(), step=int(step), summary=summary))

  def _record(self, event) -> bytes:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    crc = self._protos.masked_crc32c
    return header + struct.pack("<I", crc(header)) + data + struct.pack("<I", crc(data))


def _tensorboard_protos():
  """tensorboardX's Event and Summary protos and masked CRC32C, imported without
  importing PyTorch.

  tensorboardX imports torch whenever it is installed (only to accept torch tensors, which
  we never pass). That costs ~1.8 s at every start and loads PyTorch's own thread pools
  into a JAX process, so torch is hidden while tensorboardX loads unless the process
  already imported it."""
  hide_torch = "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.record_writer import masked_crc32c
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return types.SimpleNamespace(Event=Event, Summary=Summary, masked_crc32c=masked_crc32c)


def _to_python(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def read_metrics(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl (a list of dicts; [] without a file). A last
  line that a crash cut short is left out; a bad line before it is a `UserError`."""
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    with open(path, "rb") as f:
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return []
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    record = _parse(line)
    if record is None:
      if number == len(lines):  # the last line, with no newline: a write cut short
        continue
      raise UserError(f"{path} line {number} is not a JSON record: delete or fix that line")
    records.append(record)
  return records


def plot_curves(workdir: str, keys=("loss",), filename: str = "loss.png") -> str | None:
  """Plots each key per split against step into workdir/plots/filename."""
  records = read_metrics(workdir)
  if not records:
    return None
  # A Figure of its own, not pyplot: the host's matplotlib backend and figures stay as
  # they are.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5 * len(keys), 3.5))
  axes = fig.subplots(1, len(keys), squeeze=False)
  for ax, key in zip(axes[0], keys, strict=True):
    by_split: dict[str, dict[int, float]] = {}
    for r in records:  # a resumed run may log a step twice: the later record wins
      metric = key if key in r else f"{r['split']}_{key}"
      if metric in r:
        by_split.setdefault(r["split"], {})[r["step"]] = r[metric]
    for split, points in sorted(by_split.items()):
      steps = sorted(points)
      ax.plot(steps, [points[s] for s in steps], marker="o" if split != "train" else None,
              label=split)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if key.startswith("fid") and by_split:
      ax.set_yscale("log")  # FID falls over orders of magnitude
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  out = os.path.join(workdir, "plots", filename)
  try:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with replaced_atomically(out) as tmp:  # readers never see half a picture
      fig.savefig(tmp, dpi=100, format="png")
  except OSError as e:  # replaced_atomically removed its temporary file
    raise UserError(f"cannot write the plot {out} ({e.strerror or e}): free disk space or "
                    "fix the permissions of that path") from e
  return out
