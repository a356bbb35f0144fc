# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel must be installed before anything that depends on torch, or pip pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-loaders clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/daskgan train jobs/demo.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -ra

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/loader_step.py
	$(BIN)/python benchmarks/throttle.py
	$(BIN)/python benchmarks/preemption.py

# loaders side by side with WebDataset and Mosaic Streaming, installed beside the CPU torch without their torch pins
bench-loaders: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/pip install -q --no-deps "mosaicml-streaming==0.13.0"
	$(BIN)/python benchmarks/loaders.py

clean:
	rm -rf $(VENV) demo-output
