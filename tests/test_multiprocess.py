"""Two processes x 4 CPU devices, FSDP over all 8: the same training as one process with 8
devices, each process building only its own rows of every batch."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from aigc_jax.config import config_from_file
from aigc_jax.data.batching import TokenWindows
from aigc_jax.train.loop import open_run, train_and_evaluate
from tests.conftest import ROOT, TINY_CONFIG

OVERRIDES = {"model.vocab_size": 264, "train.batch_size": 8, "train.steps": 4,
             "train.eval_every": 4, "train.checkpoint_every": 4, "train.log_every": 2,
             "mesh.data": 1, "mesh.fsdp": 8, "optim.eps": 1e-6}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() < 8,
                    reason="needs 8 devices for the one-process reference: `make test-8dev`")
@pytest.mark.sharded
def test_two_processes_train_like_one_and_build_only_their_rows(tmp_path):
  port, out = _free_port(), tmp_path / "out"
  out.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(ROOT)
  args = lambda i: [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port),
                    str(tmp_path / "two"), str(out), json.dumps(OVERRIDES)]
  procs = [subprocess.Popen(args(i), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=420)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]

  # The one-process reference, and the two-process run's checkpoint restored here.
  config = config_from_file(TINY_CONFIG, OVERRIDES)
  reference = train_and_evaluate(config, str(tmp_path / "one"), progress=False)
  one = open_run(config, str(tmp_path / "one"), for_training=False).state.params
  two = open_run(config, str(tmp_path / "two"), for_training=False).state.params
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
  records = [json.load(open(out / f"process_{i}.json")) for i in range(2)]
  assert records[0]["summary"]["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-5)

  # Each process built its half of every batch: rows [0, 4) and [4, 8) of the global one.
  windows = config_from_file(TINY_CONFIG, OVERRIDES)
  source = open_run(windows, str(tmp_path / "rows"), for_training=True).family.train_data
  assert isinstance(source, TokenWindows)
  for i, record in enumerate(records):
    assert record["process_count"] == 2 and record["local_devices"] == 4
    assert record["batches"], "no batches recorded"
    for built in record["batches"]:
      assert built["rows"] == [4 * i, 4 * i + 4]
      whole = source.batch(built["index"])["inputs"]
      np.testing.assert_array_equal(np.asarray(built["inputs"]), whole[4 * i:4 * i + 4])
