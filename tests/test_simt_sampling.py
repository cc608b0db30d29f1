"""The fused rejection-sampling / sampling kernel (csrc/kernels/rejection_sampling.cuh) run by the
SIMT emulation: the cases of test_sampling_gpu.py at emulation-sized shapes, bit-exact against
the CPU op on dyadic inputs (as the GPU tests demand), against the reference on non-dyadic ones.

Every cluster width of the launcher is reached (1, 2, 4 and 8 blocks per sequence, chosen from
the batch, the vocabulary and the SM count the emulation reports), with greedy rows,
deterministic-draft trees (recursive rejection over siblings), chains with draft
probabilities, temperature / top-k / top-p, explicit uniforms and Philox, and a launch whose
dynamic shared memory exceeds 48 KB. Cases run under two schedules and must agree bit for bit.
"""
from __future__ import annotations


import pytest
import torch

import simt_backend as sb
from test_sampling_gpu import (NEG_INF, check_invalid_rows, check_vs_reference_non_dyadic,
                               dyadic_q, req, run_rs, run_sample, tree_batch,
                               uniform_extreme_cases)

pytestmark = pytest.mark.emulated


def emu_rs(logits, tokens, parents, indptr, q, prm, u, max_t, *, num_sms=132,
           schedule="in_order"):
    b = indptr.numel() - 1
    out = [torch.full((b, max_t), -7, dtype=torch.int32),
           torch.full((b, max_t), -7, dtype=torch.int32), torch.full((b,), -7, dtype=torch.int32)]
    with sb.configured(schedule=schedule, num_sms=num_sms, seed=3):
        sb.rejection_sample(logits, tokens, parents, indptr, q, *prm, u, *out)
    return out


def emu_sample(logits, prm, u, *, num_sms=132, schedule="in_order"):
    n, v = logits.shape
    tok = torch.full((n,), -7, dtype=torch.int32)
    probs = torch.full((n, v), -7.0)
    with sb.configured(schedule=schedule, num_sms=num_sms, seed=3):
        sb.sample(logits, *prm, u, tok, probs)
    return tok, probs


def cluster_of_last_launch():
    return sb.last_launch()["cluster"][0]


def both_schedules(fn, *args, **kw):
    a = fn(*args, schedule="in_order", **kw)
    cluster = cluster_of_last_launch()
    b = fn(*args, schedule="reversed", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y), "result depends on the schedule"
    return a, cluster


# (batch, vocab, num_sms) -> the launcher's cluster width
CLUSTERS = [((1, 111, 132), 1), ((1, 10000, 132), 2), ((1, 20000, 132), 4),
            ((1, 40000, 132), 8), ((3, 40000, 4), 2), ((7, 111, 132), 1)]


@pytest.mark.parametrize("shape,cluster", CLUSTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tree_bit_exact_vs_cpu(shape, cluster, dtype):
    batch, vocab, num_sms = shape
    gen = torch.Generator().manual_seed(batch * 7 + vocab)
    sizes = [[1, 2, 7, 16][i % 4] for i in range(batch)] if batch > 1 else [7]
    logits, tokens, parents, indptr = tree_batch(sizes, vocab, gen)
    logits = logits.to(dtype)
    prm = req(batch, gen)
    for explicit_u in (True, False):
        u = torch.rand(int(indptr[-1]), generator=gen) if explicit_u else None
        max_t = max(sizes) + 3
        cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, u, max_t)
        emu, used = both_schedules(emu_rs, logits, tokens, parents, indptr, None, prm, u, max_t,
                                   num_sms=num_sms)
        assert used == cluster
        for a, b in zip(cpu, emu):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape,cluster", CLUSTERS)
def test_chain_bit_exact_vs_cpu(shape, cluster):
    batch, vocab, num_sms = shape
    gen = torch.Generator().manual_seed(batch * 11 + vocab)
    sizes = [[5, 1, 3, 8][i % 4] for i in range(batch)]
    logits, tokens, parents, indptr = tree_batch(sizes, vocab, gen, chain=True)
    q = dyadic_q(logits, gen)
    prm = req(batch, gen)
    for explicit_u in (True, False):
        u = torch.rand(int(indptr[-1]), generator=gen) if explicit_u else None
        cpu = run_rs("cpu", logits, tokens, parents, indptr, q, prm, u, max(sizes))
        emu, used = both_schedules(emu_rs, logits, tokens, parents, indptr, q, prm, u,
                                   max(sizes), num_sms=num_sms)
        assert used == cluster
        for a, b in zip(cpu, emu):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n,vocab,num_sms,cluster", [(1, 40000, 132, 8), (3, 10000, 132, 2),
                                                     (17, 111, 132, 1), (40, 111, 132, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_bit_exact_vs_cpu(n, vocab, num_sms, cluster, dtype):
    gen = torch.Generator().manual_seed(n + vocab)
    logits, _, _, _ = tree_batch([1] * n, vocab, gen)
    logits = logits.to(dtype)
    prm = req(n, gen)
    for u in (torch.rand(n, generator=gen), None):
        ct, cp = run_sample("cpu", logits, prm, u)
        (et, ep), used = both_schedules(emu_sample, logits, prm, u, num_sms=num_sms)
        assert used == cluster
        assert torch.equal(ct, et) and torch.equal(cp, ep)


def test_uniform_extremes_and_residual_fallbacks_bit_exact():
    for args in uniform_extreme_cases(big_tree=16):
        for a, b in zip(run_rs("cpu", *args), emu_rs(*args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("batch,vocab", [(1, 20000), (3, 3000), (7, 111)])
def test_vs_reference_non_dyadic(batch, vocab):
    check_vs_reference_non_dyadic(batch, vocab, emu_rs, emu_sample)


def test_invalid_rows():
    check_invalid_rows(emu_rs, emu_sample)


def test_big_tree_needs_more_than_48k_shared_memory():
    """max_t = 1024 nodes: 60 B of dynamic shared memory per node (> 48 KB), the launcher must
    raise the kernel's limit; a 1000-node tree in one sequence, bit-exact vs the CPU."""
    gen = torch.Generator().manual_seed(8)
    sizes = [1000, 3]
    logits, tokens, parents, indptr = tree_batch(sizes, 64, gen)
    prm = req(2, gen, greedy_every=2)
    cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, None, 1024)
    emu = emu_rs(logits, tokens, parents, indptr, None, prm, None, 1024)
    assert sb.last_launch()["smem"] > 48 * 1024
    for a, b in zip(cpu, emu):
        assert torch.equal(a, b)


def crafted_sibling_case(vocab=64):
    """Node 0's children: A (outside the target's support: always rejected), then B (the only
    supported token: always accepted after A's removal). Node B's child carries B's token
    again, outside node B's support: rejected. The walk reads the rejected-siblings list of
    node 0 while checking B and then rewrites its first slot for node B: the kernel must order
    the two (a barrier) or threads disagree on whether B was a duplicate."""
    A, B, D = 5, 9, 17
    logits = torch.full((4, vocab), NEG_INF)
    logits[0, B] = 0.0
    logits[1, 3] = 0.0
    logits[2, D] = 0.0
    logits[3, 4] = 0.0
    tokens = torch.tensor([1, A, B, B], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 2], dtype=torch.int32)
    indptr = torch.tensor([0, 4], dtype=torch.int32)
    prm = [torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]),
           torch.tensor([7], dtype=torch.int64), torch.tensor([0], dtype=torch.int64)]
    return logits, tokens, parents, indptr, prm


@pytest.mark.parametrize("vocab", [64, 10000])
def test_rejected_sibling_then_accepted_then_rejected_child(vocab):
    logits, tokens, parents, indptr, prm = crafted_sibling_case(vocab)
    cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, None, 4)
    assert cpu[0][0].tolist()[:2] == [9, 17] and int(cpu[2][0]) == 1
    for schedule in ("in_order", "reversed", "random"):
        emu = emu_rs(logits, tokens, parents, indptr, None, prm, None, 4, schedule=schedule)
        for a, b in zip(cpu, emu):
            assert torch.equal(a, b), schedule
