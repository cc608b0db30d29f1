#!/usr/bin/env python3
"""One representative launch of every CUDA kernel, for compute-sanitizer (memcheck, racecheck):
tree_attention on both inner loops, split and unsplit; rejection_sample (tree, chain with draft
probabilities, a 2-block cluster); sample; append_kv; kv_rollback with a cluster. Each result is
checked against the CPU op so a sanitizer run also says the output was right.

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_cases.py [--small]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="smaller shapes (racecheck is slow)")
    args = ap.parse_args()
    import torch
    import specrt._C  # noqa: F401
    from specrt.attention_plan import plan_tree_attention
    from test_attention import make_case, random_batch, run_op
    from test_cache_ops import make_append_case, make_rollback_case
    from test_sampling_gpu import dyadic_q, req, run_rs, run_sample, tree_batch

    assert torch.cuda.is_available(), "needs a GPU"
    ops = torch.ops.specrt
    prefix = 300 if args.small else 3000
    rng = random.Random(1)
    prefixes, parents = random_batch(3, rng, sizes=(1, 7, 33), max_prefix=prefix)
    cpu_case = make_case(prefixes, parents, 8, 2, 128, 16, torch.bfloat16, seed=1)
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in cpu_case.items()}
    ref_out, _ = run_op(cpu_case)
    for path in ("cuda_cores", "tensor_cores"):
        os.environ["SPECRT_ATTN_PATH"] = path
        for split in (False, True):
            plan = ws = None
            if split:
                plan, ws = plan_tree_attention(cpu_case["qo_indptr"], cpu_case["seq_lens"], 8, 2,
                                               128, 16, None, "cuda")
            out, _ = run_op(case, plan=plan, workspace=ws)
            torch.testing.assert_close(out.cpu(), ref_out, atol=2e-2, rtol=2e-2)
            print(f"tree_attention {path} split={split}: ok")
    del os.environ["SPECRT_ATTN_PATH"]

    gen = torch.Generator().manual_seed(2)
    for sizes, vocab, chain in (([7, 16, 1], 32000, False), ([5, 3], 10000, True)):
        logits, tokens, par, indptr = tree_batch(sizes, vocab, gen, chain=chain)
        q = dyadic_q(logits, gen) if chain else None
        prm = req(len(sizes), gen)
        a = run_rs("cuda", logits, tokens, par, indptr, q, prm, None, max(sizes))
        b = run_rs("cpu", logits, tokens, par, indptr, q, prm, None, max(sizes))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        print(f"rejection_sample chain={chain} vocab={vocab}: ok")
    logits = tree_batch([1] * 4, 32000, gen)[0]
    prm = req(4, gen)
    assert all(torch.equal(x, y) for x, y in zip(run_sample("cuda", logits, prm, None),
                                                  run_sample("cpu", logits, prm, None)))
    print("sample: ok")

    kv, layer, k, v, slots = make_append_case(3, 17, 16, dtype=torch.float16)
    kv_g = kv.cuda()
    ops.append_kv(k.cuda(), v.cuda(), kv_g[layer, 0], kv_g[layer, 1], slots.cuda())
    ops.append_kv(k, v, kv[layer, 0], kv[layer, 1], slots)
    assert torch.equal(kv_g.cpu(), kv)
    print("append_kv: ok")
    kv, bt, lens, path, na = make_rollback_case(4, 2, 16, [33, 7], kind="tree", num_layers=4,
                                                num_kv_heads=2, head_dim=64, dtype=torch.float16)
    kv_g, lens_g = kv.cuda(), lens.cuda()
    ops.kv_rollback(kv_g, bt.cuda(), lens_g, path.cuda(), na.cuda())
    ops.kv_rollback(kv, bt, lens, path, na)
    assert torch.equal(kv_g.cpu(), kv) and torch.equal(lens_g.cpu(), lens)
    print("kv_rollback: ok")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
