"""``specrt train METHOD ...`` (also ``python -m specrt.train.cli``; under ``torchrun`` for
DDP / FSDP)."""
from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["build_parser", "main", "config_from_args"]


def _common(m: argparse.ArgumentParser) -> None:
    """Options every method shares (data, schedule, caches, output, distribution)."""
    m.add_argument("--model", default="smollm2-135m",
                   help="target: local HF dir, .gguf file, or a known name")
    m.add_argument("--data", action="append", default=None,
                   help="stage-1 text: 'stdlib', a directory, a glob or FILE.jsonl (repeatable; "
                        "default stdlib)")
    m.add_argument("--self-distill", action="append", default=[],
                   help="stage-2 prompts: 'stdlib-defs' (def + docstring completions), 'chat' "
                        "(the chat prompts shipped with specrt) or PROMPTS.jsonl (repeatable)")
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--steps", type=int, default=1000, help="stage-1 steps")
    m.add_argument("--stage2-steps", type=int, default=0, help="stage-2 (self-distilled) steps")
    m.add_argument("--batch-size", type=int, default=8, help="global batch, in rows")
    m.add_argument("--lr", type=float, default=1e-3)
    m.add_argument("--stage2-lr", type=float, default=None)
    m.add_argument("--warmup", type=int, default=50)
    m.add_argument("--min-lr-ratio", type=float, default=0.1)
    m.add_argument("--weight-decay", type=float, default=0.0)
    m.add_argument("--grad-clip", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    m.add_argument("--max-tokens", type=int, default=None, help="cap on stage-1 training tokens")
    m.add_argument("--heldout-tokens", type=int, default=32768)
    m.add_argument("--heldout-pct", type=float, default=5.0)
    m.add_argument("--cache-dir", default=None,
                   help="hidden-state / distillation cache (default ~/.cache/specrt/train-cache)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="target dtype")
    m.add_argument("--hidden-dtype", default="float16", choices=["float16", "bfloat16"])
    m.add_argument("--hidden-batch-tokens", type=int, default=4096)
    m.add_argument("--ckpt-every", type=int, default=200)
    m.add_argument("--log-every", type=int, default=10)
    m.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    m.add_argument("--fsdp", action="store_true",
                   help="shard the frozen target's decoder layers with FSDP2 (torchrun)")
    m.add_argument("--distill-max-prompts", type=int, default=256,
                   help="cap on stdlib-defs prompts")
    m.add_argument("--distill-max-new-tokens", type=int, default=256)
    m.add_argument("--distill-temperature", type=float, default=0.0)
    m.add_argument("--distill-batch-size", type=int, default=8)
    m.add_argument("--distill-time-budget", type=float, default=None,
                   help="seconds; stop submitting prompts after it (the result is cached)")
    m.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specrt train",
                                 description="train proposer heads on a frozen target")
    sub = ap.add_subparsers(dest="method", required=True)
    m = sub.add_parser("medusa", help="Medusa-1 heads (ResBlock-only layout + token_map)")
    _common(m)
    m.add_argument("--num-heads", type=int, default=4)
    m.add_argument("--num-layers", type=int, default=1)
    m.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary: the N most frequent training tokens (0: full)")
    m.add_argument("--labels", choices=["text", "target"], default="text",
                   help="head targets: the data's tokens, or the target's own greedy predictions "
                        "of them (what greedy verification accepts)")
    m.add_argument("--layout", default="resblock", choices=["resblock", "medusa1", "vllm"])

    e3 = sub.add_parser("eagle3", help="EAGLE-3 head (training-time test; SafeAILab layout)")
    _common(e3)
    e3.add_argument("--draft-vocab", type=int, default=8192,
                    help="draft vocabulary: the N most frequent training tokens (0: full)")
    e3.add_argument("--length", type=int, default=4,
                    help="training-time-test steps (the reference uses 7)")
    e3.add_argument("--eval-length", type=int, default=0,
                    help="steps scored on the held-out data (0: max(length, 5))")

    e1 = sub.add_parser("eagle", aliases=["eagle1"],
                        help="EAGLE-1 head (feature regression; SafeAILab layout)")
    _common(e1)
    e1.add_argument("--noise", type=float, default=0.2,
                    help="uniform feature noise, the reference's std (scaled by 512 / seq-len)")
    e1.add_argument("--eval-length", type=int, default=5,
                    help="unrolled steps scored on the held-out data")
    from . import mlp_speculator as _mlp_speculator
    from . import mtp as _mtp

    _mlp_speculator.add_args(sub.add_parser(
        "mlp-speculator", help="multi-stage MLP speculator (fms-extras recipe; public layout)"))

    _mtp.add_args(sub.add_parser("mtp", help="MTP modules (DeepSeek-V3 / MiMo multi-token "
                                              "prediction; MiMo layout)"))
    return ap


def config_from_args(args):
    from .trainer import TrainConfig

    cfg = TrainConfig()
    for k in vars(cfg):
        if hasattr(args, k) and getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    if args.data is None:
        cfg.data = ["stdlib"]
    if cfg.method == "eagle1":
        cfg.method = "eagle"
    if cfg.method == "eagle":
        cfg.draft_vocab = 0  # EAGLE-1 predicts through the target's LM head
    return cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.method == "mlp-speculator":
        from .mlp_speculator import run as run_mlp_speculator

        args.command = " ".join(shlex.quote(a) for a in ["specrt", "train", *argv])
        return run_mlp_speculator(args)
    if args.method == "mtp":
        from .mtp import run as run_mtp

        args.command = " ".join(shlex.quote(a) for a in ["specrt", "train", *argv])
        return run_mtp(args)
    from .data import DataError
    from .trainer import run

    cfg = config_from_args(args)
    cfg.command = " ".join(shlex.quote(a) for a in ["specrt", "train", *argv])
    try:
        run(cfg)
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"specrt train: error: {e}", file=sys.stderr)
        return 2
    finally:
        from . import dist

        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
