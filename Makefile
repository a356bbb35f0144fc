# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel must be installed before anything that depends on torch, or pip pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-loaders gpu-check gpu-check-dry-run clean

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

# GPU checks (README "GPU checks"): one command on a machine with a GPU, everything ../shared/gpu-checklist.md asks,
# its figures in $(GPU_REPORT)/report.md. The venv sees the machine's own CUDA torch (system site packages) or gets
# the registry's (a CUDA build there); ninja and setuptools (NVlabs' custom ops and distutils) are optional, tried
# once without waiting.
GPU_VENV := .venv-gpu
GPU_REPORT ?= gpu-report
# e.g. GPU_CHECK_OPTIONS="--budget-s 300", or "--only loader-step,cuda-tests" for a second try
GPU_CHECK_OPTIONS ?=

$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -c "import torch" 2>/dev/null || $(GPU_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(GPU_VENV)/bin/pip install -q -e ".[test]"
	-$(GPU_VENV)/bin/pip install -q --timeout 10 --retries 0 ninja setuptools
	touch $@

gpu-check: $(GPU_VENV)/.installed
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py $(GPU_REPORT) $(GPU_CHECK_OPTIONS)

# the same steps on this machine's CPU with tiny sizes: a slip in the script shows here, not on the GPU's clock
gpu-check-dry-run: $(BIN)/.installed
	$(BIN)/python benchmarks/gpu_check.py $(GPU_REPORT) --cpu-dry-run $(GPU_CHECK_OPTIONS)

clean:
	rm -rf $(VENV) $(GPU_VENV) demo-output gpu-report
