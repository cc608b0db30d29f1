#!/usr/bin/env bash
# Syntax-check the torch <-> CUDA glue (csrc/torch/*_cuda.cpp) against the torch headers of the
# installed (CPU) torch wheel: CI has no CUDA torch, but the glue must not rot.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(python -c "import torch.utils.cpp_extension as e; print(' '.join('-I'+p for p in e.include_paths()))")
cuda_home=${CUDA_HOME:-$(nvcc -v -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)}
[ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda
cuda_inc=$cuda_home/include
# The CPU wheel ships c10/cuda headers but not the generated cuda_cmake_macros.h: stub it.
stub=$(mktemp -d)
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
shopt -s nullglob
for f in csrc/torch/*_cuda.cpp; do
  echo "glue syntax check: $f"
  g++ -std=c++17 -fsyntax-only -w -DSPECRT_WITH_CUDA=1 -Icsrc -Icsrc/include -I"$cuda_inc" $inc -I"$stub" "$f"
done
