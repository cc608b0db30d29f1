"""CPU ops torch.ops.specrt.{rejection_sample, sample} vs specrt/reference.py (docs/ops.md, 3).

Exactness policy. The reference computes in fp64, the kernels compute weights in fp32 (sums in
fp64), so a decision whose two sides are within rounding of each other may legitimately go
either way. The reference records the margin of every decision it takes (distance to the
boundary in probability units); a sequence / row is compared token for token only when all its
margins exceed ``EPS`` (and each test asserts that most of them do, so the test cannot pass
vacuously). Inputs built from logits in {0, -inf} (dyadic weights) and greedy requests are
exact by construction and always compared in full.
"""
from __future__ import annotations

import math

import pytest
import torch

import specrt._C  # noqa: F401  (registers torch.ops.specrt.*)
from specrt import reference as R

EPS = 1e-5
OPS = torch.ops.specrt
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def random_parents(t, gen):
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]


def chain_parents(t):
    return [-1] + list(range(t - 1))


def req_params(temps, top_ks=None, top_ps=None, seeds=None, offsets=None):
    n = len(temps)
    return dict(
        temperature=torch.tensor(temps, dtype=torch.float32),
        top_k=torch.tensor(top_ks if top_ks is not None else [0] * n, dtype=torch.int32),
        top_p=torch.tensor(top_ps if top_ps is not None else [1.0] * n, dtype=torch.float32),
        seed=torch.tensor(seeds if seeds is not None else [1234 + 7 * i for i in range(n)],
                          dtype=torch.int64),
        offset=torch.tensor(offsets if offsets is not None else [i * 3 for i in range(n)],
                            dtype=torch.int64),
    )


def run_rs(logits, draft_tokens, parents, indptr, draft_probs, prm, uniforms=None, max_t=None,
           poison=-7):
    bsz = indptr.numel() - 1
    if max_t is None:
        max_t = int((indptr[1:] - indptr[:-1]).max()) if bsz else 1
    out_t = torch.full((bsz, max_t), poison, dtype=torch.int32)
    out_p = torch.full((bsz, max_t), poison, dtype=torch.int32)
    out_n = torch.full((bsz,), poison, dtype=torch.int32)
    OPS.rejection_sample(logits, draft_tokens, parents, indptr, draft_probs, prm["temperature"],
                         prm["top_k"], prm["top_p"], prm["seed"], prm["offset"], uniforms, out_t,
                         out_p, out_n)
    return out_t, out_p, out_n


def ref_rs(logits, draft_tokens, parents, indptr, draft_probs, prm, uniforms=None, max_t=None):
    return R._rejection_sample_impl(logits, draft_tokens, parents, indptr, draft_probs,
                                    prm["temperature"], prm["top_k"], prm["top_p"], prm["seed"],
                                    prm["offset"], uniforms, max_t)


def run_sample(logits, prm, uniforms=None, with_probs=True):
    n, v = logits.shape
    tok = torch.full((n,), -7, dtype=torch.int32)
    probs = torch.full((n, v), -7.0) if with_probs else None
    OPS.sample(logits, prm["temperature"], prm["top_k"], prm["top_p"], prm["seed"],
               prm["offset"], uniforms, tok, probs)
    return tok, probs


def check_invariants(tokens, path, num, draft_tokens, parents, indptr, vocab):
    """-1 after the end, emitted = accepted + 1, path is a root-to-node path of the tree."""
    for b in range(indptr.numel() - 1):
        lo, hi = int(indptr[b]), int(indptr[b + 1])
        n = int(num[b])
        if n == -1:
            assert (tokens[b] == -1).all() and (path[b] == -1).all()
            continue
        assert 0 <= n <= hi - lo - 1
        assert int(path[b, 0]) == 0
        for j in range(1, n + 1):
            node = int(path[b, j])
            assert 0 < node < hi - lo
            assert int(parents[lo + node]) == int(path[b, j - 1]), "path is not a tree path"
            assert int(tokens[b, j - 1]) == int(draft_tokens[lo + node])
        assert 0 <= int(tokens[b, n]) < vocab
        assert (tokens[b, n + 1:] == -1).all() and (path[b, n + 1:] == -1).all()


def compare_rs(out, ref, min_safe_frac=0.75):
    (ot, op, on), (rt, rp, rn, margin) = out, ref
    safe = margin > EPS
    assert int(safe.sum()) >= math.floor(min_safe_frac * safe.numel()), margin
    torch.testing.assert_close(ot[safe], rt[safe], rtol=0, atol=0)
    torch.testing.assert_close(op[safe], rp[safe], rtol=0, atol=0)
    torch.testing.assert_close(on[safe], rn[safe], rtol=0, atol=0)


def make_tree_batch(sizes, vocab, temps, gen, scale=3.0, tree=True):
    """Random trees whose drafts are plausible under the target (so walks go deep)."""
    parents, indptr = [], [0]
    for t in sizes:
        parents += random_parents(t, gen) if tree else chain_parents(t)
        indptr.append(indptr[-1] + t)
    total = indptr[-1]
    logits = torch.randn(total, vocab, generator=gen) * scale
    tokens = torch.randint(0, vocab, (total,), generator=gen, dtype=torch.int32)
    for b, t in enumerate(sizes):
        lo = indptr[b]
        for i in range(1, t):
            row = logits[lo + parents[lo + i]]
            mode = int(torch.randint(0, 3, (1,), generator=gen))
            if mode == 0:
                tokens[lo + i] = int(torch.argmax(row))
            elif mode == 1:
                tt = temps[b] if temps[b] > 0 else 1.0
                tokens[lo + i] = int(torch.multinomial(torch.softmax(row / tt, 0), 1, generator=gen))
    return (logits, tokens, torch.tensor(parents, dtype=torch.int32),
            torch.tensor(indptr, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------


def test_philox_known_answers():
    # Random123 tests/kat_vectors, "philox4x32 10" lines: counter, key -> 4 output words.
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        assert R._philox4x32_10(ctr, key) == want
    assert R.philox_uniform(0, 0, 0) == (0x6627E8D5 >> 8) * 2.0**-24
    # seed -> key words, offset -> counter words 0/1, idx -> counter word 2 (two's complement)
    x = R._philox4x32_10((0x9ABCDEF0, 0x12345678, 5, 0), (0xFFFFFFFF, 0xFFFFFFFF))
    assert R.philox_uniform(-1, 0x123456789ABCDEF0, 5) == (x[0] >> 8) * 2.0**-24


def test_philox_stream_matches_op():
    # Uniform distribution over 2^12 tokens: the drawn token is floor(u * 2^12) exactly, which
    # exposes the top 12 bits of the kernel's Philox uniform for every (seed, offset).
    v = 4096
    n = 64
    logits = torch.zeros(n, v)
    seeds = [(-1) ** i * (i * 0x9E3779B97F4A7C15 % (1 << 62)) for i in range(n)]
    offsets = [i * 1000003 + (1 << 40) * (i % 3) for i in range(n)]
    prm = req_params([1.0] * n, seeds=seeds, offsets=offsets)
    tok, _ = run_sample(logits, prm)
    want = [math.floor(R.philox_uniform(s, o, 0) * v) for s, o in zip(seeds, offsets)]
    assert tok.tolist() == want


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,vocab", [(1, 111), (3, 111), (17, 111), (3, 32000), (1, 151936)])
@pytest.mark.parametrize("explicit_u", [False, True])
def test_sample_vs_reference(batch, vocab, explicit_u):
    gen = torch.Generator().manual_seed(batch * 1000 + vocab + explicit_u)
    logits = torch.randn(batch, vocab, generator=gen) * 2.5
    temps = [[1.0, 0.5, 0.0, 0.8][i % 4] for i in range(batch)]
    top_ks = [[0, 7, 0, vocab + 5, 1][i % 5] for i in range(batch)]
    top_ps = [[1.0, 0.9, 0.5, 1.0, 0.2, 0.05][i % 6] for i in range(batch)]
    prm = req_params(temps, top_ks, top_ps)
    u = torch.rand(batch, generator=gen) if explicit_u else None
    tok, probs = run_sample(logits, prm, u)
    rt, rp, margin = R._sample_impl(logits, prm["temperature"], prm["top_k"], prm["top_p"],
                                    prm["seed"], prm["offset"], u)
    safe = margin > EPS
    assert int(safe.sum()) >= math.floor(0.75 * batch)
    assert tok[safe].tolist() == rt[safe].tolist()
    # fp32 weights vs fp64: relative error of exp and of the normaliser.
    torch.testing.assert_close(probs[safe], rp[safe], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sample_dtypes_and_dyadic_exact(dtype):
    # Logits in {0, -inf} with supports of 2^k tokens: probabilities are dyadic, so tokens and
    # probabilities must match the reference exactly in every dtype.
    gen = torch.Generator().manual_seed(3)
    n, v = 17, 111
    logits = torch.full((n, v), NEG_INF)
    for i in range(n):
        support = torch.randperm(v, generator=gen)[: 2 ** (i % 6)]
        logits[i, support] = 0.0
    logits = logits.to(dtype)
    prm = req_params([1.0 if i % 3 else 0.5 for i in range(n)])
    u = torch.rand(n, generator=gen)
    u[0], u[1] = 0.0, 1.0 - 2.0**-24
    tok, probs = run_sample(logits, prm, u)
    rt, rp = R.sample(logits, prm["temperature"], prm["top_k"], prm["top_p"], prm["seed"],
                      prm["offset"], u)
    assert tok.tolist() == rt.tolist()
    assert torch.equal(probs, rp)


def test_sample_half_logits_match_float():
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(9, 300, generator=gen) * 3).to(torch.float16)
    prm = req_params([1.0, 0.7, 0.0] * 3, [0, 10, 0] * 3, [1.0, 0.9, 1.0] * 3)
    u = torch.rand(9, generator=gen)
    a, pa = run_sample(logits, prm, u)
    b, pb = run_sample(logits.float(), prm, u)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    c, pc = run_sample(logits.to(torch.bfloat16), prm, u)
    d, pd = run_sample(logits.to(torch.bfloat16).float(), prm, u)
    assert torch.equal(c, d) and torch.equal(pc, pd)


def test_sample_without_probs_and_strided_logits():
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(5, 2 * 64, generator=gen)
    logits = big[:, :64]  # row stride 128
    prm = req_params([1.0] * 5)
    tok, _ = run_sample(logits, prm, with_probs=False)
    tok2, _ = run_sample(logits.contiguous(), prm)
    assert torch.equal(tok, tok2)


def test_sample_edge_rules():
    v = 16
    # top-k with ties at the boundary keeps all tied tokens; top-k > V and top-k <= 0 are off.
    z = torch.tensor([[3.0, 1.0, 2.0, 2.0] + [0.0] * (v - 4)] * 5)
    prm = req_params([1.0] * 5, top_ks=[2, 3, v + 10, -1, 1], top_ps=[1.0] * 5)
    _, probs = run_sample(z, prm)
    kept = [True, False, True, True] + [False] * (v - 4)  # k = 2: 3, then 2 tied -> 3 kept
    assert (probs[0] > 0).tolist() == kept and (probs[1] > 0).tolist() == kept
    assert (probs[2] > 0).all() and (probs[3] > 0).all()
    assert probs[4, 0] == 1.0 and probs[4, 1:].sum() == 0  # top-k = 1 is greedy here
    # top-p: tiny keeps only the most likely level (ties included); 1.0 keeps everything.
    z2 = torch.tensor([[1.0, 5.0, 5.0, 0.0] + [-1.0] * (v - 4)] * 3)
    prm = req_params([1.0] * 3, top_ps=[1e-6, 0.0, 1.0])
    tok, probs = run_sample(z2, prm)
    assert probs[0].tolist() == [0.0, 0.5, 0.5] + [0.0] * (v - 3)
    assert probs[1].tolist() == probs[0].tolist()
    assert (probs[2] > 0).all()
    assert tok[0] in (1, 2) and tok[1] in (1, 2)
    # greedy: lowest index among tied maxima, one-hot probs.
    z3 = torch.tensor([[0.0, 7.0, 3.0, 7.0] + [0.0] * (v - 4)])
    tok, probs = run_sample(z3, req_params([0.0]))
    assert int(tok[0]) == 1 and probs[0, 1] == 1.0 and probs.sum() == 1.0
    # u = 0 picks the first supported token, u just below 1 the last one.
    z4 = torch.full((2, v), NEG_INF)
    z4[:, [3, 6, 9, 12]] = 0.0
    tok, _ = run_sample(z4, req_params([1.0, 1.0]), torch.tensor([0.0, 1.0 - 2.0**-24]))
    assert tok.tolist() == [3, 12]


def test_sample_invalid_rows():
    v = 20
    logits = torch.randn(5, v)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = NEG_INF
    logits[4, 0] = NEG_INF  # -inf entries alone are fine
    prm = req_params([1.0, 0.0, 1.0, 1.0, 0.0])
    tok, probs = run_sample(logits, prm)
    assert tok[:3].tolist() == [-1, -1, -1]
    assert (probs[:3] == 0).all()
    assert tok[3] >= 0 and tok[4] >= 0
    torch.testing.assert_close(probs[3].sum(), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# rejection_sample
# ---------------------------------------------------------------------------------------------

TREE_SIZES = [1, 2, 7, 64]


@pytest.mark.parametrize("batch,vocab", [(1, 111), (3, 111), (17, 111), (3, 32000), (1, 151936)])
@pytest.mark.parametrize("explicit_u", [False, True])
def test_tree_vs_reference(batch, vocab, explicit_u):
    gen = torch.Generator().manual_seed(17 * batch + vocab + explicit_u)
    if vocab > 100000:
        sizes = [7]
    elif vocab > 1000:
        sizes = [TREE_SIZES[i % 4] if TREE_SIZES[i % 4] < 64 else 16 for i in range(batch)]
    else:
        sizes = [TREE_SIZES[(i + batch) % 4] for i in range(batch)]
    temps = [[1.0, 0.0, 0.5, 1.0][(i + explicit_u) % 4] for i in range(batch)]
    top_ks = [[0, 0, 5, 0, 50][i % 5] for i in range(batch)]
    top_ps = [[1.0, 1.0, 1.0, 0.8, 0.95, 0.3][i % 6] for i in range(batch)]
    logits, tokens, parents, indptr = make_tree_batch(sizes, vocab, temps, gen)
    prm = req_params(temps, top_ks, top_ps)
    u = torch.rand(int(indptr[-1]), generator=gen) if explicit_u else None
    out = run_rs(logits, tokens, parents, indptr, None, prm, u)
    ref = ref_rs(logits, tokens, parents, indptr, None, prm, u)
    check_invariants(*out, tokens, parents, indptr, vocab)
    compare_rs(out, ref)


@pytest.mark.parametrize("batch,vocab,t", [(1, 111, 5), (3, 111, 7), (17, 111, 4), (3, 32000, 6)])
@pytest.mark.parametrize("explicit_u", [False, True])
def test_chain_with_draft_probs_vs_reference(batch, vocab, t, explicit_u):
    gen = torch.Generator().manual_seed(31 * batch + vocab + t + explicit_u)
    sizes = [t if i % 3 else max(1, t - 2 - i % 2) for i in range(batch)]
    temps = [[1.0, 0.7, 0.0, 1.0][i % 4] for i in range(batch)]
    top_ks = [[0, 0, 0, 20][i % 4] for i in range(batch)]
    top_ps = [[1.0, 0.9, 1.0, 1.0, 0.6][i % 5] for i in range(batch)]
    logits, _, parents, indptr = make_tree_batch(sizes, vocab, temps, gen, scale=2.0, tree=False)
    total = int(indptr[-1])
    # Draft distributions correlated with the target; drafts sampled from them.
    q = torch.softmax(logits / 1.5 + torch.randn(total, vocab, generator=gen), dim=-1)
    tokens = torch.zeros(total, dtype=torch.int32)
    for n in range(total):
        p = int(parents[n])
        if p >= 0:
            tokens[n] = int(torch.multinomial(q[n - 1], 1, generator=gen))
    prm = req_params(temps, top_ks, top_ps)
    u = torch.rand(total, generator=gen) if explicit_u else None
    out = run_rs(logits, tokens, parents, indptr, q, prm, u)
    ref = ref_rs(logits, tokens, parents, indptr, q, prm, u)
    check_invariants(*out, tokens, parents, indptr, vocab)
    compare_rs(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_exact_and_mixed_batch(dtype):
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 2, 7, 64, 7, 2, 64, 1, 7]
    temps = [0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0]
    vocab = 111
    logits, tokens, parents, indptr = make_tree_batch(sizes, vocab, temps, gen)
    logits = logits.to(dtype)
    prm = req_params(temps, [0, 3, 0, 0, 10, 0, 0, 0, 2], [1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0,
                                                           0.5, 1.0])
    out = run_rs(logits, tokens, parents, indptr, None, prm)
    rt, rp, rn, margin = ref_rs(logits, tokens, parents, indptr, None, prm)
    check_invariants(*out, tokens, parents, indptr, vocab)
    greedy = prm["temperature"] == 0
    assert torch.equal(out[0][greedy], rt[greedy]) and torch.equal(out[1][greedy], rp[greedy])
    assert torch.equal(out[2][greedy], rn[greedy])
    assert int(rn[greedy].max()) >= 2  # the trees were built so greedy walks go deep
    compare_rs(out, (rt, rp, rn, margin))
    # greedy requests ignore draft probabilities (even bogus ones) and uniforms
    q = torch.full((int(indptr[-1]), vocab), 0.5)
    g_idx = torch.nonzero(greedy).flatten()
    out2 = run_rs(logits, tokens, parents, indptr, None, prm, torch.rand(int(indptr[-1])))
    assert torch.equal(out2[0][greedy], rt[greedy])
    chain_sizes = [5, 3]
    lg2, tk2, par2, ip2 = make_tree_batch(chain_sizes, vocab, [0.0, 0.0], gen, tree=False)
    prm2 = req_params([0.0, 0.0])
    a = run_rs(lg2, tk2, par2, ip2, None, prm2)
    b = run_rs(lg2, tk2, par2, ip2, q[:8], prm2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    del g_idx


def test_single_root_equals_sample():
    gen = torch.Generator().manual_seed(12)
    b, v = 17, 111
    logits = torch.randn(b, v, generator=gen) * 2
    prm = req_params([1.0, 0.5, 0.0, 0.9] * 4 + [1.0], [0, 5, 0, 0] * 4 + [3],
                     [1.0, 1.0, 1.0, 0.7] * 4 + [0.5])
    indptr = torch.arange(b + 1, dtype=torch.int32)
    parents = torch.full((b,), -1, dtype=torch.int32)
    tokens = torch.full((b,), -1, dtype=torch.int32)  # root entries are ignored
    for q in (None, torch.softmax(torch.randn(b, v, generator=gen), -1)):
        ot, op, on = run_rs(logits, tokens, parents, indptr, q, prm)
        st, _ = run_sample(logits, prm)
        assert torch.equal(ot[:, 0], st) and (on == 0).all() and (op[:, 0] == 0).all()


def test_all_accepted_and_all_rejected():
    # Dyadic: each node's row is one-hot (logits {0, -inf}) at the token of its next node, so
    # every draft is accepted whatever the uniform; the bonus comes from the leaf's row.
    v, t, b = 64, 9, 3
    gen = torch.Generator().manual_seed(13)
    parents = torch.tensor(chain_parents(t) * b, dtype=torch.int32)
    indptr = torch.arange(0, b * t + 1, t, dtype=torch.int32)
    tokens = torch.randint(0, v, (b * t,), generator=gen, dtype=torch.int32)
    logits = torch.full((b * t, v), NEG_INF)
    for s in range(b):
        for i in range(t - 1):
            logits[s * t + i, tokens[s * t + i + 1]] = 0.0
        logits[s * t + t - 1, [1, 2, 3, 4]] = 0.0
    prm = req_params([1.0, 0.0, 0.3])
    q = torch.full((b * t, v), 1.0 / v)
    for draft_probs in (None, q):
        ot, op, on = run_rs(logits, tokens, parents, indptr, draft_probs, prm)
        assert on.tolist() == [t - 1] * b
        assert op.tolist() == [list(range(t))] * b
        for s in range(b):
            assert ot[s, : t - 1].tolist() == tokens[s * t + 1:(s + 1) * t].tolist()
            assert int(ot[s, t - 1]) in (1, 2, 3, 4)
    # All rejected: every draft token has target probability 0.
    tokens2 = tokens.clone()
    for s in range(b):
        for i in range(1, t):
            row = logits[s * t + i - 1]
            tokens2[s * t + i] = int(torch.nonzero(row == NEG_INF)[0])
    tree_parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 3, 3] * b, dtype=torch.int32)
    for par, draft_probs in ((parents, None), (parents, q), (tree_parents, None)):
        ot, op, on = run_rs(logits, tokens2, par, indptr, draft_probs, prm)
        assert on.tolist() == [0] * b
        assert (op[:, 1:] == -1).all() and (ot[:, 1:] == -1).all()
        for s in range(b):
            assert int(ot[s, 0]) == int(torch.nonzero(logits[s * t] == 0)[0])


def dyadic_row(v, support):
    row = torch.full((v,), NEG_INF)
    row[support] = 0.0
    return row


def test_chain_adversarial_pairs_exact():
    """p == q, disjoint supports, draft zero where target positive, one-hot drafts; dyadic."""
    v = 32
    sup_a = [2, 5, 11, 17]
    sup_b = [20, 21, 22, 23]
    p_a = dyadic_row(v, sup_a)
    qa = torch.zeros(v)
    qa[sup_a] = 0.25
    qb = torch.zeros(v)
    qb[sup_b] = 0.25
    q_zero_at_x = qa.clone()
    q_zero_at_x[5] = 0.0
    q_zero_at_x[2] = 0.5
    onehot = torch.zeros(v)
    onehot[11] = 1.0
    cases = [  # (q, draft token, uniforms [u0, u1]) ; target row 0 is p_a, row 1 p_b
        (qa, 5, [0.3, 0.999]),   # p == q: u * q < p for any u < 1 -> accepted
        (qa, 5, [0.3, 1.0]),     # p == q, forced reject: residual empty -> fallback to p
        (qb, 21, [0.6, 0.1]),    # disjoint supports: rejected, residual = p
        (q_zero_at_x, 5, [0.9, 0.999]),  # q[x] = 0 < p[x]: always accepted
        (onehot, 11, [0.7, 0.2]),  # one-hot draft: accept iff u < p[x] = 1/4 -> accepted
        (onehot, 11, [0.7, 0.3]),  # rejected; residual = p without token 11
    ]
    b = len(cases)
    logits = torch.stack([p_a, dyadic_row(v, [1, 3])] * b)
    q = torch.stack([c[0] for c in cases for _ in range(2)])
    tokens = torch.tensor([x for c in cases for x in (0, c[1])], dtype=torch.int32)
    u = torch.tensor([x for c in cases for x in c[2]], dtype=torch.float32)
    parents = torch.tensor([-1, 0] * b, dtype=torch.int32)
    indptr = torch.arange(0, 2 * b + 1, 2, dtype=torch.int32)
    prm = req_params([1.0] * b)
    ot, op, on = run_rs(logits, tokens, parents, indptr, q, prm, u)
    rt, rp, rn, _ = ref_rs(logits, tokens, parents, indptr, q, prm, u)
    assert torch.equal(ot, rt) and torch.equal(op, rp) and torch.equal(on, rn)
    assert on.tolist() == [1, 0, 0, 1, 1, 0]
    assert int(ot[1, 0]) == sup_a[int(0.3 * 4)]  # fallback draw from p with u0
    assert int(ot[2, 0]) == sup_a[int(0.6 * 4)]
    assert int(ot[5, 0]) in (2, 5, 17)  # residual of a one-hot draft excludes the draft
    assert ot[0, 1] in (1, 3)  # bonus from the child's row


def test_tree_sibling_residual_exact():
    # Root row uniform over 4 tokens; three children try tokens 0, 1, 2 in order. With
    # u = [u0, 0.9, 0.9, 0.9] each test fails (0.9 * sum(r) >= r[x]): r shrinks 4 -> 3 -> 2 -> 1
    # token, so the correction must be the untried token 3. A fourth child (token 3) would
    # then be accepted with certainty (r = {3}).
    v = 8
    logits = torch.stack([dyadic_row(v, [0, 1, 2, 3])] + [dyadic_row(v, [5])] * 4)
    parents = torch.tensor([-1, 0, 0, 0, 1], dtype=torch.int32)
    tokens = torch.tensor([7, 0, 1, 2, 6], dtype=torch.int32)
    indptr = torch.tensor([0, 5], dtype=torch.int32)
    prm = req_params([1.0])
    u = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.1])
    ot, op, on = run_rs(logits, tokens, parents, indptr, None, prm, u)
    assert on.tolist() == [0] and ot[0, 0] == 3
    parents2 = torch.tensor([-1, 0, 0, 0, 0], dtype=torch.int32)
    tokens2 = torch.tensor([7, 0, 1, 2, 3], dtype=torch.int32)
    ot, op, on = run_rs(logits, tokens2, parents2, indptr, None, prm, torch.tensor(
        [0.5, 0.9, 0.9, 0.9, 0.999]))
    assert on.tolist() == [1] and op[0, :2].tolist() == [0, 4] and ot[0, :2].tolist() == [3, 5]
    # every supported token tried and rejected (u >= 1): residual empty -> fall back to p_c
    parents3 = torch.tensor([-1, 0, 0, 0, 0], dtype=torch.int32)
    ot, op, on = run_rs(logits, tokens2, parents3, indptr, None, prm, torch.tensor(
        [0.6, 1.0, 1.0, 1.0, 1.0]))
    assert on.tolist() == [0] and ot[0, 0] == 2  # floor(0.6 * 4) of p_root
    # duplicate sibling tokens: the second copy has r[x] = 0 and is never accepted
    tokens4 = torch.tensor([7, 1, 1, 2, 3], dtype=torch.int32)
    ot, op, on = run_rs(logits, tokens4, parents2, indptr, None, prm, torch.tensor(
        [0.0, 0.99, 0.0, 0.99, 0.99]))
    rt, rp, rn, _ = ref_rs(logits, tokens4, parents2, indptr, None, prm, torch.tensor(
        [0.0, 0.99, 0.0, 0.99, 0.99]))
    assert torch.equal(ot, rt) and torch.equal(on, rn)
    assert int(op[0, 1]) != 2


def test_uniform_extremes_tree():
    gen = torch.Generator().manual_seed(21)
    v = 111
    sizes = [7, 7, 64, 2]
    temps = [1.0, 0.5, 1.0, 0.8]
    logits, tokens, parents, indptr = make_tree_batch(sizes, v, temps, gen)
    prm = req_params(temps, [0, 0, 9, 0], [1.0, 0.9, 1.0, 1.0])
    total = int(indptr[-1])
    for fill in (0.0, 1.0 - 2.0**-24):
        u = torch.full((total,), fill)
        out = run_rs(logits, tokens, parents, indptr, None, prm, u)
        ref = ref_rs(logits, tokens, parents, indptr, None, prm, u)
        check_invariants(*out, tokens, parents, indptr, v)
        compare_rs(out, ref, min_safe_frac=1.0)
        if fill == 0.0:  # u = 0 accepts the first child with positive probability
            assert (out[2] >= 1).all()


def test_invalid_logits_rows():
    gen = torch.Generator().manual_seed(22)
    v = 50
    sizes = [3, 3, 3, 3, 3]
    temps = [1.0, 0.0, 1.0, 1.0, 0.0]
    logits, tokens, parents, indptr = make_tree_batch(sizes, v, temps, gen, tree=False)
    logits[1, 4] = float("nan")     # seq 0, node 1
    logits[3 + 2, 0] = float("inf")  # seq 1 (greedy), node 2
    logits[6] = NEG_INF             # seq 2, root all -inf
    logits[9 + 2, :] = -1e30        # seq 3: finite, fine
    logits[12 + 0, 7] = float("nan")  # seq 4 (greedy)
    prm = req_params(temps)
    for q in (None, torch.softmax(torch.randn(15, v, generator=gen), -1)):
        ot, op, on = run_rs(logits, tokens, parents, indptr, q, prm)
        assert on.tolist()[:3] == [-1, -1, -1] and on[4] == -1 and on[3] >= 0
        for s in (0, 1, 2, 4):
            assert (ot[s] == -1).all() and (op[s] == -1).all()
        rt, rp, rn, _ = ref_rs(logits, tokens, parents, indptr, q, prm)
        assert rn.tolist()[:3] == [-1, -1, -1] and rn[4] == -1


def test_max_t_larger_than_trees_and_empty_batch():
    gen = torch.Generator().manual_seed(23)
    logits, tokens, parents, indptr = make_tree_batch([2, 5], 30, [1.0, 0.0], gen)
    prm = req_params([1.0, 0.0])
    ot, op, on = run_rs(logits, tokens, parents, indptr, None, prm, max_t=12)
    rt, rp, rn, _ = ref_rs(logits, tokens, parents, indptr, None, prm, max_t=12)
    assert ot.shape == (2, 12)
    check_invariants(ot, op, on, tokens, parents, indptr, 30)
    out = run_rs(torch.zeros(0, 30), torch.zeros(0, dtype=torch.int32),
                 torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), None,
                 req_params([]), max_t=4)
    assert out[0].shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# opcheck and bad input
# ---------------------------------------------------------------------------------------------


def test_opcheck():
    gen = torch.Generator().manual_seed(24)
    logits, tokens, parents, indptr = make_tree_batch([3, 4], 40, [1.0, 0.0], gen)
    prm = req_params([1.0, 0.0], [0, 3], [0.9, 1.0])
    out_t = torch.empty(2, 4, dtype=torch.int32)
    out_p = torch.empty(2, 4, dtype=torch.int32)
    out_n = torch.empty(2, dtype=torch.int32)
    torch.library.opcheck(
        OPS.rejection_sample.default,
        (logits, tokens, parents, indptr, None, prm["temperature"], prm["top_k"], prm["top_p"],
         prm["seed"], prm["offset"], None, out_t, out_p, out_n))
    lg = torch.randn(3, 40, generator=gen)
    p3 = req_params([1.0, 0.5, 0.0])
    torch.library.opcheck(
        OPS.sample.default,
        (lg, p3["temperature"], p3["top_k"], p3["top_p"], p3["seed"], p3["offset"],
         torch.rand(3, generator=gen), torch.empty(3, dtype=torch.int32), torch.empty(3, 40)))


def _bad_rs(**over):
    gen = torch.Generator().manual_seed(25)
    logits, tokens, parents, indptr = make_tree_batch([3, 4], 40, [1.0, 1.0], gen)
    args = dict(logits=logits, tokens=tokens, parents=parents, indptr=indptr, q=None,
                prm=req_params([1.0, 1.0]), u=None, out_t=torch.full((2, 4), -7, dtype=torch.int32),
                out_p=torch.full((2, 4), -7, dtype=torch.int32),
                out_n=torch.full((2,), -7, dtype=torch.int32))
    args.update(over)
    return args


def _call_rs(a):
    p = a["prm"]
    OPS.rejection_sample(a["logits"], a["tokens"], a["parents"], a["indptr"], a["q"],
                         p["temperature"], p["top_k"], p["top_p"], p["seed"], p["offset"],
                         a["u"], a["out_t"], a["out_p"], a["out_n"])


@pytest.mark.parametrize("case", [
    "root_parent", "parent_ge_node", "parent_negative", "token_high", "token_negative",
    "indptr_decreasing", "indptr_empty_seq", "indptr_end", "indptr_start", "too_small_max_t",
    "out_rows", "dtype_tokens", "dtype_parents", "dtype_temperature", "dtype_seed",
    "dtype_logits", "dtype_out", "dtype_uniforms", "uniforms_shape", "q_not_chain", "q_dtype",
    "q_shape", "params_shape"])
def test_rejection_sample_bad_input(case):
    a = _bad_rs()
    if case == "root_parent":
        a["parents"] = torch.tensor([0, 0, 1, -1, 0, 0, 2], dtype=torch.int32)
    elif case == "parent_ge_node":
        a["parents"] = torch.tensor([-1, 0, 1, -1, 0, 2, 2], dtype=torch.int32)
    elif case == "parent_negative":
        a["parents"] = torch.tensor([-1, 0, 1, -1, 0, -1, 2], dtype=torch.int32)
    elif case == "token_high":
        a["tokens"] = a["tokens"].clone()
        a["tokens"][5] = 40
    elif case == "token_negative":
        a["tokens"] = a["tokens"].clone()
        a["tokens"][1] = -1
    elif case == "indptr_decreasing":
        a["indptr"] = torch.tensor([0, 5, 3], dtype=torch.int32)
    elif case == "indptr_empty_seq":
        a["indptr"] = torch.tensor([0, 0, 7], dtype=torch.int32)
    elif case == "indptr_end":
        a["indptr"] = torch.tensor([0, 3, 6], dtype=torch.int32)
    elif case == "indptr_start":
        a["indptr"] = torch.tensor([1, 3, 7], dtype=torch.int32)
    elif case == "too_small_max_t":
        a["out_t"] = torch.full((2, 3), -7, dtype=torch.int32)
        a["out_p"] = torch.full((2, 3), -7, dtype=torch.int32)
    elif case == "out_rows":
        a["out_n"] = torch.full((3,), -7, dtype=torch.int32)
    elif case == "dtype_tokens":
        a["tokens"] = a["tokens"].long()
    elif case == "dtype_parents":
        a["parents"] = a["parents"].long()
    elif case == "dtype_temperature":
        a["prm"]["temperature"] = a["prm"]["temperature"].double()
    elif case == "dtype_seed":
        a["prm"]["seed"] = a["prm"]["seed"].int()
    elif case == "dtype_logits":
        a["logits"] = a["logits"].double()
    elif case == "dtype_out":
        a["out_t"] = a["out_t"].long()
    elif case == "dtype_uniforms":
        a["u"] = torch.rand(7, dtype=torch.float64)
    elif case == "uniforms_shape":
        a["u"] = torch.rand(6)
    elif case == "q_not_chain":
        a["q"] = torch.full((7, 40), 1 / 40)
        a["parents"] = torch.tensor([-1, 0, 1, -1, 0, 0, 2], dtype=torch.int32)
    elif case == "q_dtype":
        a["q"] = torch.full((7, 40), 1 / 40, dtype=torch.float64)
        a["parents"] = torch.tensor([-1, 0, 1, -1, 0, 1, 2], dtype=torch.int32)
    elif case == "q_shape":
        a["q"] = torch.full((7, 39), 1 / 40)
        a["parents"] = torch.tensor([-1, 0, 1, -1, 0, 1, 2], dtype=torch.int32)
    elif case == "params_shape":
        a["prm"]["top_k"] = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError):
        _call_rs(a)
    # nothing written
    for name in ("out_t", "out_p", "out_n"):
        assert (a[name] == -7).all(), name


def test_rejection_sample_good_input_of_bad_suite_passes():
    # The fixture of the bad-input suite is itself valid (so the failures above are specific).
    a = _bad_rs()
    _call_rs(a)
    assert (a["out_n"] >= 0).all()
    a = _bad_rs(q=torch.full((7, 40), 1 / 40),
                parents=torch.tensor([-1, 0, 1, -1, 0, 1, 2], dtype=torch.int32))
    _call_rs(a)
    assert (a["out_n"] >= 0).all()


@pytest.mark.parametrize("case", ["logits_dtype", "tokens_dtype", "tokens_shape", "probs_shape",
                                  "probs_dtype", "uniforms_shape", "params_dtype", "logits_1d"])
def test_sample_bad_input(case):
    logits = torch.randn(3, 20)
    prm = req_params([1.0] * 3)
    tok = torch.full((3,), -7, dtype=torch.int32)
    probs = torch.full((3, 20), -7.0)
    u = None
    if case == "logits_dtype":
        logits = logits.double()
    elif case == "tokens_dtype":
        tok = torch.full((3,), -7, dtype=torch.int64)
    elif case == "tokens_shape":
        tok = torch.full((2,), -7, dtype=torch.int32)
    elif case == "probs_shape":
        probs = torch.full((3, 19), -7.0)
    elif case == "probs_dtype":
        probs = torch.full((3, 20), -7.0, dtype=torch.float64)
    elif case == "uniforms_shape":
        u = torch.rand(4)
    elif case == "params_dtype":
        prm["top_p"] = prm["top_p"].half()
    elif case == "logits_1d":
        logits = logits[0]
    with pytest.raises(RuntimeError):
        OPS.sample(logits, prm["temperature"], prm["top_k"], prm["top_p"], prm["seed"],
                   prm["offset"], u, tok, probs)
    assert (tok == -7).all() and (probs == -7).all()
