#!/usr/bin/env bash
# Train the heads shipped for the default model (SmolLM2-135M-Instruct) on CPU and copy the
# results into specrt/heads/:
#
#   scripts/train_default_heads.sh [MEDUSA_WORK_DIR] [EAGLE3_WORK_DIR]
#       (defaults /tmp/specrt-medusa-smollm2, /tmp/specrt-eagle3-smollm2)
#   HEADS="eagle3" scripts/train_default_heads.sh      (only some heads; default "medusa eagle3")
#
# Medusa -> specrt/heads/smollm2-135m-medusa/ (config.json, weights, README.md). About 50
# minutes on 2 CPU cores: stage-1 hidden states (~300k stdlib tokens, ~15 min), greedy
# self-distillation (10 minutes' budget), then training (~1 s a step).
#
# EAGLE-3 -> specrt/heads/smollm2-135m-eagle3/ (config.json, model.safetensors, README.md).
# About 48 minutes on 2 idle CPU cores: stage-1 hidden states + EAGLE-3 feature layers (200k
# stdlib tokens at ~365 tokens/s, 9 min), the same self-distilled data as the Medusa run (its
# generations are reused; their EAGLE-3 features take ~3 min unless cached), then training
# with a 4-step training-time test (~3.9 s a stage-1 step of 4 x 512 tokens, ~1.8 s a stage-2
# step on the shorter self-distilled rows: ~36 min). Another busy process on the machine
# makes both passes two to three times slower.
#
# A re-run reuses the hidden-state and self-distillation caches (~/.cache/specrt/train-cache)
# and takes only the training time; RESUME=1 continues an interrupted run from its last
# checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
HEADS=${HEADS:-medusa eagle3}
EXTRA=()
if [ "${RESUME:-0}" = 1 ]; then EXTRA+=(--resume); fi
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

# The self-distillation settings are shared by both heads (same cached generations).
DISTILL=(--self-distill stdlib-defs --self-distill chat
         --distill-max-prompts 160 --distill-max-new-tokens 192 --distill-batch-size 16
         --distill-time-budget 600)

for h in $HEADS; do
  case "$h" in
  medusa)
    WORK=${1:-/tmp/specrt-medusa-smollm2}
    DEST=specrt/heads/smollm2-135m-medusa
    python -m specrt.train.cli medusa \
      --model smollm2-135m --dtype float32 \
      --data stdlib --max-tokens 300000 --heldout-tokens 16384 --seq-len 512 \
      "${DISTILL[@]}" \
      --num-heads 4 --num-layers 1 --draft-vocab 4096 --labels target \
      --steps 800 --stage2-steps 200 --batch-size 4 --lr 2e-3 --stage2-lr 1e-3 --warmup 30 \
      --seed 0 --ckpt-every 100 --log-every 25 \
      --layout resblock --save-dtype float16 \
      --out "$WORK" "${EXTRA[@]}"
    mkdir -p "$DEST"
    cp "$WORK/config.json" "$WORK/medusa_lm_head.safetensors" "$WORK/README.md" "$DEST/"
    echo "[train_default_heads] copied to $DEST"
    ;;
  eagle3)
    WORK=${2:-/tmp/specrt-eagle3-smollm2}
    DEST=specrt/heads/smollm2-135m-eagle3
    python -m specrt.train.cli eagle3 \
      --model smollm2-135m --dtype float32 \
      --data stdlib --max-tokens 200000 --heldout-tokens 16384 --seq-len 512 \
      "${DISTILL[@]}" \
      --draft-vocab 8192 --length 4 \
      --steps 480 --stage2-steps 150 --batch-size 4 --lr 1e-3 --stage2-lr 1e-3 --warmup 20 \
      --seed 0 --ckpt-every 50 --log-every 10 \
      --save-dtype float16 \
      --out "$WORK" "${EXTRA[@]}"
    mkdir -p "$DEST"
    cp "$WORK/config.json" "$WORK/model.safetensors" "$WORK/README.md" "$DEST/"
    echo "[train_default_heads] copied to $DEST"
    ;;
  *)
    echo "unknown head '$h' (medusa, eagle3)" >&2
    exit 2
    ;;
  esac
done
