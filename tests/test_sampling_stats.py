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
seed would give.

``test_power_*`` run the CPU op (``specrt.ops.rejection_sample`` / ``sample``, or the same
torch op directly, as the lossless tests do) the way a deliberately wrong sampler would -- fed
a wrongly processed distribution (temperature applied twice, an off-by-one top-k, top-p
dropping its boundary token), or composed into a sampler with a known bug -- and show that the
same check, at the same alpha, rejects it, next to the correct run of the same inputs, which
passes. Each states its false-failure rate (the correct run failing) and the power of the check
against that bug: the probability that it rejects, from the noncentral chi-square
approximation (:func:`chi2_power`, first-token check alone, with the bins merged as
:func:`chi2_pvalue` merges them; the pair check only adds to it), which the test also asserts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import specrt._C  # noqa: F401
from specrt import ops
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


def bin_groups(probs, n):
    """Bins of the chi-square test: every outcome with expected count ``n * p >= 5`` alone, the
    rest pooled; a pool expecting < 5 is folded into the smallest kept bin. Index lists."""
    probs = probs.flatten().double()
    expected = probs * n
    kept = [[i] for i in torch.nonzero(expected >= 5).flatten().tolist()]
    rest = torch.nonzero(expected < 5).flatten().tolist()
    if rest:
        if float(expected[rest].sum()) >= 5 or not kept:
            kept.append(rest)
        else:
            i = min(range(len(kept)), key=lambda j: float(expected[kept[j]].sum()))
            kept[i] = kept[i] + rest
    return kept


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit of integer ``counts`` to ``probs`` (float64, same shape)."""
    counts = counts.flatten().double()
    probs = probs.flatten().double()
    n = float(counts.sum())
    assert float(counts[probs == 0].sum()) == 0, "a zero-probability outcome was emitted"
    groups = bin_groups(probs, n)
    if len(groups) < 2:
        return 1.0
    obs = torch.stack([counts[g].sum() for g in groups])
    exp = torch.stack([probs[g].sum() * n for g in groups])
    return float(scipy_stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def chi2_power(p_true, p_wrong, n, alpha):
    """Probability that :func:`chi2_pvalue` of ``n`` draws from ``p_wrong`` against ``p_true``
    is below ``alpha``: the noncentral chi-square approximation (noncentrality
    ``n * sum (w - t)^2 / t`` over the merged bins, ``bins - 1`` degrees of freedom). Draws on
    outcomes impossible under ``p_true`` fail the test outright; that chance is included."""
    pt, pw = p_true.flatten().double(), p_wrong.flatten().double()
    groups = bin_groups(pt, n)
    bt = torch.stack([pt[g].sum() for g in groups])
    bw = torch.stack([pw[g].sum() for g in groups])
    df = len(groups) - 1
    lam = float(n * ((bw - bt) ** 2 / bt).sum())
    power = float(scipy_stats.ncx2.sf(scipy_stats.chi2.isf(alpha, df), df, lam)) if df else 0.0
    impossible = float(pw[pt == 0].sum())
    return 1 - (1 - power) * (1 - impossible) ** n


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


@dataclass
class Outcome:
    num_accepted: torch.Tensor  # [B]
    first: torch.Tensor  # [B] first emitted token
    p_first: float  # chi-square p-value of the first token against the truth
    p_pair: float  # ... of the (first, second) pair


def run_and_check(model, logits, tokens, parents, q, t_nodes, base_seed, alpha, gen,
                  device="cpu", *, truth=None, expect_pass=True):
    """Runs the op on B copies with ``model``'s sampling parameters and tests its tokens against
    ``truth`` (default ``model``); asserts both checks pass unless ``expect_pass`` is False."""
    truth = model if truth is None else truth
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
    if single.any():  # the next step (of the same sampler) would draw it
        second[single] = torch.multinomial(model.cond[first[single]], 1, generator=gen).flatten()
    c1 = torch.bincount(first, minlength=V)
    c2 = torch.bincount(first * V + second, minlength=V * V)
    p1 = chi2_pvalue(c1, truth.p0)
    p2 = chi2_pvalue(c2, truth.joint)
    if expect_pass:
        assert p1 > alpha and p2 > alpha, (p1, p2, alpha)
    return Outcome(out_n, first, p1, p2)


# ---------------------------------------------------------------------------------------------
# chains with draft probabilities
# ---------------------------------------------------------------------------------------------


def chain_case(model, q0, q1, gen, base_seed, alpha, device="cpu", **check_kw):
    """Chain root -> d1 -> d2 with d1 ~ q0 and d2 ~ q1[d1] (the draft's conditional)."""
    d1 = torch.multinomial(q0.expand(B, V), 1, replacement=True, generator=gen).flatten()
    d2 = torch.multinomial(q1[d1], 1, generator=gen).flatten()
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), d1, d2], 1).int().flatten()
    third = torch.randn(V, generator=gen)
    logits = torch.stack([model.root_logits.expand(B, V), model.cond_logits[d1],
                          third.expand(B, V)], 1).reshape(B * 3, V)
    q = torch.stack([q0.expand(B, V), q1[d1], torch.zeros(B, V)], 1).reshape(B * 3, V).float()
    parents = torch.tensor([-1, 0, 1], dtype=torch.int32).repeat(B)
    return run_and_check(model, logits, tokens, parents, q, 3, base_seed, alpha, gen, device,
                         **check_kw)


def chain_setup(t, k, tp):
    """Model, draft distributions and generator of ``test_chain_lossless[t, k, tp]``."""
    gen = torch.Generator().manual_seed(int(100 * t) + 10 * k + int(10 * tp))
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5,
                  t, k, tp)
    q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, 0).double()
    q1 = torch.softmax(torch.randn(V, V, generator=gen) * 1.5, 1).double()
    return model, q0, q1, gen


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("k,tp", FILTERS)
def test_chain_lossless(t, k, tp):
    model, q0, q1, gen = chain_setup(t, k, tp)
    n = chain_case(model, q0, q1, gen, 1000, ALPHA_CHAIN).num_accepted
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


def tree_case(model, parents, tokens, gen, base_seed, alpha, device="cpu", **check_kw):
    """A fixed tree (deterministic drafts); node with token x at depth >= 1 has row
    cond_logits[x] (its depth-1 ancestor decides the conditional; deeper rows are arbitrary)."""
    t_nodes = len(parents)
    rows = [model.root_logits] + [model.cond_logits[x] for x in tokens[1:]]
    logits = torch.stack(rows).repeat(B, 1)
    tok = torch.tensor(tokens, dtype=torch.int32).repeat(B)
    par = torch.tensor(parents, dtype=torch.int32).repeat(B)
    return run_and_check(model, logits, tok, par, None, t_nodes, base_seed, alpha, gen, device,
                         **check_kw)


def random_tree(gen, t_nodes):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t_nodes)]
    tokens = [0] + [int(torch.randint(0, V, (1,), generator=gen)) for _ in range(1, t_nodes)]
    return parents, tokens


def tree_setup(t, k, tp):
    """Model, tree and generator of ``test_tree_lossless[t, k, tp]``: a root with 4 children
    (a sibling set, the likely tokens first), plus random subtrees."""
    gen = torch.Generator().manual_seed(7 + int(100 * t) + 10 * k + int(10 * tp))
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen) * 1.5,
                  t, k, tp)
    order = torch.argsort(model.p0, descending=True).tolist()
    parents = [-1, 0, 0, 0, 0, 1, 1, 2, 5]
    tokens = [0, order[0], order[1], order[3], order[6], 1, 2, 3, 4]
    return model, parents, tokens, gen


@pytest.mark.parametrize("t", TEMPS)
@pytest.mark.parametrize("k,tp", FILTERS)
def test_tree_lossless(t, k, tp):
    model, parents, tokens, gen = tree_setup(t, k, tp)
    n = tree_case(model, parents, tokens, gen, 2000, ALPHA_TREE).num_accepted
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
# power: the same checks reject wrong samplers built on the op
# ---------------------------------------------------------------------------------------------

MIN_POWER = 0.999


def first_token_check(first, truth_p, alpha):
    """The first-token check of :func:`run_and_check`: its p-value for tokens ``first``."""
    return chi2_pvalue(torch.bincount(first, minlength=V), truth_p)


def top_p_inclusive_logits(row, t, k, tp):
    """The logits a top-p with an off-by-one boundary leaves: a token is kept while the mass up to
    and *including* it is <= top_p (instead of the mass strictly before it < top_p), so the
    token that crosses top_p is dropped; the most likely token always stays."""
    p = processed(row, t, k, 1.0)
    order = torch.argsort(row.float(), descending=True, stable=True)
    incl = torch.cumsum(p[order], 0)
    drop = torch.zeros(V, dtype=torch.bool)
    drop[order] = incl > tp
    drop[order[0]] = False
    return torch.where(drop | (p == 0), torch.full_like(row, NEG_INF), row)


def buggy_model(bug, model):
    """The (logits, parameters) a wrong implementation hands the op, as a Model whose own p0 /
    cond are the distributions the op then samples exactly."""
    t, k, tp = model.t, model.k, model.tp
    if bug == "temperature_twice":  # logits already divided by t, and the op divides again
        return Model(model.root_logits / t, model.cond_logits / t, t, k, tp)
    if bug == "top_k_strict":  # z > kth instead of z >= kth: keeps k - 1 tokens
        return Model(model.root_logits, model.cond_logits, t, k - 1, tp)
    if bug == "top_p_inclusive":  # boundary token dropped; op told top_p = 1
        return Model(top_p_inclusive_logits(model.root_logits, t, k, tp),
                     torch.stack([top_p_inclusive_logits(r, t, k, tp) for r in model.cond_logits]),
                     t, k, 1.0)
    raise ValueError(bug)


# (t, k, top_p) of the lossless case each bug is injected into; temperature != 1, top-k, top-p
BUGS = {"temperature_twice": (0.5, 0, 1.0), "top_k_strict": (1.0, 4, 1.0),
        "top_p_inclusive": (1.0, 0, 0.7)}


@pytest.mark.parametrize("path", ["chain", "tree"])
@pytest.mark.parametrize("bug", list(BUGS))
def test_power_processing_bugs(bug, path):
    """The op fed a wrongly processed target distribution is rejected.

    Each case reruns ``test_chain_lossless`` / ``test_tree_lossless`` at the bug's (t, k, top_p)
    -- same model, drafts and Philox seeds -- once correctly (must pass: false-failure rate
    2 * ALPHA_CHAIN ~ 8.3e-6 for chains, 2 * ALPHA_TREE ~ 9.1e-6 for trees) and once with the
    bug (must fail the same checks at the same alpha):

    * temperature_twice (t = 0.5): logits divided by t before the op divides again, so it samples
      softmax(z / t^2). Noncentrality 4495 (chain) / 805 (tree) against critical values of 41.
    * top_k_strict (k = 4): the k-th logit compared with ``>`` instead of ``>=``, i.e. top-(k-1).
      Noncentrality 5875 / 3575 against 28.
    * top_p_inclusive (top_p = 0.7): the boundary token counted in its own mass and dropped.
      Noncentrality 3290 / 3056 against 25 / 28.

    Power of the first-token check alone (:func:`chi2_power`, B = 20000): > 1 - 1e-50 in every
    case (the miss probability underflows double precision); the test asserts >= MIN_POWER.
    """
    t, k, tp = BUGS[bug]
    if path == "chain":
        model, q0, q1, gen = chain_setup(t, k, tp)
        alpha = ALPHA_CHAIN
        state = gen.get_state()
        good = chain_case(model, q0, q1, gen, 1000, alpha)  # = test_chain_lossless[t, k, tp]
        gen.set_state(state)  # the same drafts for the wrong run
        bad = chain_case(buggy_model(bug, model), q0, q1, gen, 1000, alpha, truth=model,
                         expect_pass=False)
    else:
        model, parents, tokens, gen = tree_setup(t, k, tp)
        alpha = ALPHA_TREE
        state = gen.get_state()
        good = tree_case(model, parents, tokens, gen, 2000, alpha)  # = test_tree_lossless[...]
        gen.set_state(state)
        bad = tree_case(buggy_model(bug, model), parents, tokens, gen, 2000, alpha, truth=model,
                        expect_pass=False)
    assert good.p_first > alpha and good.p_pair > alpha
    wrong = buggy_model(bug, model)
    assert not torch.allclose(wrong.p0, model.p0, atol=1e-3)  # the bug changes the target
    power = chi2_power(model.p0, wrong.p0, B, alpha)
    assert power >= MIN_POWER, power
    assert min(bad.p_first, bad.p_pair) < alpha, (bad.p_first, bad.p_pair, power)


def test_power_chain_without_residual():
    """Accept with min(1, p/q) but resample from p (not max(0, p - q)) after a rejection, built
    from the op: ``rejection_sample`` decides acceptance, ``sample`` redraws from p.

    Output law of the bug: min(p, q) + (1 - sum min(p, q)) p, at t = 0.8. The correct op on the
    same inputs passes (false-failure rate ALPHA_CHAIN ~ 4.2e-6); the bug is rejected with power
    > 1 - 1e-50 (noncentrality 1990 against a critical value of 45; first-token check, asserted
    >= MIN_POWER).
    """
    gen = torch.Generator().manual_seed(99)
    t = 0.8
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), t, 0, 1.0)
    q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, 0).double()
    d1 = torch.multinomial(q0.expand(B, V), 1, replacement=True, generator=gen).flatten()
    logits = torch.stack([model.root_logits.expand(B, V), model.cond_logits[d1]], 1).reshape(2 * B, V)
    q = torch.stack([q0.expand(B, V), torch.zeros(B, V, dtype=torch.float64)], 1).reshape(2 * B, V).float()
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), d1], 1).int().flatten()
    parents = torch.tensor([-1, 0], dtype=torch.int32).repeat(B)
    indptr = torch.arange(0, 2 * B + 1, 2, dtype=torch.int32)
    seeds = 4100 + torch.arange(B, dtype=torch.int64)
    out = ops.rejection_sample(logits, tokens, parents, indptr, draft_probs=q, temperature=t,
                               seed=seeds, offset=977)
    assert first_token_check(out.tokens[:, 0].long(), model.p0, ALPHA_CHAIN) > ALPHA_CHAIN
    accepted = out.num_accepted == 1
    redraw = ops.sample(model.root_logits.expand(B, V).contiguous(), temperature=t,
                        seed=seeds + 7 * B, offset=977).long()  # the bug: from p, not the residual
    first = torch.where(accepted, d1, redraw)
    assert 0.05 < float(accepted.double().mean()) < 0.95
    m = torch.minimum(model.p0, q0)
    power = chi2_power(model.p0, m + (1 - m.sum()) * model.p0, B, ALPHA_CHAIN)
    assert power >= MIN_POWER, power
    assert first_token_check(first, model.p0, ALPHA_CHAIN) < ALPHA_CHAIN


def test_power_tree_without_sibling_removal():
    """Recursive rejection that forgets to remove the tried siblings, built from the op: each of
    three sibling drafts is verified alone (a one-child tree: accept with p(x), from the full
    p), and after all are rejected the correction is drawn from p itself (``sample``).

    Output law of the bug: c_i gets prod_{j<i}(1 - p(c_j)) p(c_i) + R p(c_i), any other token
    R p(x), with R = prod_j (1 - p(c_j)), at t = 0.7 and top-k 6. The op verifying the real
    three-child tree passes (false-failure rate ALPHA_TREE ~ 4.5e-6); the bug is rejected with
    power > 1 - 1e-50 (noncentrality 2447 against a critical value of 33; asserted >=
    MIN_POWER).
    """
    gen = torch.Generator().manual_seed(98)
    t, k = 0.7, 6
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), t, k, 1.0)
    children = torch.argsort(model.p0, descending=True)[:3].tolist()
    root = model.root_logits.expand(B, V)
    # correct: one tree with the three siblings
    logits = torch.cat([root[:, None], model.cond_logits[children][None].expand(B, 3, V)], 1)
    out = ops.rejection_sample(logits.reshape(4 * B, V).contiguous(),
                               torch.tensor([0, *children], dtype=torch.int32).repeat(B),
                               torch.tensor([-1, 0, 0, 0], dtype=torch.int32).repeat(B),
                               torch.arange(0, 4 * B + 1, 4, dtype=torch.int32),
                               temperature=t, top_k=k, seed=5000 + torch.arange(B), offset=3)
    assert first_token_check(out.tokens[:, 0].long(), model.p0, ALPHA_TREE) > ALPHA_TREE
    # the bug, from the op: every sibling judged against the full p
    first = torch.full((B,), -1, dtype=torch.long)
    for i, x in enumerate(children):
        lg = torch.stack([model.root_logits, model.cond_logits[x]]).repeat(B, 1)
        o = ops.rejection_sample(lg, torch.tensor([0, x], dtype=torch.int32).repeat(B),
                                 torch.tensor([-1, 0], dtype=torch.int32).repeat(B),
                                 torch.arange(0, 2 * B + 1, 2, dtype=torch.int32), temperature=t,
                                 top_k=k, seed=6000 + 1000 * i + torch.arange(B), offset=3)
        first[(first < 0) & (o.num_accepted == 1)] = x
    rest = first < 0
    redraw = ops.sample(root.contiguous(), temperature=t, top_k=k, seed=9000 + torch.arange(B),
                        offset=3).long()
    first[rest] = redraw[rest]
    p0 = model.p0
    r_all = torch.prod(1 - p0[children])
    law = r_all * p0
    before = 1.0
    for x in children:
        law[x] += before * p0[x]
        before *= 1 - p0[x]
    assert torch.isclose(law.sum(), torch.tensor(1.0, dtype=torch.float64))
    power = chi2_power(p0, law, B, ALPHA_TREE)
    assert power >= MIN_POWER, power
    assert first_token_check(first, p0, ALPHA_TREE) < ALPHA_TREE


def test_power_op_with_mismatched_draft_probs():
    """A proposer that samples drafts from one distribution but reports another is lossy.

    The op with the honest draft probabilities passes (false-failure rate ALPHA_CHAIN ~ 4.2e-6);
    with the misreported ones it is rejected with power > 1 - 1e-50 (noncentrality 14412 against
    a critical value of 45; asserted >= MIN_POWER).
    """
    gen = torch.Generator().manual_seed(97)
    model = Model(torch.randn(V, generator=gen) * 1.5, torch.randn(V, V, generator=gen), 1.0, 0,
                  1.0)
    q_true = torch.softmax(torch.randn(V, generator=gen) * 2, 0).double()
    q_claimed = torch.full((V,), 1.0 / V, dtype=torch.float64)
    d1 = torch.multinomial(q_true.expand(B, V), 1, replacement=True, generator=gen).flatten()
    tokens = torch.stack([torch.zeros(B, dtype=torch.long), d1], 1).int().flatten()
    logits = torch.stack([model.root_logits.expand(B, V), model.cond_logits[d1]],
                         1).reshape(2 * B, V)
    parents = torch.tensor([-1, 0], dtype=torch.int32).repeat(B)
    indptr = torch.arange(0, 2 * B + 1, 2, dtype=torch.int32)

    def first_of(q_row):
        q = torch.stack([q_row.expand(B, V), torch.zeros(B, V, dtype=torch.float64)],
                        1).reshape(2 * B, V).float()
        out = ops.rejection_sample(logits, tokens, parents, indptr, draft_probs=q, temperature=1.0,
                                   seed=4000 + torch.arange(B), offset=977)
        return out.tokens[:, 0].long()

    assert first_token_check(first_of(q_true), model.p0, ALPHA_CHAIN) > ALPHA_CHAIN
    p = model.p0
    acc = q_true * torch.clamp(p / q_claimed, max=1.0)
    resid = torch.clamp(p - q_claimed, min=0)
    law = acc + (1 - acc.sum()) * resid / resid.sum()
    power = chi2_power(p, law, B, ALPHA_CHAIN)
    assert power >= MIN_POWER, power
    assert first_token_check(first_of(q_claimed), p, ALPHA_CHAIN) < ALPHA_CHAIN


def test_chi2_power_approximation():
    """:func:`chi2_power` (the figure the power statements above rest on) gives the test's size
    when nothing is wrong and agrees with simulation on a mild bug (400 simulated runs)."""
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(V, generator=gen).double(), 0)
    assert chi2_power(p, p, B, 0.01) == pytest.approx(0.01, rel=1e-6)
    w = 0.93 * p + 0.07 * torch.softmax(torch.randn(V, generator=gen).double(), 0)
    n, alpha, reps = 2000, 0.05, 400
    predicted = chi2_power(p, w, n, alpha)
    assert 0.2 < predicted < 0.9
    draws = torch.multinomial(w.expand(reps, V), n, replacement=True, generator=gen)
    rejected = sum(chi2_pvalue(torch.bincount(d, minlength=V), p) < alpha for d in draws)
    assert abs(rejected / reps - predicted) < 0.08, (rejected / reps, predicted)
