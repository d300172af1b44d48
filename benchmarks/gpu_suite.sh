#!/usr/bin/env bash
# ONE call on a lent GPU: build the extension, run the test suite on CUDA, run the kernel and end-to-end
# benchmarks, write everything under $OUT, print a summary table last. Expected ~7 minutes on an H200 (call it
# with timeout_s 480, which leaves a rerun of a failed step inside 15 minutes); each step has its own limit, and
# $OUT/steps.md grows as steps end. Steps run most important first: the kernels' GPU tests, then bench lora.
#
#   bash benchmarks/gpu_suite.sh            # on the device (OUT is set there)
#   bash benchmarks/gpu_suite.sh --dry-run  # anywhere: CUDA steps skipped with a message, the rest run small
#   OUT=/tmp/gs PACK=$OUT/suite.tgz bash benchmarks/gpu_suite.sh  # logs in /tmp/gs, one archive back
#   SKIP="tests_cuda bench_logprob" bash benchmarks/gpu_suite.sh  # leave steps out (a rerun)
#
# On the device image (torch 2.11+cu130, triton 3.6, nvcc 13.0, transformers, peft; no internet) nothing
# is downloaded: the package is built in place against the image's torch. liger_kernel, if carried as a
# wheel in .whl/ (`make gpu-wheels` puts it there; pass carry=[".whl"]), adds the Liger column to the
# fused-loss benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
HAVE_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[[ $DRY == 1 ]] && HAVE_CUDA=0
STEPS="$OUT/steps.md"  # one line per step as it ends: a run killed at its limit still says how far it got
: >"$STEPS"

run() {  # run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, record status and time (also from a subshell)
  local name=$1 limit=$2
  shift 2
  [[ " ${SKIP:-} " == *" $name "* ]] && { skip "$name" "in SKIP"; return 0; }
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [[ $rc != 0 ]] && status="FAILED (rc=$rc)"
  [[ $rc == 124 ]] && status="TIMEOUT after ${limit}s"
  echo "| $name | $status | $((SECONDS - t0)) s | $name.log |" >>"$STEPS"
  tail -n 4 "$OUT/$name.log"
  pack
}

pack() {  # PACK=FILE.tgz: everything so far in one archive, replaced atomically (the device returns 8 files)
  [[ -z "${PACK:-}" ]] && return 0
  tar czf "$PACK.$BASHPID" -C "$OUT" . && mv "$PACK.$BASHPID" "$PACK"
}

skip() { echo "| $1 | skipped: $2 | 0 s | |" >>"$STEPS"; echo "== $1: skipped ($2)"; }

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  run wheels 120 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [[ $HAVE_CUDA == 1 ]]; then
  # this run imports the package from the tree (PYTHONPATH): lune_fast/kernels/__init__.py points at kernels/
  # no network there: the embedded model cannot be fetched, so tests that need it skip, saying so
  export LUNE_FAST_NO_INSTALL=1 MAX_JOBS=${MAX_JOBS:-16}
  # The H200 image's CXX (/opt/gcc) links libstdc++ statically: an extension built with it crashes the process
  # (SIGSEGV) on the first C++ exception, e.g. a bad-input TORCH_CHECK. The system compiler's build raises.
  [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
    >"$OUT/gpu.txt" 2>&1
  { echo "nvcc: $(command -v nvcc) $(nvcc --version 2>/dev/null | tail -1)"; $PY -c \
    "import torch, triton; from torch.utils import cpp_extension as c; print('torch', torch.__version__, \
'triton', triton.__version__, 'CUDA_HOME', c.CUDA_HOME)"; } >>"$OUT/gpu.txt" 2>&1
  XDIST=""
  $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
  # the extension compiles (nvcc, 16 jobs) while the Triton kernels, which do not need it, are tested
  run build 240 $PY setup.py build_ext --inplace &
  BUILD=$!
  run tests_kernels 180 $PY -m pytest -q $XDIST tests/test_lora_kernels.py tests/test_tma_gemm.py -p no:cacheprovider
  wait $BUILD
  $PY -c "import torch, lune_fast._C as C; print('with_cuda', C.with_cuda)" 2>&1 | tee "$OUT/build_check.txt"
  run tests_cuda 120 $PY -m pytest -q $XDIST tests/test_linear_logprob.py tests/test_losses.py tests/test_model.py \
      tests/test_lora.py -p no:cacheprovider
  # the LoRA layer step at the issue's shapes: per projection, the per-launch split, the plain TMA GEMM against
  # cuBLAS, and grouped q+k+v / gate+up (the first call at each shape autotunes: ~1 min of compiling in all)
  run bench_lora 240 $PY -m lune_fast.cli bench lora --shapes llama-3-8b --n 2048,8192 --r 16,64 \
      --repeats 10 --json "$OUT/lora_8b.json"
  run bench_e2e_gpu 200 $PY -m lune_fast.cli bench e2e-gpu --shapes llama-3-8b,llama-3.2-1b --tokens 8192 \
      --steps 4 --objective npo --json "$OUT/e2e_gpu.json"
  run bench_logprob 60 $PY -m lune_fast.cli bench logprob --hidden 4096 --vocab 128256 --n 2048,8192 \
      --dtype bfloat16 --repeats 5 --json "$OUT/logprob.json"
else
  why="no CUDA device (dry run)"
  [[ $DRY == 0 ]] && why="no CUDA device on this machine"
  for s in build tests_cuda bench_e2e_gpu; do skip $s "$why"; done
  # everything that does not need a GPU still runs, small, so the script cannot rot
  run bench_lora_cpu 120 $PY -m lune_fast.cli bench lora --shapes default --n 64 --r 16 --repeats 2 \
      --json "$OUT/lora_cpu.json"
  run bench_logprob_cpu 120 $PY -m lune_fast.cli bench logprob --hidden 64 --vocab 1024 --n 256 --dtype float32 \
      --repeats 2 --json "$OUT/logprob_cpu.json"
  run bench_e2e_gpu_stub 60 $PY -m lune_fast.cli bench e2e-gpu --json "$OUT/e2e_gpu.json"
fi

{
  echo "# gpu_suite $(date -u +%FT%TZ) on $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")' 2>/dev/null)"
  echo
  echo "| step | status | time | log |"
  echo "|---|---|---|---|"
  cat "$STEPS"
} | tee "$OUT/summary.md"
pack
grep -q "FAILED\|TIMEOUT" "$OUT/summary.md" && exit 1
exit 0
