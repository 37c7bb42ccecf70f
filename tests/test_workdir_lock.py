"""One training run per workdir: a second `train` on a busy workdir is one clear error and
changes nothing of the first run's files; the lock of a run killed with SIGKILL is recovered
by the next run, which resumes; the lock class itself (holder named, released on close,
filesystems without flock)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from aigc_jax.errors import UserError
from aigc_jax.train import Checkpointer, workdir_lock
from aigc_jax.train.workdir_lock import WorkdirLock
from tests.conftest import ROOT, TINY_CONFIG, run_cli

ARGS = ["--config.sample.num=0", "--config.train.eval_every=100000",
        "--config.train.log_every=1", "--config.train.checkpoint_every=5"]


def _holder(workdir) -> dict | None:
  try:
    with open(os.path.join(workdir, ".lock")) as f:
      return json.loads(f.read())
  except (OSError, ValueError):
    return None


def _wait_for(condition, proc, seconds: float, what: str):
  deadline = time.time() + seconds
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f"the first run ended before {what}: {proc.communicate()[1][-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def test_second_train_on_a_busy_workdir_fails_and_a_killed_runs_lock_is_recovered(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  first = subprocess.Popen(
      [sys.executable, "-m", "aigc_jax.cli", "train", "--config", TINY_CONFIG, "--workdir",
       workdir, "--config.train.steps=100000", *ARGS],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: (_holder(workdir) or {}).get("pid") == first.pid, first, 120,
              "it held the lock")
    holder = _holder(workdir)
    assert holder["host"] == socket.gethostname()
    checkpoints = os.path.join(workdir, "checkpoints")
    metrics = os.path.join(workdir, "metrics.jsonl")
    # Training is underway: a checkpoint written and metrics logged.
    _wait_for(lambda: (Checkpointer(checkpoints).latest_step() or 0) >= 5
              and os.path.exists(metrics), first, 120, "its first checkpoint")
    with open(os.path.join(workdir, "config.json")) as f:
      config_before = f.read()

    # Different settings: had it run, its config and metrics would be told apart.
    t0 = time.time()
    second = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                     "--config.train.steps=7", "--config.optim.lr=1e-4", *ARGS, timeout=120)
    took = time.time() - t0
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr[-3000:]
    assert f"pid {first.pid} on {socket.gethostname()}, since {holder['since']}" in lines[0]
    assert "wait for it, stop it, or use another --workdir" in lines[0]
    assert first.poll() is None, "the first run stopped"
    with open(os.path.join(workdir, "config.json")) as f:
      assert f.read() == config_before
    assert json.loads(config_before)["optim"]["lr"] != 1e-4

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  # The first run's metrics alone: one row per step, steps in order (no second writer).
  with open(metrics) as f:  # without a last line cut short by SIGKILL
    rows = [json.loads(line) for line in f.read().split("\n")[:-1]]
  steps = [r["step"] for r in rows if r.get("split", "train") == "train"]
  assert steps and steps == list(range(1, len(steps) + 1)), steps[:50]
  assert _holder(workdir)["pid"] == first.pid  # the dead run's lock file is still there

  killed_at = Checkpointer(checkpoints).latest_step()
  assert killed_at is not None and killed_at >= 5
  third = run_cli("train", "--config", TINY_CONFIG, "--workdir", workdir,
                  f"--config.train.steps={killed_at + 2}", *ARGS, timeout=180)
  assert third.returncode == 0, third.stderr[-3000:]
  summary = json.loads(third.stdout)
  assert summary["start_step"] == killed_at and summary["steps"] == killed_at + 2
  assert Checkpointer(checkpoints).latest_step() == killed_at + 2
  print(f"second run refused in {took:.1f} s")


def test_lock_excludes_a_second_holder_names_it_and_is_released_on_close(tmp_path):
  workdir = str(tmp_path / "new" / "run")  # created by the lock
  first = WorkdirLock(workdir).acquire()
  assert first.locked and os.path.isdir(workdir)
  second = WorkdirLock(workdir)
  with pytest.raises(UserError) as e:
    second.acquire()
  message = str(e.value)
  assert f"pid {os.getpid()} on {socket.gethostname()}, since " in message
  assert workdir in message and "wait for it, stop it, or use another --workdir" in message
  assert not second.locked
  first.close()
  assert not first.locked and _holder(workdir) is None  # holder details cleared
  with WorkdirLock(workdir) as third:  # free again
    assert third.locked and _holder(workdir)["pid"] == os.getpid()
    with pytest.raises(UserError):
      WorkdirLock(workdir).acquire()
  WorkdirLock(workdir).acquire().release()


def test_stale_lock_file_of_a_dead_process_is_recovered(tmp_path):
  workdir = str(tmp_path)
  code = ("import sys, os; from aigc_jax.train.workdir_lock import WorkdirLock; "
          "WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)")
  proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert _holder(workdir)["pid"] == proc.pid != os.getpid()
  with WorkdirLock(workdir) as lock:
    assert lock.locked and _holder(workdir)["pid"] == os.getpid()


def test_unwritable_workdir_is_a_user_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(UserError, match="is not writable .*choose another --workdir"):
    WorkdirLock(str(blocker / "run")).acquire()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_filesystem_without_flock_runs_unlocked_with_one_warning(tmp_path, monkeypatch,
                                                                  capsys, code):
  def no_flock(fd, op):
    raise OSError(code, os.strerror(code))
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  with WorkdirLock(str(tmp_path)) as lock:
    assert not lock.locked
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("warning: ") and "without a workdir lock" in err


def test_only_process_zero_takes_the_training_lock(tmp_path, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with WorkdirLock(str(tmp_path)):
    with workdir_lock.training_lock(str(tmp_path)):  # process 1 shares the workdir
      pass
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(UserError, match="in use by another training run"):
      with workdir_lock.training_lock(str(tmp_path)):
        pass
