#!/usr/bin/env bash
# Install specrt with its test dependencies (CPU torch from the local wheel) and run the tests:
# every CPU test, then the CUDA kernels' own source on the CPU through the SIMT emulation
# (`pytest -m emulated`, csrc/simt/README.md) built with AddressSanitizer + UBSan.
# Arguments go to a single pytest run instead (e.g. scripts/test.sh tests/test_engine.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q pybind11 ninja "cmake>=3.25" setuptools wheel
python -m pip install -q --no-build-isolation -e ".[test,bench]"
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q -m "not emulated"
asan=$(gcc -print-file-name=libasan.so)
if [ -f "$asan" ]; then
  # The sanitized emulation library is loaded into this python: the ASan runtime must come
  # first. Leak checking is off (python and torch keep allocations alive at exit).
  LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 python -m pytest -q -m emulated
else
  echo "libasan not found: emulated suite without sanitizers" >&2
  python -m pytest -q -m emulated
fi
