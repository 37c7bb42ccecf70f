"""Files a run owns are written whole or not at all: into a temporary sibling, synced,
then renamed over the target in one step, so a reader (or a crash) never sees half a
file."""

from __future__ import annotations

import contextlib
import os


def fsync_path(path: str) -> None:
  """Flushes a file, or a folder's entries, to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def replaced_atomically(path: str, suffix: str = ""):
  """Yields a temporary name beside `path` to write (ending in `suffix`, e.g. '.png' for
  writers that pick the format from the name). When the block ends the file is synced
  and replaces `path`; if it raises, the temporary file is removed and the error passes."""
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp{suffix}")
  try:
    yield tmp
    fsync_path(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> str:
  """`text` (UTF-8) to `path`, atomically; returns `path`."""
  with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  return path
