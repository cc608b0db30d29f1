"""tree_attention on CUDA: the CUDA op against specrt.reference and against the CPU op.

Covers both inner loops (CUDA cores / tensor cores, forced with SPECRT_ATTN_PATH), the split-KV
plan and the unsplit launch, contexts up to 32k, CUDA-graph capture + replay, poisoned outputs.

Tolerances (fp32 reference rounded to the output dtype): the tensor-core path rounds P to the
input dtype before P @ V, so bf16 atol 2e-2 / rtol 2e-2 and fp16 atol 4e-3 / rtol 4e-3; LSE
(fp32, ex2.approx) atol 5e-3 / rtol 1e-4.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import specrt._C  # noqa: F401
from specrt.attention_plan import plan_sizes, plan_tree_attention

from test_attention import (chain_parents, make_case, random_batch, random_parents, run_op,
                            run_ref)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not specrt._C.WITH_CUDA,
                       reason="needs a CUDA device and a CUDA build of specrt"),
]

# The reference runs on the tensors' device: keep its fp32 matmuls exact.
torch.backends.cuda.matmul.allow_tf32 = False

GPU_TOL = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}
GPU_LSE_TOL = dict(atol=5e-3, rtol=1e-4)
PATHS = ["auto", "cuda_cores", "tensor_cores"]


@pytest.fixture
def path(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("SPECRT_ATTN_PATH", request.param)
    else:
        monkeypatch.delenv("SPECRT_ATTN_PATH", raising=False)
    return request.param


def make_plan(case):
    q, kc = case["q"], case["k_cache"]
    return plan_tree_attention(case["qo_indptr"].cpu(), case["seq_lens"].cpu(), q.shape[1],
                               kc.shape[2], q.shape[2], kc.shape[1], None, q.device)


def run_cuda(case, split, with_lse=True):
    plan, ws = make_plan(case) if split else (None, None)
    q = case["q"]
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    lse = torch.full(q.shape[:2], float("nan"), device=q.device) if with_lse else None
    run_op(case, with_lse, out=out, lse=lse, plan=plan, workspace=ws)
    torch.cuda.synchronize()
    return out, lse


def check_cuda(case, split, with_lse=True, ref=None):
    out, lse = run_cuda(case, split, with_lse)
    ref_out, ref_lse = ref if ref is not None else run_ref(case)
    dtype = case["q"].dtype
    assert not out.isnan().any(), "unwritten (poisoned) output left"
    torch.testing.assert_close(out.cpu(), ref_out.cpu(), **GPU_TOL[dtype])
    if with_lse:
        assert not lse.isnan().any()
        torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), **GPU_LSE_TOL)
    return out, lse


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("split", [False, True])
def test_head_dims_gqa(path, dtype, d, group, split):
    rng = random.Random(d + group)
    prefixes, parents = random_batch(3, rng, max_prefix=700)
    case = make_case(prefixes, parents, 2 * group, 2, d, 16, dtype, seed=d * group,
                     device="cuda")
    check_cuda(case, split)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("mode", ["random", "chain_mask", "causal", "decode"])
def test_layouts(path, dtype, page_size, batch, mode):
    rng = random.Random(batch * 7 + page_size)
    if mode == "decode":
        prefixes = [rng.randrange(0, 2000) for _ in range(batch)]
        parents = [chain_parents(1)] * batch
    else:
        prefixes, parents = random_batch(batch, rng, kind="random" if mode == "random"
                                         else "chain", max_prefix=1500)
    mask_mode = "none" if mode in ("causal", "decode") else "tree"
    case = make_case(prefixes, parents, 8, 2, 128, page_size, dtype, seed=batch,
                     mask_mode=mask_mode, device="cuda")
    ref = run_ref(case)
    for split in (False, True):
        check_cuda(case, split, with_lse=(batch != 3), ref=ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tree", [1, 2, 7, 64])
@pytest.mark.parametrize("context", [1, 4096, 32768])
def test_long_context(dtype, tree, context):
    rng = random.Random(tree)
    prefix = max(context - tree, 0)
    case = make_case([prefix], [random_parents(tree, rng)], 32, 8, 128, 16, dtype, seed=tree,
                     device="cuda")
    ref = run_ref(case)
    a, lse_a = check_cuda(case, split=True, ref=ref)
    b, lse_b = check_cuda(case, split=False, ref=ref)
    torch.testing.assert_close(a, b, **GPU_TOL[dtype])
    torch.testing.assert_close(lse_a, lse_b, **GPU_LSE_TOL)


def test_plan_fills_the_gpu():
    # batch 1 at 32k: about two CTAs per SM, never more items than the capacity
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan, ws = plan_tree_attention(torch.tensor([0, 1], dtype=torch.int32),
                                   torch.tensor([32768], dtype=torch.int32), 32, 8, 128, 16,
                                   None, "cuda")
    header = plan[:8].cpu().tolist()
    items, cap = header[0], header[1]
    assert items <= cap
    assert items * 8 >= num_sms  # every SM gets work
    assert ws.numel() >= header[4] * 32 * 129


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_op(dtype):
    rng = random.Random(31)
    prefixes, parents = random_batch(17, rng, max_prefix=3000)
    cpu_case = make_case(prefixes, parents, 12, 4, 64, 16, dtype, seed=32)
    gpu_case = make_case(prefixes, parents, 12, 4, 64, 16, dtype, seed=32, device="cuda")
    cpu_out, cpu_lse = run_op(cpu_case)
    for split in (False, True):
        out, lse = run_cuda(gpu_case, split)
        torch.testing.assert_close(out.cpu(), cpu_out, **GPU_TOL[dtype])
        torch.testing.assert_close(lse.cpu(), cpu_lse, **GPU_LSE_TOL)


def test_strided_cache_views():
    rng = random.Random(41)
    prefixes, parents = random_batch(3, rng, max_prefix=400)
    base = make_case(prefixes, parents, 8, 2, 128, 16, torch.bfloat16, seed=42, device="cuda")
    kv = torch.randn(2, 2, *base["k_cache"].shape, device="cuda").to(torch.bfloat16)
    kv[1, 0] = base["k_cache"]
    kv[1, 1] = base["v_cache"]
    case = dict(base, k_cache=kv[1, 0], v_cache=kv[1, 1])
    ref_out, ref_lse = run_ref(base)
    for split in (False, True):
        out, lse = run_cuda(case, split)
        torch.testing.assert_close(out.cpu(), ref_out.cpu(), **GPU_TOL[torch.bfloat16])
        torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), **GPU_LSE_TOL)


@pytest.mark.parametrize("tree", [1, 7])
def test_cuda_graph_replay(tree):
    """Capture once with a plan; replay with new q values, then with longer contexts (a fresh
    plan for the same bucket copied into the captured plan tensor): equal to eager each time."""
    rng = random.Random(51)
    batch, hq, hkv, d, ps = 4, 16, 4, 128, 16
    parents = [random_parents(tree, rng) for _ in range(batch)]
    lens1 = torch.tensor([100, 2000, 7, 5000], dtype=torch.int32) + tree
    lens2 = lens1 + 300
    width = int(lens2.max()) // ps + 1
    num_pages = batch * width + 5
    g = torch.Generator().manual_seed(52)
    block_table = torch.randperm(num_pages, generator=g)[:batch * width].reshape(batch, width)
    case = dict(
        q=torch.randn(batch * tree, hq, d, generator=g).to(torch.bfloat16).cuda(),
        k_cache=torch.randn(num_pages, ps, hkv, d, generator=g).to(torch.bfloat16).cuda(),
        v_cache=torch.randn(num_pages, ps, hkv, d, generator=g).to(torch.bfloat16).cuda(),
        block_table=block_table.to(torch.int32).cuda(),
        seq_lens=lens1.cuda(),
        qo_indptr=torch.arange(0, batch * tree + 1, tree, dtype=torch.int32).cuda(),
        mask=make_case([0] * batch, parents, hq, hkv, d, ps, torch.bfloat16)["mask"].cuda(),
        sm_scale=1 / math.sqrt(d))
    plan, ws = make_plan(case)
    out = torch.empty_like(case["q"])
    lse = torch.empty(case["q"].shape[:2], device="cuda")
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
            case["qo_indptr"], case["mask"], out, lse, case["sm_scale"], plan, ws)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.specrt.tree_attention(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.specrt.tree_attention(*args)

    for step in range(2):
        if step == 0:
            case["q"].copy_(torch.randn_like(case["q"]))
        else:
            case["seq_lens"].copy_(lens2.cuda())
            new_plan, new_ws = plan_tree_attention(case["qo_indptr"].cpu(), lens2, hq, hkv, d,
                                                   ps, None, "cuda", plan_out=plan,
                                                   workspace_out=ws)
            assert new_plan.data_ptr() == plan.data_ptr() and new_ws.data_ptr() == ws.data_ptr()
        graph.replay()
        torch.cuda.synchronize()
        e_out, e_lse = run_cuda(case, split=True)
        torch.testing.assert_close(out, e_out, atol=0, rtol=0)
        torch.testing.assert_close(lse, e_lse, atol=0, rtol=0)
        ref_out, ref_lse = run_ref(case)
        torch.testing.assert_close(out.cpu(), ref_out.cpu(), **GPU_TOL[torch.bfloat16])
        torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), **GPU_LSE_TOL)


def test_plan_sizes_do_not_depend_on_lengths():
    qo = torch.tensor([0, 7, 14, 21], dtype=torch.int32)
    sizes = set()
    for lens in ([10, 20, 30], [30000, 7, 100], [5000, 5000, 5000]):
        plan, ws = plan_tree_attention(qo, torch.tensor(lens, dtype=torch.int32), 32, 8, 128, 16,
                                       132, "cuda")
        sizes.add((plan.numel(), ws.numel()))
    assert len(sizes) == 1
    cap, rows = plan_sizes(3, 21, 7, 8, 132)
    assert sizes.pop() == (8 + 4 * cap + 4, rows * 32 * 129)


def test_bad_input_cuda():
    rng = random.Random(61)
    prefixes, parents = random_batch(2, rng, sizes=(3,), max_prefix=20)
    case = make_case(prefixes, parents, 4, 2, 64, 16, torch.float16, seed=62, device="cuda")
    out = torch.full_like(case["q"], 3.0)
    bad = dict(case, q=case["q"].float(), k_cache=case["k_cache"].float(),
               v_cache=case["v_cache"].float())
    with pytest.raises(RuntimeError):
        run_op(bad, out=out.float())
    with pytest.raises(RuntimeError):  # head_dim 80 is CPU-only
        c = make_case(prefixes, parents, 4, 2, 80, 16, torch.float16, seed=62, device="cuda")
        run_op(c)
    plan, ws = make_plan(case)
    with pytest.raises(RuntimeError):  # a plan without its workspace
        run_op(case, out=out, plan=plan, workspace=None)
    with pytest.raises(RuntimeError):  # cpu index tensors
        run_op(dict(case, block_table=case["block_table"].cpu()), out=out)
    torch.cuda.synchronize()
    assert (out == 3).all()


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_cuda_core_one_and_two_rows(hq, hkv, dtype):
    """Plain decode with Hq == Hkv (1 row per kv head) and Hq == 2 Hkv (2 rows): the CUDA-core
    pass with R = 1 and R = 2 (and R = 4 for group 4), split and unsplit."""
    rng = random.Random(hq * hkv)
    prefixes = [rng.randrange(1, 3000) for _ in range(5)]
    case = make_case(prefixes, [chain_parents(1)] * 5, hq, hkv, 128, 16, dtype, seed=hq,
                     mask_mode="none", device="cuda")
    ref = run_ref(case)
    for split in (False, True):
        check_cuda(case, split, ref=ref)
