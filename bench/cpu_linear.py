"""CPU skinny GEMM: ``specrt.ops.linear`` (plain and packed weights) vs torch's ``F.linear``
(MKL / oneDNN) at the decode / verify shapes of the default model, and the whole verify forward.

    python bench/cpu_linear.py                    # fp32 and bf16, SmolLM2-135M shapes
    python bench/cpu_linear.py --rows 1,4,8 --dtypes float32

Method: every GEMM point runs over ``--layers`` distinct copies of the weight (30 by default:
SmolLM2's layer count, 200+ MB in fp32), so the weights come from DRAM as in a real forward, not
from the last-level cache; the figure is the median over reps of the per-layer time, as
bytes of weight / time (GB/s) and as a fraction of the machine's streaming read bandwidth
measured in the same run (a ``sum`` over a 512 MB buffer). The forward section times the real
model's verify forward (chain of ``n`` rows after a 200-token prefix) with the CPU GEMM on and
off (``CPU_LINEAR_MAX_ROWS = 0``). Results (JSON + markdown) go to
``bench/results/cpu_linear_<date>.*`` with device, date, versions and command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import environment, git_label, require_clean_tree, time_cpu  # noqa: E402

from specrt import ops  # noqa: E402
from specrt.models import llama  # noqa: E402

# (name, n, k) of SmolLM2-135M: fused qkv, o, fused gate/up, down, LM head.
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]


def stream_bandwidth() -> float:
    buf = torch.ones(128 * 1024 * 1024)  # 512 MB
    t = time_cpu(lambda: buf.sum(), warmup=1, min_reps=5, max_reps=10)
    return buf.numel() * 4 / t.median


def gemm_points(dtypes, rows, layers) -> list:
    out = []
    for dtype in dtypes:
        for name, n, k in SHAPES:
            copies = 1 if name == "lm_head" else layers
            ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            packed = [ops.pack_linear(w) for w in ws]
            nbytes = ws[0].numel() * ws[0].element_size()
            for m in rows:
                x = torch.randn(m, k).to(dtype)
                row = {"dtype": str(dtype).replace("torch.", ""), "shape": name, "n": n, "k": k,
                       "m": m, "weight_bytes": nbytes}
                for label, fn in (
                        ("torch", lambda: [torch.nn.functional.linear(x, w) for w in ws]),
                        ("specrt", lambda: [ops.linear(x, w, validate=False) for w in ws]),
                        ("specrt_packed", lambda: [ops.linear(x, p, validate=False) for p in packed])):
                    t = time_cpu(fn, warmup=1, min_reps=5, max_reps=15, target_s=0.5)
                    row[label + "_s"] = t.median / copies
                out.append(row)
                print(f"{row['dtype']:8s} {name:8s} m={m:2d} " + "  ".join(
                    f"{lab} {nbytes / row[lab + '_s'] / 1e9:5.1f} GB/s"
                    for lab in ("torch", "specrt", "specrt_packed")), flush=True)
    return out


def forward_points(dtypes, rows) -> list:
    from specrt.hub import resolve_model
    from specrt.kv_cache import PagedKVCache, build_metadata
    from specrt.models import load_model
    from specrt.tree import DraftTree, batch_trees

    out = []
    for dtype in dtypes:
        model, _ = load_model(resolve_model("smollm2-135m"), dtype=dtype, tokenizer=False)
        cfg = model.config
        cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 40, dtype,
                             torch.device("cpu"))
        cache.add_sequence(0)
        cache.reserve(0, 200 + max(rows))
        cache.commit(0, 200)
        for n in rows:
            tree = DraftTree([1] * n, [-1] + list(range(n - 1)))
            tb = batch_trees([tree], [200])
            meta = build_metadata(cache, [0], tb)
            row = {"dtype": str(dtype).replace("torch.", ""), "rows": n}
            for label, limit in (("torch", 0), ("specrt", llama.CPU_LINEAR_MAX_ROWS)):
                saved, llama.CPU_LINEAR_MAX_ROWS = llama.CPU_LINEAR_MAX_ROWS, limit
                try:
                    with torch.no_grad():
                        t = time_cpu(lambda: model(tb.tokens.long(), tb.positions, cache.kv, meta),
                                     warmup=2, min_reps=7, max_reps=15, target_s=1.0)
                finally:
                    llama.CPU_LINEAR_MAX_ROWS = saved
                row[label + "_s"] = t.median
            out.append(row)
            print(f"{row['dtype']:8s} forward rows={n:2d} torch GEMM {row['torch_s'] * 1e3:6.1f} ms"
                  f"  specrt GEMM {row['specrt_s'] * 1e3:6.1f} ms", flush=True)
    return out


def markdown(res) -> str:
    env, bw = res["environment"], res["stream_bytes_per_s"]
    lines = [f"# CPU skinny GEMM ({env['device']}, {env['threads']} threads), {env['date']}", "",
             f"command: `{env['command']}`, git {git_label(res['git'])}", "",
             f"Streaming read bandwidth (sum over 512 MB): {bw / 1e9:.1f} GB/s. GEMM figures: "
             "weight bytes / median time per layer (weights from DRAM), and the fraction of that "
             "bandwidth.", "",
             "| dtype | shape (n x k) | rows | torch F.linear | specrt plain | specrt packed |",
             "|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        cells = []
        for lab in ("torch", "specrt", "specrt_packed"):
            g = r["weight_bytes"] / r[lab + "_s"]
            cells.append(f"{r[lab + '_s'] * 1e6:.0f} us ({g / 1e9:.1f} GB/s, {g / bw:.0%})")
        lines.append(f"| {r['dtype']} | {r['shape']} ({r['n']} x {r['k']}) | {r['m']} | "
                     + " | ".join(cells) + " |")
    if res["forward"]:
        lines += ["", "SmolLM2-135M verify forward (chain of `rows` after a 200-token prefix):", "",
                  "| dtype | rows | torch GEMM | specrt GEMM (packed) | speed-up |", "|---|---|---|---|---|"]
        for r in res["forward"]:
            lines.append(f"| {r['dtype']} | {r['rows']} | {r['torch_s'] * 1e3:.1f} ms | "
                         f"{r['specrt_s'] * 1e3:.1f} ms | {r['torch_s'] / r['specrt_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rows", default="1,2,3,4,5,8,16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-forward", action="store_true", help="skip the real-model forward")
    ap.add_argument("--out", default=None, help="results path stem")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args(argv)
    git = require_clean_tree(args.allow_dirty)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    dtypes = [d for d in dtypes if ops.linear_isa(d)]
    if not dtypes:
        raise SystemExit("ops.linear cannot run on this CPU (no AVX-512)")
    rows = [int(r) for r in args.rows.split(",")]
    res = {"environment": environment("cpu", git), "git": git,
           "isa": {str(d).replace("torch.", ""): ops.linear_isa(d) for d in dtypes},
           "stream_bytes_per_s": stream_bandwidth()}
    res["gemm"] = gemm_points(dtypes, rows, args.layers)
    res["forward"] = [] if args.no_forward else forward_points(dtypes, [r for r in rows if r <= 8])
    stem = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                            f"cpu_linear_{res['environment']['date'][:10]}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
