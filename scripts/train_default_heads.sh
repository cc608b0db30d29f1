#!/usr/bin/env bash
# Train the Medusa heads shipped for the default model (SmolLM2-135M-Instruct) on CPU and copy
# the result into specrt/heads/smollm2-135m-medusa/ (config.json, weights, README.md).
#
#   scripts/train_default_heads.sh [WORK_DIR]      (default /tmp/specrt-medusa-smollm2)
#
# About 50 minutes on 2 CPU cores: stage-1 hidden states (~300k stdlib tokens, ~15 min),
# greedy self-distillation (10 minutes' budget), then training (~1 s a step). A re-run reuses
# the hidden-state and self-distillation caches (~/.cache/specrt/train-cache) and takes only
# the training time; RESUME=1 continues an interrupted run from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/specrt-medusa-smollm2}
DEST=specrt/heads/smollm2-135m-medusa
EXTRA=()
if [ "${RESUME:-0}" = 1 ]; then EXTRA+=(--resume); fi
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

python -m specrt.train.cli medusa \
  --model smollm2-135m --dtype float32 \
  --data stdlib --max-tokens 300000 --heldout-tokens 16384 --seq-len 512 \
  --self-distill stdlib-defs --self-distill chat \
  --distill-max-prompts 160 --distill-max-new-tokens 192 --distill-batch-size 16 \
  --distill-time-budget 600 \
  --num-heads 4 --num-layers 1 --draft-vocab 4096 --labels target \
  --steps 800 --stage2-steps 200 --batch-size 4 --lr 2e-3 --stage2-lr 1e-3 --warmup 30 \
  --seed 0 --ckpt-every 100 --log-every 25 \
  --layout resblock --save-dtype float16 \
  --out "$WORK" "${EXTRA[@]}"

mkdir -p "$DEST"
cp "$WORK/config.json" "$WORK/medusa_lm_head.safetensors" "$WORK/README.md" "$DEST/"
echo "[train_default_heads] copied to $DEST"
