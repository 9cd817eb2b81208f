# lfi_fast: the two commands a new machine needs are `make demo` and `make test`.
#
#   make demo          set up, build, and run the demo (DATA=digits by default)
#   make test          set up a venv (torch 2.13 CPU wheel), build, run the whole test suite
#   make check-cuda    compile and link the CUDA kernels against torch 2.14.1 (CUDA 13), import the .so
#   make bench         run the benchmark suite on this machine: CSV of record, plots, BENCHMARKS.md
#   make check-install build an sdist, a wheel from it, and check the installed wheel works
#   make clean
#
# Variables: PYTHON (interpreter for the venvs), VENV (default .venv), DATA, JOBS.

PYTHON     ?= python3
VENV       ?= .venv
VENV_CUDA  ?= .venv-cuda
DATA       ?= digits
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
PYTEST_ARGS ?=

TORCH_CPU       := torch==2.13.0
TORCH_CUDA      := torch==2.14.1
TRITON          := triton==3.6.0
# Build tools and what tests, benchmarks and the demo use. torch is installed first, pinned, so
# that nothing below pulls in a multi-GB CUDA build.
BUILD_DEPS      := setuptools wheel build cmake ninja numpy
TEST_DEPS       := pytest pytest-benchmark hypothesis geoopt safetensors scikit-learn matplotlib tqdm faiss-cpu vector-quantize-pytorch

SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: demo test check-cuda check-install bench wheel install venv clean help
help:
	@sed -n '1,12p' Makefile

# ---- environment ---------------------------------------------------------------------------------
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q $(TRITON) $(BUILD_DEPS) $(TEST_DEPS)
	touch $@

venv: $(VENV)/.deps

# Editable install; the CMake build folder (build/setup-*) is kept, so rebuilds are incremental.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

# ---- the two front-door commands -----------------------------------------------------------------
demo: install
	$(PY) -m lfi_fast.cli demo --data $(DATA)

# pytest exits 5 when it collected no test: make treats that, like any non-zero code, as failure.
test: install
	$(PY) -m lfi_fast.cli info
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks --benchmark-disable --quick -q -p no:cacheprovider

# ---- CUDA compile check (no GPU needed) ----------------------------------------------------------
$(VENV_CUDA)/.deps: Makefile
	$(PYTHON) -m venv $(VENV_CUDA)
	$(VENV_CUDA)/bin/python -m pip install -q --upgrade pip
	$(VENV_CUDA)/bin/python -m pip install -q $(TORCH_CUDA) $(BUILD_DEPS)
	touch $@

check-cuda: $(VENV_CUDA)/.deps
	PATH="$(CUDA_HOME_DIR)/bin:$$PATH" CUDA_HOME=$(CUDA_HOME_DIR) LFI_FAST_CUDA=1 \
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(VENV_CUDA)/bin/python .ci/check_cuda_build.py \
	    --build-dir build/check-cuda --jobs $(JOBS)

CUDA_HOME_DIR ?= $(or $(CUDA_HOME),/usr/local/cuda)
CUDA_ARCHS    ?= 8.0;9.0a

# ---- the rest ------------------------------------------------------------------------------------
# Appends to benchmarks/results/results.csv, redraws the plots, regenerates BENCHMARKS.md.
bench: install
	$(PY) -m lfi_fast.cli bench $(BENCH_ARGS)

# A wheel built from the sdist, installed outside the source tree, must work like the editable
# install: compiled ops, Triton kernels (lfi_fast._kernels) and all.
wheel: $(VENV)/.deps
	rm -rf dist
	$(PY) -m build --sdist --no-isolation --outdir dist .
	MAX_JOBS=$(JOBS) $(PIP) wheel -q --no-build-isolation --no-deps -w dist dist/lfi_fast-*.tar.gz

check-install: wheel
	rm -rf build/check-install && $(PIP) install -q --no-deps --target build/check-install dist/lfi_fast-*.whl
	cd /tmp && PYTHONPATH=$(CURDIR)/build/check-install TRITON_INTERPRET=1 $(CURDIR)/$(PY) \
	    $(CURDIR)/.ci/check_install.py $(CURDIR)/build/check-install

clean:
	rm -rf build dist *.egg-info lfi_fast/_C*.so .pytest_cache .benchmarks .hypothesis
