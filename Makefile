# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, a CPU build: PyPI's torch for Linux is the multi-GB CUDA build, and anything that depends on
# torch would pull it. TORCH_SPEC comes from a wheel in pip's find-links where one is there (this machine's
# /opt/wheels holds torch 2.13.0+cpu), else from TORCH_INDEX, PyTorch's CPU index. For CUDA:
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 (the cuXXX your driver supports).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The second test environment: every dependency at the floor pyproject.toml gives (.ci/floors.py), torch as above.
LOWEST := .venv-lowest
# Its representative part of the suite: storage (s3fs, botocore), datasets and decoding (Pillow, pyspng,
# simplejpeg), records (pandas, pyarrow), job files (PyYAML), cluster specs (dask-kubernetes, dask-cloudprovider)
# and training on a local Dask cluster (dask, distributed, TensorBoard, matplotlib's summary) through the CLI.
LOWEST_TESTS ?= tests/test_dependencies.py tests/test_storage.py tests/test_data.py tests/test_shards.py \
	tests/test_archive.py tests/test_results.py tests/test_config.py tests/test_cluster.py tests/test_training.py \
	tests/test_cli.py

# The browser test (tests/test_dashboard.py) drives Debian's headless Chromium through Debian's chromedriver:
# installed by apt-get where either program is missing (root, or APT="sudo apt-get"), never downloaded at run time.
BROWSER ?= /usr/bin/chromium /usr/bin/chromedriver
APT ?= apt-get

.PHONY: demo test test-newest test-lowest bench bench-loaders gpu-wheels gpu-check gpu-check-dry-run clean

# The local wheel alone first (its dependencies are on PyPI, not beside it); then torch's dependencies, pip keeping
# the installed build since it meets TORCH_SPEC. $(1): the venv's bin.
define install_torch
	($(1)/pip install -q --no-deps --no-index "$(TORCH_SPEC)" && $(1)/pip install -q "$(TORCH_SPEC)") || \
	$(1)/pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"
endef

# daskgan with its extras, then the test tools. moto and the tests' setup need boto3: the release of the botocore
# that s3fs's aiobotocore took (boto3 and botocore share version numbers), else pip walks back through boto3's
# near-daily releases one by one to the one that fits, for minutes. $(1): the venv's bin, $(2): pip options.
define install_project
	$(1)/pip install -q $(2) -e ".[k8s,cloud,fast-decode]"
	$(1)/pip install -q $(2) -e ".[test]" "boto3==$$($(1)/python -c 'import botocore; print(botocore.__version__)')"
endef

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(call install_torch,$(BIN))
	$(call install_project,$(BIN))
	touch $@

$(LOWEST)/bin/.installed: pyproject.toml .ci/floors.py $(BIN)/.installed
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(call install_torch,$(LOWEST)/bin)
	$(BIN)/python .ci/floors.py --extras k8s,cloud,fast-decode,demo > $(LOWEST)/floors.txt
	$(call install_project,$(LOWEST)/bin,-c $(LOWEST)/floors.txt)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/daskgan train jobs/demo.yaml

# CI runs `make test`: the whole suite on the newest versions pip finds, then a part of it on the lowest allowed.
test: test-newest test-lowest

$(BROWSER) &:
	$(APT) update -q
	$(APT) install -y -q --no-install-recommends chromium chromium-driver

test-newest: $(BIN)/.installed $(BROWSER)
	$(BIN)/python -m pytest -q -ra

test-lowest: $(LOWEST)/bin/.installed
	$(LOWEST)/bin/python -m pytest -q -ra $(LOWEST_TESTS)

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
	rm -rf $(VENV) $(LOWEST) demo-output gpu-report .gpu-check/site
