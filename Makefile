# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel must be installed before anything that depends on torch, or pip pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-loaders gpu-wheels gpu-check gpu-check-dry-run clean

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
# its figures in $(GPU_REPORT)/report.md. It runs there with the machine's own python3 and CUDA torch, and daskgan
# from this tree. A GPU machine that reaches no registry gets daskgan's other requirements as wheels brought along
# in $(GPU_WHEELS) (`make gpu-wheels` here first); one that reaches the registry installs the test extras from it.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_REPORT ?= gpu-report
GPU_WHEELS := .gpu-check/wheels
GPU_SITE := .gpu-check/site
# e.g. GPU_CHECK_OPTIONS="--budget-s 300", or "--only loader-step,cuda-tests" for a second try
GPU_CHECK_OPTIONS ?=

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(GPU_WHEELS) -r benchmarks/gpu-check-wheels.txt

gpu-check:
	if [ -d $(GPU_WHEELS) ]; then \
	  $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; \
	else $(GPU_PYTHON) -m pip install -q -e ".[test]"; fi
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(GPU_SITE) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_REPORT) $(GPU_CHECK_OPTIONS)

# the same steps on this machine's CPU with tiny sizes: a slip in the script shows here, not on the GPU's clock
gpu-check-dry-run: $(BIN)/.installed
	$(BIN)/python benchmarks/gpu_check.py $(GPU_REPORT) --cpu-dry-run $(GPU_CHECK_OPTIONS)

clean:
	rm -rf $(VENV) demo-output gpu-report .gpu-check/site
