# The two commands of the README: `make demo` and `make test`. Each sets itself up
# (a .venv with the package and its dev extras) and is fast when already set up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-8dev bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install -y python3-venv"; exit 1; }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root; without it:
# apt-get download dataset-fashion-mnist && dpkg-deb -x *.deb DIR, then set
# AIGC_JAX_FASHION_MNIST=DIR/usr/share/datasets/fashion-mnist).
data:
	@test -f $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: setup
	$(BIN)/aigc-jax train --config configs/lm_code.py --workdir $(DEMO_DIR)/lm
	$(BIN)/aigc-jax sample --workdir $(DEMO_DIR)/lm --num 3 --max-new-tokens 120 \
	  --prompt "def " --prompt "class " > $(DEMO_DIR)/lm/samples/final.txt
	$(BIN)/aigc-jax eval --workdir $(DEMO_DIR)/lm > $(DEMO_DIR)/lm/eval.json
	@echo
	@echo "LM demo finished. Results in $(DEMO_DIR)/lm:"
	@echo "  evaluation     $(DEMO_DIR)/lm/eval.json: $$(cat $(DEMO_DIR)/lm/eval.json)"
	@echo "  code samples   $(DEMO_DIR)/lm/samples/final.txt (and one file per evaluation)"
	@echo "  loss curves    $(DEMO_DIR)/lm/plots/loss.png"
	@echo "  metrics        $(DEMO_DIR)/lm/metrics.jsonl, TensorBoard: $(DEMO_DIR)/lm/tensorboard"
	@echo "  checkpoints    $(DEMO_DIR)/lm/checkpoints"
	@echo "--- first sample ---"
	@sed -n '1,25p' $(DEMO_DIR)/lm/samples/final.txt

test: setup
	$(BIN)/python -m pytest -q

# The same suite with 8 fake CPU devices, so sharded code paths run (CI runs both).
test-8dev: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.lm_step

lint: setup
	$(BIN)/ruff check aigc_jax benchmarks tests configs

clean:
	rm -rf $(VENV) runs .pytest_cache
