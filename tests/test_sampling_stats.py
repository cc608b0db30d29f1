"""Losslessness of verification, statistically (CPU op, Philox randomness).

Each test builds a small "target model" over a vocab of V tokens: a root distribution
``p0 = processed(root_logits)`` and, for every first token ``x1``, a conditional
``p(. | x1) = processed(cond_logits[x1])``. One op call verifies B independent copies of the
same speculation step (copy b has seed ``base + b``), so thousands of draws are cheap. The first
emitted token must be distributed as ``p0`` and the (first, second) pair as
``p0(x1) p(x2 | x1)``; when a step emits a single token the second one is drawn from the exact
conditional in Python (the next step would draw it), which keeps the pair test well defined.
Chi-square goodness of fit, bins with expected count < 5 merged. False-failure rate: ALPHA per
test function, Bonferroni-split over its parametrization and over the two checks of a case.
The inputs are fixed (seeded), so the outcome is deterministic; the rate is what a fresh
seed would give. ``test_power_*`` show the same check rejects wrong samplers.
"""
from __future__ import annotations

import pytest
import torch

import specrt._C  # noqa: F401
from specrt import reference as R

scipy_stats = pytest.importorskip("scipy.stats")

OPS = torch.ops.specrt
ALPHA = 1e-4
V = 12
B = 20000
NEG_INF = float("-inf")

TEMPS = [0.5, 1.0]
FILTERS = [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.8)]
N_CHAIN_CASES = len(TEMPS) * len(FILTERS) + 4
N_TREE_CASES = len(TEMPS) * len(FILTERS) + 3
ALPHA_CHAIN = ALPHA / (2 * N_CHAIN_CASES)
ALPHA_TREE = ALPHA / (2 * N_TREE_CASES)


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit of integer ``counts`` to ``probs`` (float64, same shape)."""
    counts = counts.flatten().double()
    expected = probs.flatten().double() * counts.sum()
    assert float(counts[expected == 0].sum()) == 0, "a zero-probability outcome was emitted"
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().reshape(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    if float(exp[-1]) < 5:  # fold the small remainder into the smallest kept bin
        i = int(torch.argmin(exp[:-1]))
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    if obs.numel() < 2:
        return 1.0
    return float(scipy_stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def processed(row, t, k, tp):
    p, _ = R._processed_row(row, t, k, tp)
    return p


class Model:
    def __init__(self, root_logits, cond_logits, t, k, tp):
        self.root_logits, self.cond_logits = root_logits, cond_logits
        self.t, self.k, self.tp = t, k, tp
        self.p0 = processed(root_logits, t, k, tp)
        self.cond = torch.stack([processed(cond_logits[x], t, k, tp) for x in range(V)])
        self.joint = self.p0[:, None] * self.cond

    def params(self, base_seed):
        return (torch.full((B,), self.t), torch.full((B,), self.k, dtype=torch.int32),
                torch.full((B,), self.tp), base_seed + torch.arange(B, dtype=torch.int64),
                torch.full((B,), 977, dtype=torch.int64))


def run_and_check(model, logits, tokens, parents, q, t_nodes, base_seed, alpha, gen,
                  device="cpu"):
    indptr = torch.arange(0, B * t_nodes + 1, t_nodes, dtype=torch.int32)
    out_t = torch.empty(B, t_nodes, dtype=torch.int32, device=device)
    out_p = torch.empty(B, t_nodes, dtype=torch.int32, device=device)
    out_n = torch.empty(B, dtype=torch.int32, device=device)
    args = [logits, tokens, parents, indptr, q, *model.params(base_seed)]
    args = [a.to(device) if a is not None else None for a in args]
    OPS.rejection_sample(*args, None, out_t, out_p, out_n)
    out_t, out_n = out_t.cpu(), out_n.cpu()
    assert (out_n >= 0).all()
    first = out_t[:, 0].long()
    second = out_t[:, 1].long().clone()
    single = out_n == 0
    if single.any():
        second[single] = torch.multinomial(model.cond[first[single]], 1, generator=gen).flatten()
    c1 = torch.bincount(first, minlength=V)
    c2 = torch.bincount(first * V + second, minlength=V * V)
    p1 = chi2_pvalue(c1, model.p0)
    p2 = chi2_pvalue(c2, model.joint)
    assert p1 > alpha and p2 > alpha, (p1, p2, alpha)
    return out_n


# ---------------------------------------------------------------------------------------------
# chains with draft probabilities
# ---------------------------------------------------------------------------------------------


def chain_case(model, q0, q1, gen, base_seed, alpha, device="cpu"):
    """Chain root -> d1 -> d2 with d1 ~ q0 and d2 ~ q1[d1] (the draft's conditional)."""
    d1 = torch.multinomial(q0.expand(B, V), 1, replacement=True, generator=gen).flatten()
    d2 = torch.multinomial(q1[d1], 1, generator=gen).flatten()
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), d1, d2], 1).int().flatten()
    third = torch.randn(V, generator=gen)
    logits = torch.stack([model.root_logits.expand(B, V), model.cond_logits[d1],
                          third.expand(B, V)], 1).reshape(B * 3, V)
    q = torch.stack([q0.expand(B, V), q1[d1], torch.zeros(B, V)], 1).reshape(B * 3, V).float()
    parents = torch.tensor([-1, 0, 1], dtype=torch.int32).repeat(B)
    return run_and_check(model, logits, tokens, parents, q, 3, base_seed, alpha, gen, device)


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("k,tp", FILTERS)
def test_chain_lossless(t, k, tp):
    gen = torch.Generator().manual_seed(int(100 * t) + 10 * k + int(10 * tp))
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5,
                  t, k, tp)
    q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, 0).double()
    q1 = torch.softmax(torch.randn(V, V, generator=gen) * 1.5, 1).double()
    n = chain_case(model, q0, q1, gen, 1000, ALPHA_CHAIN)
    assert (n == 0).any() and (n >= 1).any()  # both outcomes exercised


@pytest.mark.parametrize("case", ["p_eq_q", "disjoint", "q_zero_where_p_positive", "one_hot"])
def test_chain_lossless_adversarial(case):
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    root = torch.randn(V, generator=gen)
    cond = torch.randn(V, V, generator=gen)
    if case == "disjoint":
        root[V // 2:] = NEG_INF
        cond[:, V // 2:] = NEG_INF
    model = Model(root, cond, 1.0, 0, 1.0)
    if case == "p_eq_q":
        q0, q1 = model.p0.clone(), model.cond.clone()
    elif case == "disjoint":
        q0 = torch.zeros(V, dtype=torch.float64)
        q0[V // 2:] = 2.0 / V
        q1 = q0.expand(V, V).clone()
    elif case == "q_zero_where_p_positive":
        q0 = torch.softmax(torch.randn(V, generator=gen), 0).double()
        q0[:3] = 0
        q0 /= q0.sum()
        q1 = torch.softmax(torch.randn(V, V, generator=gen), 1).double()
        q1[:, 5:8] = 0
        q1 /= q1.sum(1, keepdim=True)
    else:  # one-hot drafts (a greedy draft model)
        q0 = torch.zeros(V, dtype=torch.float64)
        q0[3] = 1.0
        q1 = torch.zeros(V, V, dtype=torch.float64)
        q1[torch.arange(V), (torch.arange(V) * 5) % V] = 1.0
    chain_case(model, q0, q1, gen, 5000, ALPHA_CHAIN)


# ---------------------------------------------------------------------------------------------
# trees of deterministic drafts
# ---------------------------------------------------------------------------------------------


def tree_case(model, parents, tokens, gen, base_seed, alpha, device="cpu"):
    """A fixed tree (deterministic drafts); node with token x at depth >= 1 has row
    cond_logits[x] (its depth-1 ancestor decides the conditional; deeper rows are arbitrary)."""
    t_nodes = len(parents)
    rows = [model.root_logits] + [model.cond_logits[x] for x in tokens[1:]]
    logits = torch.stack(rows).repeat(B, 1)
    tok = torch.tensor(tokens, dtype=torch.int32).repeat(B)
    par = torch.tensor(parents, dtype=torch.int32).repeat(B)
    return run_and_check(model, logits, tok, par, None, t_nodes, base_seed, alpha, gen, device)


def random_tree(gen, t_nodes):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t_nodes)]
    tokens = [0] + [int(torch.randint(0, V, (1,), generator=gen)) for _ in range(1, t_nodes)]
    return parents, tokens


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("k,tp", FILTERS)
def test_tree_lossless(t, k, tp):
    gen = torch.Generator().manual_seed(7 + int(100 * t) + 10 * k + int(10 * tp))
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5,
                  t, k, tp)
    # Root with 4 children (a sibling set: the likely tokens first), plus random subtrees.
    order = torch.argsort(model.p0, descending=True).tolist()
    parents = [-1, 0, 0, 0, 0, 1, 1, 2, 5]
    tokens = [0, order[0], order[1], order[3], order[6], 1, 2, 3, 4]
    n = tree_case(model, parents, tokens, gen, 2000, ALPHA_TREE)
    assert (n >= 1).any()
    if int((model.p0 > 0).sum()) > 4:  # some mass outside the drafted siblings
        assert (n == 0).any()


@pytest.mark.parametrize("case", ["random_tree", "siblings_cover_support", "duplicate_siblings"])
def test_tree_lossless_adversarial(case):
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    root = torch.randn(V, generator=gen) * 2
    if case == "siblings_cover_support":
        root[4:] = NEG_INF  # support {0, 1, 2, 3}, every token drafted: residual can vanish
    model = Model(root, torch.randn(V, V, generator=gen) * 2, 1.0, 0, 1.0)
    if case == "random_tree":
        parents, tokens = random_tree(gen, 16)
    elif case == "siblings_cover_support":
        parents, tokens = [-1, 0, 0, 0, 0, 0, 1], [0, 3, 7, 1, 0, 2, 5]
    else:
        parents, tokens = [-1, 0, 0, 0, 0, 2], [0, 5, 5, 2, 5, 9]
    tree_case(model, parents, tokens, gen, 3000, ALPHA_TREE)


# ---------------------------------------------------------------------------------------------
# power: the same checks reject wrong samplers
# ---------------------------------------------------------------------------------------------


def test_power_chain_without_residual():
    """Accept with min(1, p/q) but resample from p (not max(0, p - q)) after a rejection."""
    gen = torch.Generator().manual_seed(99)
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), 1.0, 0,
                  1.0)
    q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, 0).double()
    d1 = torch.multinomial(q0.expand(B, V), 1, replacement=True, generator=gen).flatten()
    u = torch.rand(B, generator=gen, dtype=torch.float64)
    accept = u * q0[d1] < model.p0[d1]
    resample = torch.multinomial(model.p0.expand(B, V), 1, replacement=True,
                                 generator=gen).flatten()
    first = torch.where(accept, d1, resample)
    assert chi2_pvalue(torch.bincount(first, minlength=V), model.p0) < ALPHA_CHAIN


def test_power_tree_without_sibling_removal():
    """Recursive rejection that forgets to remove the tried siblings from the residual."""
    gen = torch.Generator().manual_seed(98)
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), 1.0, 0,
                  1.0)
    children = torch.argsort(model.p0, descending=True)[:3]
    first = torch.full((B,), -1, dtype=torch.long)
    for x in children.tolist():
        u = torch.rand(B, generator=gen, dtype=torch.float64)
        take = (first < 0) & (u < model.p0[x])
        first[take] = x
    r = model.p0.clone()  # the bug: r is not reduced by the rejected children
    rest = first < 0
    first[rest] = torch.multinomial(r.expand(int(rest.sum()), V), 1, replacement=True,
                                    generator=gen).flatten()
    assert chi2_pvalue(torch.bincount(first, minlength=V), model.p0) < ALPHA_TREE


def test_power_op_with_mismatched_draft_probs():
    """A proposer that samples drafts from one distribution but reports another is lossy."""
    gen = torch.Generator().manual_seed(97)
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), 1.0, 0,
                  1.0)
    q_true = torch.softmax(torch.randn(V, generator=gen) * 2, 0).double()
    q_claimed = torch.full((V,), 1.0 / V, dtype=torch.float64)
    d1 = torch.multinomial(q_true.expand(B, V), 1, replacement=True, generator=gen).flatten()
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), d1], 1).int().flatten()
    logits = torch.stack([model.root_logits.expand(B, V), model.cond_logits[d1]],
                         1).reshape(2 * B, V)
    q = torch.stack([q_claimed.expand(B, V), torch.zeros(B, V, dtype=torch.float64)],
                    1).reshape(2 * B, V).float()
    parents = torch.tensor([-1, 0], dtype=torch.int32).repeat(B)
    indptr = torch.arange(0, 2 * B + 1, 2, dtype=torch.int32)
    out_t = torch.empty(B, 2, dtype=torch.int32)
    out_p = torch.empty(B, 2, dtype=torch.int32)
    out_n = torch.empty(B, dtype=torch.int32)
    OPS.rejection_sample(logits, tokens, parents, indptr, q, *model.params(4000), None, out_t,
                         out_p, out_n)
    first = out_t[:, 0].long()
    assert chi2_pvalue(torch.bincount(first, minlength=V), model.p0) < ALPHA_CHAIN
