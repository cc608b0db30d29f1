"""tree_attention's CUDA kernel (csrc/kernels/tree_attention.cuh) run by the SIMT emulation:
the GPU test cases of test_attention_gpu.py at emulation-sized shapes, against specrt.reference
and the CPU op, with the GPU tests' tolerances. Every case runs under two schedules (in order and
reversed; some also seeded random) and the results must be bit-identical across schedules: the
kernel is deterministic, so any difference is a race (a missing barrier or a read of shared
memory another thread has not written yet).

Paths covered: tensor cores (mma.sync + ldmatrix + cp.async, one and several 64-row passes),
CUDA cores with 1, 2, 4 and 8 rows per pass (decode with Hq == Hkv, Hq == 2 Hkv, chains, trees),
split-KV plans with the LSE merge and unsplit launches, head dims 64/128/256, fp16/bf16, page
sizes 1/16/128, GQA groups 1/2/3/4, ragged batches of random trees and causal chains.
"""
from __future__ import annotations

import random

import pytest
import torch

import simt_backend as sb
from specrt.attention_plan import plan_tree_attention
from test_attention import chain_parents, make_case, random_batch, random_parents, run_op, run_ref
from test_attention_gpu import GPU_LSE_TOL, GPU_TOL

pytestmark = pytest.mark.emulated

TWO_SCHEDULES = ("in_order", "reversed")


def run_emulated(case, split, path, schedule, *, num_sms=4, with_lse=True, seed=1):
    q, kc = case["q"], case["k_cache"]
    plan = ws = None
    if split:
        plan, ws = plan_tree_attention(case["qo_indptr"], case["seq_lens"], q.shape[1],
                                       kc.shape[2], q.shape[2], kc.shape[1], num_sms, "cpu")
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    lse = torch.full(q.shape[:2], float("nan")) if with_lse else None
    with sb.configured(schedule=schedule, seed=seed):
        sb.tree_attention(q, kc, case["v_cache"], case["block_table"], case["seq_lens"],
                          case["qo_indptr"], case["mask"], out, lse, case["sm_scale"], plan, ws,
                          path=path)
    return out, lse, plan


def check_emulated(case, split, path, *, schedules=TWO_SCHEDULES, ref=None, with_lse=True,
                   expect_split=None):
    ref_out, ref_lse = ref if ref is not None else run_ref(case)
    dtype = case["q"].dtype
    first = None
    for i, schedule in enumerate(schedules):
        out, lse, plan = run_emulated(case, split, path, schedule, with_lse=with_lse, seed=i + 1)
        assert not out.isnan().any(), f"unwritten (poisoned) output left ({schedule})"
        torch.testing.assert_close(out, ref_out, **GPU_TOL[dtype])
        if with_lse:
            assert not lse.isnan().any()
            torch.testing.assert_close(lse, ref_lse, **GPU_LSE_TOL)
        if first is None:
            first = (out, lse)
        else:  # deterministic kernel: any schedule dependence is a race
            assert torch.equal(out, first[0]), f"result depends on the schedule ({schedule})"
            if with_lse:
                assert torch.equal(lse, first[1])
    if expect_split is not None and split:
        batch = case["seq_lens"].numel()
        assert (int(plan[0]) > batch) == expect_split, "the plan did not split as intended"
    return first


# "auto" picks one of the two paths (exercised on its own in test_cuda_core_rows_per_pass).
@pytest.mark.parametrize("path", ["cuda_cores", "tensor_cores"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("split", [False, True])
def test_head_dims_gqa(path, dtype, d, group, split):
    rng = random.Random(d + group)
    prefixes, parents = random_batch(3, rng, sizes=(1, 2, 7, 16), max_prefix=300)
    prefixes[0] = 290  # at least one sequence long enough to split
    case = make_case(prefixes, parents, 2 * group, 2, d, 16, dtype, seed=d * group)
    check_emulated(case, split, path, expect_split=True if split else None)


@pytest.mark.parametrize("path", ["cuda_cores", "tensor_cores"])
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("mode", ["random", "chain_mask", "causal", "decode"])
def test_layouts(path, page_size, batch, mode):
    dtype = torch.float16 if (page_size + batch) % 2 else torch.bfloat16
    rng = random.Random(batch * 7 + page_size)
    if mode == "decode":
        prefixes = [rng.randrange(0, 400) for _ in range(batch)]
        parents = [chain_parents(1)] * batch
    else:
        prefixes, parents = random_batch(batch, rng, sizes=(1, 2, 7, 16),
                                         kind="random" if mode == "random" else "chain",
                                         max_prefix=300)
    mask_mode = "none" if mode in ("causal", "decode") else "tree"
    case = make_case(prefixes, parents, 8, 2, 64, page_size, dtype, seed=batch,
                     mask_mode=mask_mode)
    ref = run_ref(case)
    for split in (False, True):
        check_emulated(case, split, path, ref=ref, with_lse=(batch != 3))


@pytest.mark.parametrize("hq,hkv,t", [(4, 4, 1), (8, 4, 1), (8, 4, 2), (8, 4, 4), (4, 4, 5),
                                      (12, 4, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_core_rows_per_pass(hq, hkv, t, dtype):
    """Every CUDA-core variant: rows per (sequence, kv head) = t * group selects R = 1, 2, 4 or
    8 (decode with Hq == Hkv and Hq == 2 Hkv included); more rows than R loop over passes."""
    rng = random.Random(hq * 100 + t)
    prefixes = [rng.randrange(100, 300) for _ in range(3)]
    parents = [random_parents(t, rng) for _ in range(3)]
    case = make_case(prefixes, parents, hq, hkv, 128, 16, dtype, seed=t)
    ref = run_ref(case)
    for split in (False, True):
        check_emulated(case, split, "auto", ref=ref)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_tensor_core_several_passes(d):
    """64-node trees with group 4: 256 rows per kv head, four 64-row passes per CTA."""
    rng = random.Random(d)
    parents = [random_parents(64, rng), random_parents(33, rng)]
    case = make_case([150, 20], parents, 8, 2, d, 16, torch.bfloat16, seed=d)
    ref = run_ref(case)
    for split in (False, True):
        check_emulated(case, split, "tensor_cores", ref=ref)


def test_random_schedule_and_long_split():
    """A long context split into many items, under the seeded random schedule too."""
    rng = random.Random(5)
    parents = [random_parents(7, rng), chain_parents(1)]
    case = make_case([1500, 700], parents, 8, 2, 128, 16, torch.float16, seed=5)
    ref = run_ref(case)
    for path in ("cuda_cores", "tensor_cores"):
        check_emulated(case, True, path, ref=ref,
                       schedules=("in_order", "reversed", "random"), expect_split=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_matches_cpu_op(dtype):
    rng = random.Random(31)
    prefixes, parents = random_batch(5, rng, sizes=(1, 2, 7, 16), max_prefix=400)
    case = make_case(prefixes, parents, 12, 4, 64, 16, dtype, seed=32)
    cpu_out, cpu_lse = run_op(case)
    for split in (False, True):
        out, lse, _ = run_emulated(case, split, "auto", "in_order")
        torch.testing.assert_close(out, cpu_out, **GPU_TOL[dtype])
        torch.testing.assert_close(lse, cpu_lse, **GPU_LSE_TOL)


def test_strided_cache_views():
    rng = random.Random(41)
    prefixes, parents = random_batch(3, rng, sizes=(1, 7), max_prefix=200)
    base = make_case(prefixes, parents, 8, 2, 128, 16, torch.bfloat16, seed=42)
    kv = torch.randn(2, 2, *base["k_cache"].shape).to(torch.bfloat16)
    kv[1, 0] = base["k_cache"]
    kv[1, 1] = base["v_cache"]
    case = dict(base, k_cache=kv[1, 0], v_cache=kv[1, 1])
    ref = run_ref(base)
    for split in (False, True):
        for path in ("cuda_cores", "tensor_cores"):
            check_emulated(case, split, path, ref=ref)


def test_empty_sequences_and_ignored_mask_bits():
    """A sequence with no new tokens is skipped; mask bits past the tree are ignored."""
    parents = [random_parents(5, random.Random(1)), [], chain_parents(3)]
    case = make_case([40, 60, 10], parents, 4, 2, 64, 16, torch.float16, seed=9)
    noisy = case["mask"].clone()
    noisy[:, 0] |= torch.tensor(-(1 << 20), dtype=torch.int32)  # bits 20..31: no such nodes
    ref = run_ref(case)
    check_emulated(dict(case, mask=noisy), False, "cuda_cores", ref=ref)
