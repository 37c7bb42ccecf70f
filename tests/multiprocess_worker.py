"""One process of a two-process CPU run (`tests/test_multiprocess.py`): 4 fake CPU devices
each, joined by `jax.distributed` over localhost, training the tiny LM with FSDP over all
8 devices. Records the rows of every batch this process built.

  python -m tests.multiprocess_worker PROCESS_ID PORT WORKDIR OUT_DIR JSON_OVERRIDES
"""

import json
import os
import sys

process_id, port, workdir, out_dir, overrides = sys.argv[1:6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))

from aigc_jax.config import config_from_file  # noqa: E402
from aigc_jax.data.batching import TokenWindows  # noqa: E402
from aigc_jax.train.loop import train_and_evaluate  # noqa: E402

built = []
original_batch = TokenWindows.batch


def recording_batch(self, index):
  batch = original_batch(self, index)
  built.append({"index": index, "rows": [self.rows.start, self.rows.stop],
                "inputs": batch["inputs"].tolist()})
  return batch


TokenWindows.batch = recording_batch
config = config_from_file("configs/lm_tiny.py", json.loads(overrides))
summary = train_and_evaluate(config, workdir, progress=False)
with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
  json.dump({"summary": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
             "batches": built, "local_devices": jax.local_device_count(),
             "process_count": jax.process_count()}, f)
jax.distributed.shutdown()
