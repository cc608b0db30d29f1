"""CUDA ops torch.ops.specrt.{rejection_sample, sample} (docs/ops.md, 3).

- Bit-exact vs the CPU op on dyadic inputs (logits in {0, -inf}: every weight is 0 or 1, so
  every sum is exact in any order) with explicit uniforms and with Philox, across dtypes and
  batch sizes that select different cluster widths (batch 1 at vocab 151936 splits the vocab
  over 8 blocks).
- Non-dyadic inputs vs the reference where every decision is away from its boundary (see
  tests/test_sampling.py for the margin policy).
- Losslessness statistically (the chi-square checks of tests/test_sampling_stats.py, on GPU).
- CUDA-graph replay equals eager.
"""
from __future__ import annotations

import math

import pytest
import torch

import specrt._C  # noqa: F401
from specrt import reference as R
from specrt._ext import has_cuda_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not has_cuda_kernels(),
                       reason="needs a CUDA device and a CUDA build of specrt"),
]

OPS = torch.ops.specrt
NEG_INF = float("-inf")
EPS = 1e-5


def req(n, gen, greedy_every=4, filters=True):
    t = torch.tensor([0.0 if i % greedy_every == greedy_every - 1 else [1.0, 0.5, 0.8][i % 3]
                      for i in range(n)])
    k = torch.tensor([[0, 3, 0, 40, 1][i % 5] if filters else 0 for i in range(n)],
                     dtype=torch.int32)
    p = torch.tensor([[1.0, 1.0, 0.9, 0.5, 0.05][i % 5] if filters else 1.0 for i in range(n)])
    seed = torch.randint(-(2**62), 2**62, (n,), generator=gen, dtype=torch.int64)
    off = torch.randint(0, 2**40, (n,), generator=gen, dtype=torch.int64)
    return [t, k, p, seed, off]


def tree_batch(sizes, vocab, gen, chain=False, dyadic=True):
    parents, indptr = [], [0]
    for t in sizes:
        parents += [-1] + [(i - 1 if chain else int(torch.randint(0, i, (1,), generator=gen)))
                           for i in range(1, t)]
        indptr.append(indptr[-1] + t)
    total = indptr[-1]
    if dyadic:
        logits = torch.full((total, vocab), NEG_INF)
        for n in range(total):
            size = 2 ** int(torch.randint(0, 7, (1,), generator=gen))
            logits[n, torch.randperm(vocab, generator=gen)[:size]] = 0.0
    else:
        logits = torch.randn(total, vocab, generator=gen) * 3
    tokens = torch.randint(0, vocab, (total,), generator=gen, dtype=torch.int32)
    for b, t in enumerate(sizes):  # plausible drafts: mostly tokens in the parent's support
        lo = indptr[b]
        for i in range(1, t):
            if int(torch.randint(0, 4, (1,), generator=gen)):
                row = logits[lo + parents[lo + i]]
                top = torch.nonzero(row == row.max()).flatten()
                tokens[lo + i] = int(top[int(torch.randint(0, top.numel(), (1,), generator=gen))])
    return (logits, tokens, torch.tensor(parents, dtype=torch.int32),
            torch.tensor(indptr, dtype=torch.int32))


def dyadic_q(logits, gen):
    """Draft distributions with probabilities that are multiples of 2^-10."""
    total, vocab = logits.shape
    q = torch.zeros(total, vocab)
    for n in range(total):
        idx = torch.randint(0, vocab, (1024,), generator=gen)
        q[n] = torch.bincount(idx, minlength=vocab).float() / 1024
    return q


def run_rs(device, logits, tokens, parents, indptr, q, prm, u, max_t):
    b = indptr.numel() - 1
    out = [torch.full((b, max_t), -7, dtype=torch.int32, device=device),
           torch.full((b, max_t), -7, dtype=torch.int32, device=device),
           torch.full((b,), -7, dtype=torch.int32, device=device)]
    args = [logits, tokens, parents, indptr, q, *prm, u]
    args = [a.to(device) if a is not None else None for a in args]
    OPS.rejection_sample(*args, *out)
    return [o.cpu() for o in out]


def run_sample(device, logits, prm, u):
    n, v = logits.shape
    tok = torch.full((n,), -7, dtype=torch.int32, device=device)
    probs = torch.full((n, v), -7.0, device=device)
    args = [a.to(device) if a is not None else None for a in [logits, *prm, u]]
    OPS.sample(*args, tok, probs)
    return tok.cpu(), probs.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,vocab", [(1, 111), (3, 32000), (17, 111), (1, 151936),
                                         (17, 32000)])
@pytest.mark.parametrize("explicit_u", [True, False])
def test_tree_bit_exact_vs_cpu(dtype, batch, vocab, explicit_u):
    gen = torch.Generator().manual_seed(batch * 7 + vocab + explicit_u)
    sizes = [[1, 2, 7, 64][i % 4] for i in range(batch)]
    logits, tokens, parents, indptr = tree_batch(sizes, vocab, gen)
    logits = logits.to(dtype)
    prm = req(batch, gen)
    u = torch.rand(int(indptr[-1]), generator=gen) if explicit_u else None
    max_t = max(sizes) + 3
    cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, u, max_t)
    gpu = run_rs("cuda", logits, tokens, parents, indptr, None, prm, u, max_t)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch,vocab", [(1, 111), (3, 32000), (17, 111), (1, 151936)])
@pytest.mark.parametrize("explicit_u", [True, False])
def test_chain_bit_exact_vs_cpu(batch, vocab, explicit_u):
    gen = torch.Generator().manual_seed(batch * 11 + vocab + explicit_u)
    sizes = [[5, 1, 3, 8][i % 4] for i in range(batch)]
    logits, tokens, parents, indptr = tree_batch(sizes, vocab, gen, chain=True)
    q = dyadic_q(logits, gen)
    prm = req(batch, gen)
    u = torch.rand(int(indptr[-1]), generator=gen) if explicit_u else None
    cpu = run_rs("cpu", logits, tokens, parents, indptr, q, prm, u, max(sizes))
    gpu = run_rs("cuda", logits, tokens, parents, indptr, q, prm, u, max(sizes))
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,vocab", [(1, 151936), (3, 32000), (17, 111), (200, 111)])
def test_sample_bit_exact_vs_cpu(dtype, n, vocab):
    gen = torch.Generator().manual_seed(n + vocab)
    logits, _, _, _ = tree_batch([1] * n, vocab, gen)
    logits = logits.to(dtype)
    prm = req(n, gen)
    for u in (torch.rand(n, generator=gen), None):
        ct, cp = run_sample("cpu", logits, prm, u)
        gt, gp = run_sample("cuda", logits, prm, u)
        assert torch.equal(ct, gt) and torch.equal(cp, gp)


def uniform_extreme_cases(big_tree=64):
    """run_rs arguments (after the device) at the edges: uniforms 0, 1 - 2^-24 and 1 on trees,
    and p == q chains (forced rejection with u = 1: empty residual -> fallback to p). Shared
    with the emulated kernel's test (test_simt_sampling.py)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [7, 7, big_tree, 2, 5]
    logits, tokens, parents, indptr = tree_batch(sizes, 111, gen)
    prm = req(len(sizes), gen, greedy_every=100)
    total = int(indptr[-1])
    for fill in (0.0, 1.0 - 2.0**-24, 1.0):
        yield logits, tokens, parents, indptr, None, prm, torch.full((total,), fill), big_tree
    logits, tokens, parents, indptr = tree_batch([4, 4], 64, gen, chain=True)
    q = torch.softmax(logits, -1)  # equal to p exactly for dyadic logits
    for u in (torch.full((8,), 1.0), torch.rand(8, generator=gen)):
        yield logits, tokens, parents, indptr, q, [x[:2] for x in prm], u, 4


def test_uniform_extremes_and_residual_fallbacks_bit_exact():
    for args in uniform_extreme_cases():
        for a, b in zip(run_rs("cpu", *args), run_rs("cuda", *args)):
            assert torch.equal(a, b)


def check_vs_reference_non_dyadic(batch, vocab, rs, smp):
    """Non-dyadic logits vs the reference where every decision is away from its boundary; `rs`
    and `smp` run rejection_sample / sample on a device (run_rs / run_sample arguments after
    the device). Shared with the emulated kernel's test."""
    gen = torch.Generator().manual_seed(batch + vocab)
    sizes = [[7, 2, 16, 1][i % 4] for i in range(batch)]
    logits, tokens, parents, indptr = tree_batch(sizes, vocab, gen, dyadic=False)
    prm = req(batch, gen)
    dev = rs(logits, tokens, parents, indptr, None, prm, None, max(sizes))
    rt, rp, rn, margin = R._rejection_sample_impl(logits, tokens, parents, indptr, None, *prm)
    safe = margin > EPS
    assert int(safe.sum()) >= math.floor(0.75 * batch)
    assert torch.equal(dev[0][safe], rt[safe]) and torch.equal(dev[1][safe], rp[safe])
    assert torch.equal(dev[2][safe], rn[safe])
    st, sp, sm = R._sample_impl(logits[:batch], *prm, None)
    dt, dp = smp(logits[:batch], prm, None)
    ok = sm > EPS
    assert torch.equal(dt[ok], st[ok])
    torch.testing.assert_close(dp[ok], sp[ok], rtol=2e-5, atol=1e-7)


def check_invalid_rows(rs, smp):
    """NaN / +inf / all -inf rows: the sequence (row) yields -1 everywhere, like the CPU op;
    the valid sequence still verifies (non-dyadic: not compared bit for bit)."""
    gen = torch.Generator().manual_seed(6)
    logits, tokens, parents, indptr = tree_batch([3, 3, 3, 3], 50, gen, dyadic=False)
    logits[1, 4] = float("nan")
    logits[3 + 2, 0] = float("inf")
    logits[6] = NEG_INF
    prm = req(4, gen)
    dev = rs(logits, tokens, parents, indptr, None, prm, None, 5)
    cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, None, 5)
    assert dev[2][:3].tolist() == [-1, -1, -1] and int(dev[2][3]) >= 0
    for a, b in zip(cpu, dev):
        assert torch.equal(a[:3], b[:3]) and (b[:3] == -1).all()
    tok, probs = smp(logits[:4], req(4, gen), None)
    assert tok[1] == -1 and (probs[1] == 0).all()


def _cuda_rs(*args):
    return run_rs("cuda", *args)


def _cuda_sample(*args):
    return run_sample("cuda", *args)


@pytest.mark.parametrize("batch,vocab", [(1, 151936), (3, 32000), (17, 111)])
def test_vs_reference_non_dyadic(batch, vocab):
    check_vs_reference_non_dyadic(batch, vocab, _cuda_rs, _cuda_sample)


def test_invalid_rows_gpu():
    check_invalid_rows(_cuda_rs, _cuda_sample)


def test_cuda_graph_replay_equals_eager():
    gen = torch.Generator().manual_seed(7)
    sizes = [7, 64, 2, 5]
    logits, tokens, parents, indptr = tree_batch(sizes, 4096, gen, dyadic=False)
    prm = req(len(sizes), gen)
    dev = "cuda"
    args = [a.to(dev) for a in [logits, tokens, parents, indptr]]
    prm_d = [a.to(dev) for a in prm]
    outs = [torch.empty(4, 64, dtype=torch.int32, device=dev),
            torch.empty(4, 64, dtype=torch.int32, device=dev),
            torch.empty(4, dtype=torch.int32, device=dev)]
    OPS.rejection_sample(*args, None, *prm_d, None, *outs)
    eager = [o.clone() for o in outs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as torch recommends
        OPS.rejection_sample(*args, None, *prm_d, None, *outs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OPS.rejection_sample(*args, None, *prm_d, None, *outs)
    for o in outs:
        o.fill_(-9)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, outs):
        assert torch.equal(a, b)
    # new offsets through the same graph -> new draws, still equal to eager with those offsets
    prm_d[4].add_(1)
    graph.replay()
    replay2 = [o.clone() for o in outs]
    OPS.rejection_sample(*args, None, *prm_d, None, *outs)
    for a, b in zip(replay2, outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_lossless_statistics_gpu(kind):
    sts = pytest.importorskip("test_sampling_stats")
    gen = torch.Generator().manual_seed(8)
    model = sts.Model(torch.randn(sts.V, generator=gen) * 1.5,
                      torch.randn(sts.V, sts.V, generator=gen) * 1.5, 0.7, 5, 0.9)
    if kind == "chain":
        q0 = torch.softmax(torch.randn(sts.V, generator=gen) * 1.5, 0).double()
        q1 = torch.softmax(torch.randn(sts.V, sts.V, generator=gen) * 1.5, 1).double()
        sts.chain_case(model, q0, q1, gen, 123, sts.ALPHA / 2, device="cuda")
    else:
        order = torch.argsort(model.p0, descending=True).tolist()
        sts.tree_case(model, [-1, 0, 0, 0, 1, 1, 2], [0, order[0], order[1], order[2], 1, 2, 3],
                      gen, 321, sts.ALPHA / 2, device="cuda")


@pytest.mark.parametrize("vocab", [10000, 20000])
def test_two_and_four_block_clusters(vocab):
    """batch 1 at vocab 10000 (20000) splits the row over a cluster of 2 (4) blocks on a
    132-SM GPU (choose_cluster); bit-exact vs the CPU, trees and chains."""
    gen = torch.Generator().manual_seed(vocab)
    logits, tokens, parents, indptr = tree_batch([7], vocab, gen)
    prm = req(1, gen)
    for u in (None, torch.rand(7, generator=gen)):
        cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, u, 9)
        gpu = run_rs("cuda", logits, tokens, parents, indptr, None, prm, u, 9)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b)
    logits, tokens, parents, indptr = tree_batch([6], vocab, gen, chain=True)
    q = dyadic_q(logits, gen)
    cpu = run_rs("cpu", logits, tokens, parents, indptr, q, prm, None, 6)
    gpu = run_rs("cuda", logits, tokens, parents, indptr, q, prm, None, 6)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b)


def test_tree_above_48k_shared_memory():
    """max_t = 1024: the per-node statistics need > 48 KB of dynamic shared memory."""
    gen = torch.Generator().manual_seed(8)
    logits, tokens, parents, indptr = tree_batch([1000, 3], 64, gen)
    prm = req(2, gen, greedy_every=2)
    cpu = run_rs("cpu", logits, tokens, parents, indptr, None, prm, None, 1024)
    gpu = run_rs("cuda", logits, tokens, parents, indptr, None, prm, None, 1024)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b)
