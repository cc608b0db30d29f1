"""Several proposers at once (specrt.proposers.ProposerSet): the policy picks, per sequence and
step, which member drafts.

- the decision over members: on random cost and acceptance tables (each member its own
  drafting cost and acceptance) the chosen assignment is within 1% of the best of all
  assignments; per-sequence members where each sequence favours another member; a costly
  member loses to a free one of equal acceptance, wins when it accepts enough more;
- losslessness: greedy equal to plain for pairs and a triple of proposers under random members
  and budgets, the fixed order and calibrated auto (page sizes 4 and 16, batched); chi-square
  with random members (draft-probability chains and deterministic trees in one batch) and
  under auto;
- every member keeps its state in step while others draft: the EAGLE head cache and the MTP
  module caches equal a rebuild from the accepted tokens at every step they draft;
- calibration gives every member its own drafting costs; per-member options; bad sets refused.
"""
from __future__ import annotations

import itertools
import random

import pytest

from specrt.engine import Engine, SamplingParams
from specrt.policy import PLAIN, AcceptanceModel, AutoPolicy, Budget, CostTable, choose
from specrt.proposers import LookaheadProposer, NgramProposer, NoProposer, ProposerSet

from _tiny import tiny_model
import test_policy as tp


# ------------------------------------------------------------------------------ the decision
def _set_rate(pick, gain_of, costs):
    """Expected rate of an assignment, written out from CostTable's documented formula."""
    B = len(pick)
    g = sum(gain_of[i][b] for i, b in enumerate(pick))
    draft = costs.draft_coef(B)[0]
    for s in {b.source for b in pick if b.depth > 0}:
        t0, a, per_level, per_node = costs.draft_coef(B, s)
        mine = [b for b in pick if b.depth > 0 and b.source == s]
        draft += (a - t0 + per_level * max(b.depth for b in mine)
                  + per_node * sum(b.nodes - 1 for b in mine))
    rows = sum(b.nodes for b in pick)
    return g / (costs.host(B) + draft + costs.verify(B, rows))


def _members_menu(depths, nodes):
    menu = [PLAIN]
    for s, (d, n) in enumerate(zip(depths, nodes)):
        menu += [Budget(k, k + 1, s) for k in range(1, d + 1)]
        menu += [Budget(k, n, s) for k in range(1, d + 1) if n > k + 1]
    return menu


def _alphas_model(alphas_per_seq, obs=40, seed=0, budgets=None):
    rng = random.Random(seed)
    acc = AcceptanceModel()
    for sid, al in enumerate(alphas_per_seq):
        D = len(al)
        for b in budgets or [Budget(D, D + 1)]:
            for _ in range(obs):
                a = 0
                while a < min(D, b.depth) and rng.random() < al[a]:
                    a += 1
                acc.observe(sid, b, a)
    return acc


def test_choice_over_members_is_the_brute_force_optimum():
    rng = random.Random(5)
    exact, n = 0, 100
    for trial in range(n):
        B = rng.randint(1, 3)
        M = rng.choice([2, 2, 3])
        menu = _members_menu([rng.randint(1, 3) for _ in range(M)],
                             [rng.choice([4, 6, 9]) for _ in range(M)])
        base, per, knee = rng.uniform(0.01, 0.05), rng.uniform(0, 0.01), rng.randint(1, 8)
        members = []
        for _ in range(M):
            t0 = rng.uniform(0, 0.001)
            members.append((t0, t0 + rng.uniform(0, 0.006), rng.choice([0.0, rng.uniform(0, 0.006)]),
                            rng.uniform(0, 5e-4)))
        costs = CostTable.synthetic(lambda b, r: base + per * max(0, r - knee),
                                    batch_sizes=(1, 2, 4), draft=(0.0005, 0.0005, 0, 0),
                                    members=members)
        accs = [_alphas_model([[rng.random() for _ in range(3)] for _ in range(B)], obs=5,
                              seed=100 * trial + s) for s in range(M)]
        gains = [[accs[b.source].expected(i, b) if b.depth else 1.0 for b in menu]
                 for i in range(B)]
        gain_of = [dict(zip(menu, g)) for g in gains]
        pick, rate = choose([menu] * B, gains, costs)
        assert rate == pytest.approx(_set_rate(pick, gain_of, costs), rel=1e-9)
        best = max(_set_rate(p, gain_of, costs) for p in itertools.product(menu, repeat=B))
        assert rate >= 0.99 * best, (trial, pick, rate, best)
        exact += rate >= best * (1 - 1e-9)
    assert exact >= 0.9 * n


def _policy(menu, costs, alphas):
    """An AutoPolicy whose member ``s`` has acceptance ``alphas[s][sid]`` per depth."""
    pol = AutoPolicy(costs, menu, probe_every=0)
    for s, per_seq in enumerate(alphas):
        pol.models[s] = _alphas_model(per_seq, obs=80, seed=s,
                                      budgets=[b for b in menu if b.source == s and b.depth])
    return pol


def test_each_sequence_gets_the_member_that_accepts_for_it():
    menu = _members_menu([3, 3], [4, 4])
    costly = (0.0, 0.004, 0.002, 0.0)  # a head drafting per level
    costs = CostTable.synthetic(lambda b, r: 0.05 + 0.002 * r, batch_sizes=(1, 2),
                                members=[(0.0, 0.0, 0.0, 0.0), costly])
    # sequence 0 repeats its context (lookup accepts), sequence 1 does not (the head does)
    pol = _policy(menu, costs, [[[0.9] * 3, [0.02] * 3], [[0.3] * 3, [0.8] * 3]])
    got = pol.plan([0, 1], [3, 3])
    assert got[0].source == 0 and got[1].source == 1 and got[1].depth >= 2, got
    # equal acceptance: the member that drafts for free wins
    pol = _policy(menu, costs, [[[0.7] * 3], [[0.7] * 3]])
    assert pol.plan([0], [3])[0].source == 0
    # the costly member wins when it accepts enough more
    pol = _policy(menu, costs, [[[0.1] * 3], [[0.9] * 3]])
    assert pol.plan([0], [3])[0].source == 1
    # nothing accepts anywhere, drafting costs: plain decoding
    costs2 = CostTable.synthetic(lambda b, r: 0.05 + 0.01 * r, batch_sizes=(1, 2),
                                 members=[(0.0, 0.003, 0.0, 0.0), costly])
    pol = _policy(menu, costs2, [[[0.0] * 3], [[0.0] * 3]])
    assert pol.plan([0], [3]) == [PLAIN]


def test_a_set_policy_needs_tagged_budgets_and_member_costs():
    menu = _members_menu([2, 2], [3, 3])
    with pytest.raises(ValueError, match="per-member costs"):
        AutoPolicy(CostTable.synthetic(lambda b, r: 1.0), menu)
    t = CostTable.synthetic(lambda b, r: 1.0, members=[(0, 0, 0, 0), (0, 1, 1, 1)])
    assert CostTable.from_dict(t.as_dict()).members == t.members
    assert t.for_member(1).draft_coef(1) == (0, 1, 1, 1)


# ------------------------------------------------------------------------------ losslessness
class RandomMembers:
    """Random member (or the set's own order, -1) and random budget of its menu."""

    name = "random"

    def __init__(self, menu, seed):
        self.menu = [b for b in menu if b.depth > 0]
        self.rng = random.Random(seed)

    def reset(self):
        pass

    def plan(self, sids, limits):
        out = []
        for lim in limits:
            r = self.rng.random()
            if r < 0.15:
                out.append(PLAIN)
                continue
            b = self.rng.choice(self.menu)
            out.append(Budget(min(b.depth, lim), b.nodes, -1 if r < 0.3 else b.source))
        return out

    def observe(self, *a, **k):
        pass

    def release(self, sid):
        pass


_SETS = [("ngram", "medusa"), ("ngram", "eagle-auto"), ("mtp-tree", "lookahead"),
         ("draft", "ngram", "mlp-speculator"), ("self-spec", "eagle-choices")]


@pytest.mark.parametrize("names", _SETS, ids=["|".join(n) for n in _SETS])
def test_sets_are_greedy_equal_to_plain(names):
    target = tiny_model(seed=1, scale=3.0)
    make = tp._all_proposers(target)
    prompts = tp._prompts(5)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = [o.token_ids for o in Engine(target, page_size=4).generate(prompts, params)]
    for page, policy in ((4, "random"), (16, "random"), (16, "fixed"), (4, "auto")):
        ps = ProposerSet([make[n]() for n in names])
        eng = Engine(target, proposer=ps, page_size=page, max_batch_size=3, max_draft=4,
                     policy="auto" if policy == "auto" else "fixed", calibration_s=2.0)
        if policy == "random":
            eng.policy = RandomMembers(eng.budget_menu(), seed=page)
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == ref, (names, policy, page)
        drafted = [ps.stats[m.name]["drafted"] for m in ps.members]
        if policy == "random":
            assert all(d > 0 for d in drafted), (names, ps.stats)
        if policy == "auto":
            assert eng.costs.members is not None and len(eng.costs.members) == len(names)


def test_members_keep_their_caches_in_step_while_others_draft():
    """The EAGLE head cache and the MTP module caches, checked against a rebuild from the
    accepted tokens every time they draft, while n-gram drafts the other steps."""
    import test_eagle as te
    import test_mtp as tm

    target = tiny_model(seed=1, scale=3.0)
    head = te.random_eagle_head(target, "eagle3", seed=12, draft_vocab=97, scale=2.0)
    prompts = tp._prompts(3, seed=4)
    sp = SamplingParams(max_new_tokens=20, temperature=0.0)
    ref = Engine(target, proposer=NoProposer()).generate(prompts, sp)
    eagle = te._CheckedEagle(target, head, top_k=3, depth=3, total_tokens=8, page_size=16)
    mtp = tm._CheckedMTP(target, tm.random_modules(target, 2, seed=3), depth=3, top_k=2,
                         page_size=16)
    before = (te._CheckedEagle.checked, tm._CheckedMTP.checked)
    ps = ProposerSet([NgramProposer(k=3), eagle, mtp])
    eng = Engine(target, proposer=ps, policy="fixed")
    eng.policy = RandomMembers(eng.budget_menu(), seed=7)
    out = eng.generate(prompts, sp)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert te._CheckedEagle.checked - before[0] >= 8 and tm._CheckedMTP.checked - before[1] >= 8
    assert ps.stats["ngram"]["drafted"] > 0


@pytest.mark.parametrize("policy", ["random", "auto"])
def test_sampling_lossless_with_a_set(policy):
    """Chi-square of the first k + 1 = 4 emitted tokens (jointly, 3000 seeds, alpha 1e-4 per
    case) with a sampled draft model (chains with draft probabilities) and a deterministic
    tree proposer in one set: random members per sequence and step, or auto with a flat cost
    table. Power: test_engine.test_sampling_test_has_power."""
    pytest.importorskip("scipy.stats")
    import test_engine as te

    tgt = tiny_model(seed=3, scale=3.0, vocab=te._VOCAB, hidden=32, layers=3)
    drf = te._perturbed(tgt, 0.1, seed=5)
    table = te._exact_tables(tgt, te._PROMPT, te._K + 1, 1.0, 0, 1.0)
    exact = te._exact_joint(table, te._VOCAB, te._K + 1)
    ps = ProposerSet([te._stat_proposer("draft", tgt, drf, table),
                      te._stat_proposer("exact-tree", tgt, drf, table)])
    eng = Engine(tgt, proposer=ps, num_pages=8192, page_size=4, max_batch_size=512,
                 max_draft=te._K, policy="fixed")
    menu = eng.budget_menu()
    if policy == "random":
        eng.policy = RandomMembers(menu, seed=3)
    else:
        eng.policy = AutoPolicy(CostTable.synthetic(lambda b, r: 1.0 + 1e-4 * r,
                                                    members=[(0, 0, 0, 0)] * 2), menu)
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=te._K + 1)
              for s in range(te._N_STAT)]
    outs = eng.generate([te._PROMPT] * te._N_STAT, params)
    assert all(ps.stats[m.name]["drafted"] > 100 for m in ps.members), ps.stats
    pval = te._chi_square_p(outs, exact, te._VOCAB, te._K + 1)
    assert pval > 1e-4, f"{policy}: chi-square p = {pval:.2e}, {ps.stats}"


# ------------------------------------------------------------------------------ the rest
def test_calibration_measures_every_member(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRT_CACHE_DIR", str(tmp_path))
    target = tiny_model(seed=1, scale=3.0)
    make = tp._all_proposers(target)
    ps = ProposerSet([NgramProposer(k=3), make["draft"]()])
    eng = Engine(target, proposer=ps, max_batch_size=4, calibration_s=1.5)
    eng.calibrate()
    c = eng.costs
    assert len(c.members) == 2 and all(len(m) == len(c.batch_sizes) for m in c.members)
    # a draft model's levels cost more than n-gram lookup's
    assert c.draft_coef(1, 1)[1] + 3 * c.draft_coef(1, 1)[2] > \
        c.draft_coef(1, 0)[1] + 3 * c.draft_coef(1, 0)[2]
    single = Engine(target, proposer=NgramProposer(k=3), max_batch_size=4)
    from specrt.calibrate import cost_key
    assert cost_key(single) != cost_key(eng)
    again = Engine(target, proposer=ProposerSet([NgramProposer(k=3), make["draft"]()]),
                   max_batch_size=4)
    again.calibrate()
    assert again.costs.meta.get("cached") and again.costs.members == c.members


def test_options_are_keyed_by_member_and_bad_sets_are_refused():
    target = tiny_model(seed=1, scale=3.0)
    ps = ProposerSet([NgramProposer(k=3), LookaheadProposer(window=3, ngram=3, guesses=2)])
    eng = Engine(target, proposer=ps, policy="fixed")
    good = SamplingParams(max_new_tokens=8, draft_options={"lookahead": {"window": 2}})
    bad = SamplingParams(max_new_tokens=8, draft_options={"window": 2})
    worse = SamplingParams(max_new_tokens=8, draft_options={"lookahead": {"window": -1}})
    out = eng.generate([[1, 2, 3, 1, 2, 3]] * 3, [good, bad, worse])
    assert out[0].error is None and len(out[0].token_ids) == 8
    assert "keyed by member" in out[1].error and out[2].error
    with pytest.raises(ValueError, match="two or more"):
        ProposerSet([NgramProposer()])
    with pytest.raises(ValueError, match="distinct"):
        ProposerSet([NgramProposer(), NgramProposer(k=2)])
    with pytest.raises(ValueError, match="drafting proposers"):
        ProposerSet([NgramProposer(), NoProposer()])
    eng = Engine(target, proposer=ps, policy="fixed")
    eng.policy = type("P", (RandomMembers,), {"plan": lambda self, sids, lims: [
        Budget(1, 2, 5) for _ in sids]})(eng.budget_menu(), 0)
    with pytest.raises(ValueError, match="names no member"):
        eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
