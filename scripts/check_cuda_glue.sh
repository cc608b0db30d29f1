#!/usr/bin/env bash
# Syntax-check the torch <-> CUDA glue (csrc/torch/*_cuda.cpp) against the torch headers of the
# installed (CPU) torch wheel: CI has no CUDA torch, but the glue must not rot.
set -euo pipefail
cd "$(dirname "$0")/.."
inc=$(python -c "import torch.utils.cpp_extension as e; print(' '.join('-I'+p for p in e.include_paths()))")
cuda_inc=$(dirname "$(dirname "$(command -v nvcc)")")/include
shopt -s nullglob
for f in csrc/torch/*_cuda.cpp; do
  echo "glue syntax check: $f"
  g++ -std=c++17 -fsyntax-only -DSPECRT_WITH_CUDA=1 -Icsrc -Icsrc/include -I"$cuda_inc" $inc "$f"
done
