#!/usr/bin/env bash
# The GPU check: everything GPU-side of specrt in one command, run from the repo root on the GPU
# machine (one H200: torch 2.11+cu130, nvcc, cmake, ninja, pytest(-timeout), compute-sanitizer;
# nothing installable). Each stage is time-boxed and the script goes on when one fails; every
# log lands in OUT, with a summary and one tarball to bring back.
#
#   scripts/gpu_check.sh [--dry-run] [--stages a,b,...] [OUT]
#
# OUT defaults to $SPECRT_GPU_OUT, else $OUT (the device tool's output folder), else
# ./gpu_check_out. Stages, in order (default: all):
#   env        nvidia-smi, nvcc, torch, compute-sanitizer versions
#   wheels     install carried wheels (.gpu_carry/wheels/*.whl, see scripts/gpu_prepare.sh)
#              into .gpu_carry/site, put on PYTHONPATH
#   build      pip install --no-build-isolation --no-deps -e . (CUDA build, sm_90a), timed
#   tests      pytest -m gpu, 120 s per test: the kernels, models, engine, and the SIMT
#              emulation's agreement with the hardware (tests/test_simt_gpu_agreement.py)
#   sanitize   compute-sanitizer memcheck and racecheck on one case of every kernel
#              (scripts/gpu_sanitize_cases.py)
#   roofline   bench/roofline.py --quick, every kernel with its peers
#   e2e        bench/e2e.py on CUDA: synthetic 8B-geometry verify cost; SmolLM2 if carried
# The time limits add up to more than one device call allows (10 minutes): with a cold machine
# run two calls back to back, the second while the first one's build is still there:
#   scripts/gpu_check.sh --stages env,wheels,build,tests     (about 9 minutes at the limits)
#   scripts/gpu_check.sh --stages build,sanitize,roofline,e2e (the build is then a no-op)
# --dry-run (on any machine): checks that every stage can start (files, imports, --help of
# each tool, collection of the GPU tests), prints the commands and the carry size, runs nothing
# on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STAGES="env,wheels,build,tests,sanitize,roofline,e2e"
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    -h|--help) sed -n 2,26p "$0"; exit 0 ;;
    *) break ;;
  esac
done
OUT=${1:-${SPECRT_GPU_OUT:-${OUT:-gpu_check_out}}}
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
CARRY=${SPECRT_GPU_CARRY:-.gpu_carry}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export SPECRT_CUDA_ARCHS=${SPECRT_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/flashinfer}
if [ -d "$CARRY/site" ]; then export PYTHONPATH="$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"; fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# stage NAME SECONDS COMMAND [DRY_COMMAND]: runs COMMAND under a time limit, logs to
# OUT/NAME.log, records rc and seconds; in a dry run runs DRY_COMMAND (a cheap check) instead.
stage() {
  local name=$1 limit=$2 cmd=$3 dry=${4:-true}
  want "$name" || return 0
  local t=$(date +%s) rc
  if [ "$DRY" = 1 ]; then
    echo "[$name] would run (limit ${limit}s): $cmd"
    bash -c "$dry" > "$OUT/$name.dry.log" 2>&1
    rc=$?
    echo "$name dry-check rc=$rc" | tee -a "$SUMMARY"
    [ "$rc" = 0 ] || tail -5 "$OUT/$name.dry.log"
    return 0
  fi
  echo "[$name] $cmd" | tee "$OUT/$name.log"
  timeout --kill-after=15 "$limit" bash -c "$cmd" >> "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "[$name] TIMED OUT after ${limit}s" >> "$OUT/$name.log"
  echo "$name rc=$rc $(( $(date +%s) - t ))s (t=$(( $(date +%s) - T0 ))s)" | tee -a "$SUMMARY"
}

stage env 60 \
  "nvidia-smi; nvcc --version; compute-sanitizer --version; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'; cmake --version | head -1; ninja --version; nproc; free -g" \
  "command -v $PY && $PY -c 'import torch' && command -v cmake && command -v ninja"

stage wheels 120 \
  "ls $CARRY/wheels/*.whl && $PY -m pip install --no-index --no-deps --target $CARRY/site $CARRY/wheels/*.whl" \
  "ls $CARRY/wheels/*.whl 2>/dev/null || echo 'no carried wheels (scripts/gpu_prepare.sh): FlashInfer peers, gguf and HumanEval prompts will be skipped'"

stage build 300 \
  "time $PY -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E 'ptxas|error|warning: Registers|Successfully|real' ; $PY -c 'import specrt._C as C; print(\"WITH_CUDA\", C.WITH_CUDA)'" \
  "test -f setup.py && test -f CMakeLists.txt && $PY -c 'import setuptools, pybind11'"

stage tests 330 \
  "$PY -m pytest -m gpu -q -p no:cacheprovider --timeout=120 -rfE --junitxml=$OUT/gpu_tests.xml tests" \
  "$PY -m pytest -m gpu -q -p no:cacheprovider --collect-only tests | tail -3"

stage sanitize 240 \
  "compute-sanitizer --tool memcheck --leak-check no --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py && compute-sanitizer --tool racecheck --error-exitcode 9 $PY scripts/gpu_sanitize_cases.py --small" \
  "$PY scripts/gpu_sanitize_cases.py --help"

stage roofline 240 \
  "$PY bench/roofline.py --device cuda --quick --kernel all --allow-dirty --out $OUT/results" \
  "$PY bench/roofline.py --help > /dev/null"

E2E_REAL=""
if [ -f "$CARRY/models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  E2E_REAL="; $PY bench/e2e.py --device cuda --dtype bfloat16 --model $CARRY/models/SmolLM2-135M-Instruct.Q4_1.gguf --proposers none,ngram --prompt-sets humaneval --temperatures 0 --hf --allow-dirty --out $OUT/results"
fi
stage e2e 240 \
  "$PY bench/e2e.py --device cuda --dtype bfloat16 --synthetic --proposers none --allow-dirty --out $OUT/results$E2E_REAL" \
  "$PY bench/e2e.py --help > /dev/null"

if [ "$DRY" = 1 ]; then
  carry=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  extra=$(du -sb "$CARRY" 2>/dev/null | cut -f1)
  echo "carry: working tree ${carry:-0} B + $CARRY ${extra:-0} B (limit 64 MiB = 67108864 B)" | tee -a "$SUMMARY"
  [ $(( ${carry:-0} + ${extra:-0} )) -lt 67108864 ] || echo "carry over the limit: split it (scripts/gpu_prepare.sh)" | tee -a "$SUMMARY"
fi

# Bundle what comes back (at most 8 files of 16 MiB): logs, results, summary.
tar czf "$OUT/gpu_check_bundle.tgz" -C "$OUT" --exclude=gpu_check_bundle.tgz . 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s; bundle: $OUT/gpu_check_bundle.tgz" | tee -a "$SUMMARY"
