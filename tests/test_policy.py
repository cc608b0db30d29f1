"""Cost-aware speculation (specrt.policy, specrt.calibrate, the engine's budgets).

- the decision: on synthetic cost and acceptance tables the policy picks the known-best budget
  (brute force over every assignment), including tables where speculation cannot pay (plain
  decoding) and where it is nearly free (the widest tree);
- the acceptance model converges to the simulated per-depth rates;
- every proposer honours any budget the engine hands it (the engine checks the contract), and
  stays lossless: greedy equal to plain under random budgets and under the auto policy, and
  chi-square for sampling under random budgets;
- calibration: bounded in time, cached, and recalibrated when the device, model or dtype
  changes;
- reproducibility: the same requests on the same engine give the same sampled tokens.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time

import pytest
import torch

from specrt.calibrate import cache_dir, cost_key
from specrt.engine import Engine, SamplingParams
from specrt.models.llama import SkipSet
from specrt.policy import (PLAIN, AcceptanceModel, AutoPolicy, Budget, CostTable, choose,
                           default_menu, width_class)
from specrt.proposers import (DraftModelProposer, EagleProposer, HorizontalCascade,
                              LookaheadProposer, MedusaProposer, MLPSpeculatorProposer,
                              MTPProposer, NgramProposer, SelfSpecProposer)

from _tiny import random_eagle_head, tiny_model


# ------------------------------------------------------------------------------ the decision
def _rate(pick, gain_of, costs):
    g = sum(gain_of[i][b] for i, b in enumerate(pick))
    return g / costs.step(len(pick), max(b.depth for b in pick), sum(b.nodes for b in pick))


def _model_with(alphas_per_seq, widths=7, obs=40, seed=0):
    """An acceptance model fed ``obs`` simulated steps per (sequence, width class, depth)."""
    rng = random.Random(seed)
    acc = AcceptanceModel()
    for sid, al in enumerate(alphas_per_seq):
        D = len(al)
        for w in range(widths):
            b = Budget(D, D + 1) if w == 0 else Budget(D, D * 2 ** w + 1)
            for _ in range(obs):
                a = 0  # a chain of conditional acceptances
                while a < D and rng.random() < al[a]:
                    a += 1
                acc.observe(sid, b, a)
    return acc


def test_flat_cost_and_high_acceptance_picks_the_widest_deepest_budget():
    costs = CostTable.synthetic(lambda b, r: 1.0)
    menu = default_menu(4, 16, tree=True)
    acc = AcceptanceModel(prior=0.9)  # wider classes start higher
    pick, _ = choose([menu], [[acc.expected(0, b) for b in menu]], costs)
    assert pick == [Budget(4, 16)]
    # equal acceptance at every width: the same gain for fewer rows wins the tie
    acc = AcceptanceModel(prior=0.9, widen=0.0)
    pick, _ = choose([menu], [[acc.expected(0, b) for b in menu]], costs)
    assert pick[0].depth == 4 and pick[0].nodes == 5


def test_speculation_that_cannot_pay_falls_back_to_plain():
    menu = default_menu(4, 16, tree=True)
    # every row costs a whole decode step: no acceptance below 1 pays
    steep = CostTable.synthetic(lambda b, r: float(r))
    acc = _model_with([[0.8] * 4])
    assert choose([menu], [[acc.expected(0, b) for b in menu]], steep)[0] == [PLAIN]
    # nearly free rows but nothing is ever accepted
    flat = CostTable.synthetic(lambda b, r: 1.0 + 0.01 * r, draft=(0.0, 0.02, 0.0, 0.0))
    acc = _model_with([[0.0] * 4], obs=200)
    assert choose([menu], [[acc.expected(0, b) for b in menu]], flat)[0] == [PLAIN]


def test_choice_is_the_brute_force_optimum():
    """Random cost tables (knee, per-row slope, drafting cost per level / node) and random
    per-sequence acceptance; batches of 1-3: the chosen assignment's rate is within 1% of the
    best of all assignments (exact in the large majority of cases)."""
    rng = random.Random(1)
    exact = 0
    n = 120
    for trial in range(n):
        B = rng.randint(1, 3)
        menu = default_menu(rng.randint(1, 4), rng.choice([5, 9, 16]), rng.random() < 0.5)
        base, per, knee = rng.uniform(0.01, 0.05), rng.uniform(0, 0.01), rng.randint(1, 10)
        costs = CostTable.synthetic(
            lambda b, r: base + per * max(0, r - knee), batch_sizes=(1, 2, 4),
            draft=(0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.005), rng.uniform(0, 5e-4)))
        acc = _model_with([[rng.random() for _ in range(4)] for _ in range(B)], obs=5,
                          seed=trial)
        gains = [[acc.expected(i, b) for b in menu] for i in range(B)]
        gain_of = [dict(zip(menu, g)) for g in gains]
        pick, rate = choose([menu] * B, gains, costs)
        assert rate == pytest.approx(_rate(pick, gain_of, costs), rel=1e-9)
        best = max(_rate(p, gain_of, costs) for p in itertools.product(menu, repeat=B))
        assert rate >= 0.99 * best, (trial, pick, rate, best)
        exact += rate >= best * (1 - 1e-9)
    assert exact >= 0.9 * n


def test_sequences_get_budgets_by_their_own_acceptance():
    """A batch of a repetitive and a hopeless sequence: the first drafts deep, the second
    decodes plainly (rows cost a little, drafting is free)."""
    costs = CostTable.synthetic(lambda b, r: 1.0 + 0.05 * r, batch_sizes=(1, 2))
    menu = default_menu(4, 5, tree=False)
    acc = _model_with([[0.95] * 4, [0.02] * 4], widths=1, obs=60)
    pick, _ = choose([menu, menu], [[acc.expected(i, b) for b in menu] for i in (0, 1)], costs)
    assert pick == [Budget(4, 5), PLAIN]


def test_acceptance_model_converges_and_shrinks_to_the_proposer():
    acc = AcceptanceModel(optimism=0.0)
    true = [0.8, 0.6, 0.4]
    rng = random.Random(0)
    for step in range(4000):
        sid = step % 4
        a = 0
        while a < 3 and rng.random() < true[a]:
            a += 1
        acc.observe(sid, Budget(3, 4), a)
    for j, t in enumerate(true, 1):  # after an accepting draft (state 1) and after a miss (0)
        assert acc.global_alpha(0, j, 1) == pytest.approx(t, abs=0.03)
        assert acc.global_alpha(0, j, 0) == pytest.approx(t, abs=0.06)
    # an unseen sequence starts at the proposer-wide estimate; wider classes start above it
    assert acc.alpha(99, 0, 1) == pytest.approx(acc.global_alpha(0, 1))
    assert acc.global_alpha(1, 1) > acc.global_alpha(0, 1)
    # a budget whose proposer drafted nothing counts as a miss at depth 1
    acc2 = AcceptanceModel(prior_weight=1.0, optimism=0.0)
    for _ in range(50):
        acc2.observe(0, Budget(2, 3), 0)
    assert acc2.global_alpha(0, 1) < 0.02 and acc2.global_alpha(0, 2) == pytest.approx(0.5)
    assert width_class(Budget(3, 4)) == 0 and width_class(Budget(2, 9)) == 2


def test_auto_policy_goes_plain_then_probes():
    """Plan, draft (a chain as deep as the budget), trim, observe: nothing is ever accepted, so
    after a few steps the verified drafts are plain except a probe every ``probe_every``
    steps; once drafts start to be accepted the policy drafts deep again. Run both with free
    drafting (plan gives the largest budget, trim decides) and with drafting that costs per
    level (plan decides)."""
    from specrt.tree import DraftTree
    for draft in ((0.0, 0.0, 0.0, 0.0), (0.0, 0.05, 0.3, 0.0)):
        costs = CostTable.synthetic(lambda b, r: 1.0 + 0.1 * r, draft=draft)
        pol = AutoPolicy(costs, default_menu(4, 5, tree=False), probe_every=8)

        def step(accept_all):
            b = pol.plan([7], [4])[0]
            tree = DraftTree.chain(1, [2] * b.depth)
            (t, _), = pol.trim([7], [tree], [0])
            pol.observe(7, b, t.max_depth if accept_all else 0, tree.max_depth, t.num_nodes,
                        t.max_depth)
            return t.max_depth

        depths = [step(False) for _ in range(80)]
        assert depths[0] > 0  # the prior says try
        tail = depths[30:]
        assert 1 <= sum(d > 0 for d in tail) <= len(tail) // 8 + 1, depths  # probes only
        depths = [step(True) for _ in range(40)]
        # deep again (with levels costing 30% of a step each, two levels pay)
        assert depths[-1] >= (3 if draft[2] == 0 else 2), depths


# ---------------------------------------------------------------- proposers honour budgets
class RandomBudgets:
    """Test policy: a random budget of the menu per sequence and step."""

    name = "random"

    def __init__(self, menu, seed=0):
        self.menu, self.rng = menu, random.Random(seed)

    def reset(self):
        pass

    def plan(self, sids, limits):
        out = []
        for lim in limits:
            b = self.rng.choice(self.menu)
            out.append(Budget(min(b.depth, lim), b.nodes))
        return out

    def observe(self, sid, b, accepted, drafted=None, nodes=None, verified=None):
        pass

    def release(self, sid):
        pass


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=1, scale=3.0)


def _medusa_heads(tgt, k, seed=11):
    from test_engine import _random_heads
    return _random_heads(tgt, k, seed)


def _mtp(tgt, n=2, seed=3):
    from test_mtp import random_modules
    return random_modules(tgt, n, seed=seed)


def _mlp(tgt, seed=4):
    from test_mlp_speculator import _spec
    return _spec(tgt, n=3, seed=seed)


def _all_proposers(tgt):
    draft = tiny_model(seed=2, scale=3.0, layers=2)
    v = tgt.config.vocab_size
    return {
        "ngram": lambda: NgramProposer(k=4, max_branches=3),
        "draft": lambda: DraftModelProposer(draft, v, k=3),
        "draft-tree": lambda: DraftModelProposer(draft, v, k=3, tree_width=3),
        "self-spec": lambda: SelfSpecProposer(tgt, SkipSet((1, 3), (2,)), k=3),
        "medusa": lambda: MedusaProposer(tgt, _medusa_heads(tgt, 3), num_nodes=12, top_k=3),
        "medusa-choices": lambda: MedusaProposer(
            tgt, _medusa_heads(tgt, 3, seed=12),
            tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]),
        "eagle-auto": lambda: EagleProposer(tgt, random_eagle_head(tgt, "eagle3", seed=13,
                                                                   feature_layers=(1, 2, 3)),
                                            top_k=3, depth=4, total_tokens="auto"),
        "eagle-choices": lambda: EagleProposer(
            tgt, random_eagle_head(tgt, "eagle1", seed=14),
            tree=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
        "mtp-tree": lambda: MTPProposer(tgt, _mtp(tgt), depth=3, top_k=2),
        "mlp-speculator": lambda: MLPSpeculatorProposer(tgt, _mlp(tgt), top_k=[3, 2, 2],
                                                        n_candidates=4, num_nodes=10),
        "lookahead": lambda: LookaheadProposer(window=3, ngram=3, guesses=3),
        "cascade": lambda: HorizontalCascade(
            MedusaProposer(tgt, _medusa_heads(tgt, 2, seed=15), num_nodes=6, top_k=2),
            NgramProposer(k=3), strong_depth=1, tail=2),
    }


def _prompts(n, vocab=97, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        out.append((base * 6)[: rng.randrange(2, 24)])
    return out


_NAMES = [
    "ngram", "draft", "draft-tree", "self-spec", "medusa", "medusa-choices", "eagle-auto",
    "eagle-choices", "mtp-tree", "mlp-speculator", "lookahead", "cascade"]


@pytest.mark.parametrize("name", _NAMES)
def test_every_proposer_honours_random_budgets_and_auto(target, name):
    """Random budgets from the proposer's menu every step (the engine raises when a tree breaks
    its budget), then the calibrated auto policy: greedy output equals plain decoding, batched
    (page size 4 and 16)."""
    prompts = _prompts(5)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ref = [o.token_ids for o in Engine(target, page_size=4).generate(prompts, params)]
    make = _all_proposers(target)[name]
    for page, policy in ((4, "random"), (16, "random"), (16, "auto"), (4, "auto-cut")):
        eng = Engine(target, proposer=make(), page_size=page, max_batch_size=3, max_draft=4,
                     policy="auto" if policy == "auto" else "fixed", calibration_s=2.0)
        if policy == "random":
            menu = eng.budget_menu()
            assert PLAIN in menu and len(menu) > 2
            eng.policy = RandomBudgets(menu, seed=page)
            if getattr(eng.proposer, "wants_costs", False):
                # a proposer that sizes its own trees (EAGLE auto) gets a flat table: on a
                # loaded machine a calibrated one can make it decline every draft, and this
                # test is about budgets, not timings
                eng.proposer.set_costs(CostTable.synthetic(lambda b, r: 1.0 + 1e-3 * r,
                                                           batch_sizes=(1, 2, 4)))
        elif policy == "auto-cut":
            # rows cost 15% of a step each: trees get cut after drafting (and the verified
            # path is mapped back to the proposer's own node numbering)
            eng.policy = AutoPolicy(CostTable.synthetic(lambda b, r: 1.0 + 0.15 * (r - b),
                                                        batch_sizes=(1, 2, 4)),
                                    eng.budget_menu())
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == ref, (name, policy, page)
        hist = eng.metrics.budget_hist
        assert sum(hist.values()) == eng.metrics.steps or eng.metrics.steps == 0
        if policy == "random":
            assert len(hist) >= 3, hist  # budgets really varied


@pytest.fixture(scope="module")
def stat_models():
    import test_engine as te
    tgt = tiny_model(seed=3, scale=3.0, vocab=te._VOCAB, hidden=32, layers=3)
    return tgt, te._perturbed(tgt, 0.1, seed=5)


@pytest.mark.parametrize("name,policy", [
    ("draft", "random"), ("medusa", "random"), ("exact-tree", "random"),
    ("draft", "auto"), ("self-spec", "auto"), ("ngram", "auto"), ("medusa", "auto"),
    ("eagle3", "auto"), ("exact-tree", "auto"), ("mixed", "auto"),
])
def test_sampling_lossless_under_policies(stat_models, name, policy):
    """Chi-square of the first k + 1 = 4 emitted tokens (jointly, 3000 seeds) against the
    target's exact distribution, with budgets drawn at random per sequence and step from the
    proposer's menu, or chosen by the calibrated auto policy (which learns over the 3000
    sequences of the run, so budgets change as it goes). alpha = 1e-4 per case: the 10 cases'
    false-failure rate is at most 1e-3. The test's power is shown in test_engine.py
    (test_sampling_test_has_power: the same statistic rejects wrong verification)."""
    pytest.importorskip("scipy.stats")
    import test_engine as te

    tgt, drf = stat_models
    temperature = 1.0
    table = te._exact_tables(tgt, te._PROMPT, te._K + 1, temperature, 0, 1.0)
    exact = te._exact_joint(table, te._VOCAB, te._K + 1)
    prop = te._stat_proposer(name, tgt, drf, table)
    eng = Engine(tgt, proposer=prop, num_pages=8192, page_size=4, max_batch_size=512,
                 max_draft=te._K, policy="fixed")
    if policy == "random":
        eng.policy = RandomBudgets(eng.budget_menu(), seed=3)
    else:
        # Auto with a GPU-like flat cost table: the policy drafts and adapts budgets to the
        # acceptance it sees. (Calibrated on this CPU, a batch of 512 sequences of a tiny
        # model pays for every row, and the policy rightly decodes plainly.)
        eng.policy = AutoPolicy(CostTable.synthetic(lambda b, r: 1.0 + 1e-4 * r),
                                eng.budget_menu())
    params = [SamplingParams(temperature=temperature, seed=s, max_new_tokens=te._K + 1)
              for s in range(te._N_STAT)]
    outs = eng.generate([te._PROMPT] * te._N_STAT, params)
    hist = eng.metrics.budget_hist
    assert sum(n for (d, _), n in hist.items() if d > 0) > 0.2 * te._N_STAT, hist  # it drafts
    if policy == "random":
        assert len(hist) >= 3
    pval = te._chi_square_p(outs, exact, te._VOCAB, te._K + 1)
    assert pval > 1e-4, f"{name} ({policy}): chi-square p = {pval:.2e}, budgets {dict(hist)}"


def test_trim_cuts_drafts_to_what_pays():
    from specrt.tree import DraftTree
    chain = DraftTree.chain(5, [1, 2, 3, 4])
    tree = DraftTree([5, 1, 2, 3, 4, 6], [-1, 0, 1, 0, 3, 2])  # two branches, depth 3
    menu = default_menu(4, 8, tree=True)
    acc = AcceptanceModel(prior=0.6, optimism=0.0)

    def cut(verify, trees, probing=()):
        pol = AutoPolicy(CostTable.synthetic(verify, batch_sizes=(1, 2)), menu, acc)
        pol._probing = set(probing)
        return pol.trim(list(range(len(trees))), trees, [0] * len(trees))

    (t, keep), = cut(lambda b, r: 1.0, [chain])
    assert t is chain and keep is None  # flat: keep everything
    (t, keep), = cut(lambda b, r: float(r), [chain])
    assert t.num_nodes == 1 and keep == [0]  # a row costs a step: plain
    # fp32 on the 2-core CPU: 2-3 rows cost more than 4 (GEMM shapes): a cut at depth 3
    cpu = {1: 55.0, 2: 100.0, 3: 125.0, 4: 80.0, 5: 95.0}
    (t, keep), = cut(lambda b, r: cpu.get(r, 55.0 + 10 * r), [chain])
    assert t.tokens.tolist() == [5, 1, 2, 3] and keep == [0, 1, 2, 3]
    (t, keep), = cut(lambda b, r: 1.0 + 0.3 * (r - 1), [tree])
    assert t.max_depth < 3 and keep == [i for i in range(6) if tree.depths[i] <= t.max_depth]
    # a probe verifies at least one level, even where the table says plain
    (t, keep), = cut(lambda b, r: float(r), [chain], probing=[0])
    assert t.max_depth >= 1


def test_truncated_tree_is_a_prefix_tree():
    from specrt.tree import DraftTree
    t = DraftTree([5, 1, 2, 3, 4, 6, 7], [-1, 0, 0, 1, 1, 2, 5])
    c = t.truncated(2, 5)
    assert c.tokens.tolist() == [5, 1, 2, 3, 4] and c.parents.tolist() == [-1, 0, 0, 1, 1]
    d = t.truncated(1, 64)
    assert d.tokens.tolist() == [5, 1, 2] and d.max_depth == 1
    assert t.truncated(3, 7) is t
    probs = torch.softmax(torch.randn(3, 9), -1)
    ch = DraftTree.chain(5, [1, 2, 3], draft_probs=probs)
    cut = ch.truncated(2, 3)
    assert cut.num_nodes == 3 and torch.equal(cut.draft_probs, probs[:3])


# ------------------------------------------------------------------------------ calibration
def test_calibration_is_bounded_cached_and_invalidated(target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRT_CACHE_DIR", str(tmp_path))
    mk = lambda model: Engine(model, proposer=NgramProposer(k=3), max_batch_size=4,
                              calibration_s=1.0, policy="auto")
    eng = mk(target)
    t = time.perf_counter()
    eng.calibrate()
    took = time.perf_counter() - t
    assert took < 1.0 + 3.0, took  # the budget plus the one always-complete pass
    assert "cached" not in eng.costs.meta
    files = list(cache_dir().glob("*.json"))
    assert len(files) == 1
    # the same engine setup loads the table
    eng2 = mk(target)
    eng2.calibrate()
    assert eng2.costs.meta.get("cached") == str(files[0])
    assert eng2.costs.as_dict()["verify_s"] == eng.costs.as_dict()["verify_s"]
    # another dtype, another model, another device name, another proposer setting: recalibrate
    changed = {
        "dtype": Engine(tiny_model(seed=1, scale=3.0).to(torch.bfloat16),
                        proposer=NgramProposer(k=3), max_batch_size=4, calibration_s=0.5),
        "model": mk(tiny_model(seed=9, scale=3.0)),
        "proposer": Engine(target, proposer=NgramProposer(k=2), max_batch_size=4,
                           calibration_s=0.5),
    }
    for what, e in changed.items():
        assert cost_key(e) != cost_key(eng), what
        e.calibrate()
        assert "cached" not in e.costs.meta, what
    import specrt.calibrate as cal
    monkeypatch.setattr(cal, "device_name", lambda dev: "another device")
    e = mk(target)
    e.calibrate()
    assert "cached" not in e.costs.meta
    # a file whose stored key does not match (edited, stale) is not trusted
    d = json.loads(files[0].read_text())
    d["key"]["torch"] = "0.0"
    files[0].write_text(json.dumps(d))
    monkeypatch.undo()
    monkeypatch.setenv("SPECRT_CACHE_DIR", str(tmp_path))
    e = mk(target)
    e.calibrate()
    assert "cached" not in e.costs.meta


def test_cost_table_interpolates_and_round_trips():
    c = CostTable([1, 4], [[1, 2, 8], [4, 8]], [[1.0, 1.0, 2.0], [2.0, 3.0]], [0.1, 0.2],
                  [[0.0, 0.01, 0.02, 0.001]] * 2)
    assert c.verify(1, 5) == pytest.approx(1.5)
    assert c.verify(1, 16) == pytest.approx(3.333333, rel=1e-5)  # linear past the last point
    # between batch sizes: linear in the batch at equal total rows (4/3 at 1, 2.0 at 4)
    assert c.verify(2, 4) == pytest.approx(4 / 3 + (2.0 - 4 / 3) / 3)
    assert c.drafting(1, 0, 0) == 0.0 and c.drafting(1, 2, 3) == pytest.approx(0.053)
    assert CostTable.from_dict(json.loads(json.dumps(c.as_dict()))).as_dict() == c.as_dict()
    with pytest.raises(ValueError):
        CostTable([1], [[1, 1]], [[1.0, 1.0]], [0.0], [[0, 0, 0, 0]])
    with pytest.raises(ValueError):
        Budget(3, 3)


# --------------------------------------------------------------------------- reproducibility
def test_auto_policy_sampled_output_is_reproducible(target):
    """No decision reads a clock: the same requests on the same engine, from the same policy
    state, give the same sampled tokens and the same budgets."""
    eng = Engine(target, proposer=NgramProposer(k=4, max_branches=2), max_batch_size=4,
                 calibration_s=1.0, policy="auto")
    prompts = _prompts(4, seed=3)
    params = [SamplingParams(temperature=0.9, seed=s, max_new_tokens=30, ignore_eos=True)
              for s in range(4)]
    a = [o.token_ids for o in eng.generate(prompts, params)]
    h1 = dict(eng.metrics.budget_hist)
    # the proposer-wide statistics persist across calls (memory); forget() resets them
    eng.policy.forget()
    b = [o.token_ids for o in eng.generate(prompts, params)]
    assert a == b and dict(eng.metrics.budget_hist) == h1


def test_bad_policy_is_refused(target):
    with pytest.raises(ValueError, match="policy"):
        Engine(target, policy="fastest")
    with pytest.raises(ValueError, match="plan"):
        Engine(target, policy=object())


# ------------------------------------------------------------------------------ confidences
def test_node_acceptance_learns_the_calibration_of_confidences():
    from specrt.policy import NodeAcceptance
    rng = random.Random(0)
    nm = NodeAcceptance(decay=1.0)
    assert nm.prob(math.log(0.3)) == pytest.approx(0.3)  # untrained: taken at its word
    for _ in range(3000):  # an over-confident proposer: accepted with probability q^2
        qs = [rng.random() for _ in range(5)]
        nm.observe([math.log(max(q, 1e-9)) for q in qs], [rng.random() < q * q for q in qs])
    for q in (0.15, 0.45, 0.75, 0.95):
        assert nm.prob(math.log(q)) == pytest.approx(q * q, abs=0.06)


def test_trim_by_confidence_keeps_the_likeliest_nodes_not_the_shallowest():
    from specrt.tree import DraftTree
    # root -> a (0.9) -> c (0.8 along the path); root -> b (0.05)
    t = DraftTree([5, 1, 2, 3], [-1, 0, 0, 1], node_logp=[0.0, math.log(0.9), math.log(0.05),
                                                          math.log(0.8)])
    menu = default_menu(3, 8, tree=True)

    def cut(verify):
        pol = AutoPolicy(CostTable.synthetic(verify, batch_sizes=(1, 2)), menu)
        return pol.trim([0], [t], [0])[0]

    tr, keep = cut(lambda b, r: 1.0)
    assert tr is t and keep is None  # flat: keep everything
    tr, keep = cut(lambda b, r: float(r))
    assert keep == [0]  # every row costs a step: plain
    tr, keep = cut(lambda b, r: 1.0 + 0.3 * (r - 1))
    assert keep == [0, 1, 3] and tr.tokens.tolist() == [5, 1, 3]  # b dropped, c kept
    assert tr.parents.tolist() == [-1, 0, 1] and tr.node_logp[2] == pytest.approx(math.log(0.8))


def test_node_confidences_are_observed_and_drive_the_trim(target):
    """Medusa under auto with a table where rows cost: its trees are cut by confidence (not
    only by depth), the node model learns from the verified trees, and greedy output stays
    equal to plain decoding."""
    prompts = _prompts(4)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in Engine(target, page_size=4).generate(prompts, params)]
    prop = MedusaProposer(target, _medusa_heads(target, 3), num_nodes=12, top_k=3)
    eng = Engine(target, proposer=prop, page_size=4, max_batch_size=4, max_draft=3,
                 policy="fixed")
    eng.policy = AutoPolicy(CostTable.synthetic(lambda b, r: 1.0 + 0.05 * (r - b),
                                                batch_sizes=(1, 2, 4)), eng.budget_menu())
    outs = eng.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    nm = eng.policy.node_models[-1]
    assert sum(nm.trials) > 50
    # trees verified with fewer nodes than drafted at the same depth: cut node by node
    hist = eng.metrics.budget_hist
    assert any(n < 1 + 3 * d for (d, n) in hist if d >= 1), hist


def test_tree_select_and_confidences_are_checked():
    from specrt.tree import DraftTree
    t = DraftTree([5, 1, 2, 3], [-1, 0, 0, 1], node_logp=[0.0, -0.1, -2.0, -0.3])
    s = t.select([0, 2])
    assert s.tokens.tolist() == [5, 2] and s.node_logp == (0.0, -2.0)
    with pytest.raises(ValueError, match="parent"):
        t.select([0, 3])
    with pytest.raises(ValueError, match="increasing"):
        t.select([1, 2])
    with pytest.raises(ValueError, match="entries"):
        DraftTree([5, 1], [-1, 0], node_logp=[0.0])
    with pytest.raises(ValueError, match="log-prob"):
        DraftTree([5, 1], [-1, 0], node_logp=[0.0, 0.5])
    with pytest.raises(ValueError, match="log-prob"):
        DraftTree([5, 1], [-1, 0], node_logp=[0.0, float("nan")])
    ch, nodes = t.first_chain()
    assert nodes == [0, 1, 3] and ch.is_chain and ch.node_logp == (0.0, -0.1, -0.3)


# ------------------------------------------------------------------------------ context
def test_verify_costs_interpolate_in_the_context_and_steer_the_policy():
    # rows nearly free at a 128-token context, a tenth of a step each at 512
    c = CostTable.synthetic(lambda b, r: 1.0 + 0.01 * (r - b), batch_sizes=(1, 2),
                            long_verify=lambda b, r: 1.2 + 0.1 * (r - b))
    assert c.verify(1, 5) == pytest.approx(1.04) and c.verify(1, 5, 128) == pytest.approx(1.04)
    assert c.verify(1, 5, 512) == pytest.approx(1.6)
    assert c.verify(1, 5, 320) == pytest.approx((1.04 + 1.6) / 2)
    assert c.verify(1, 5, 50) == pytest.approx(1.04)  # no extrapolation below the base
    assert CostTable.from_dict(c.as_dict()).verify(1, 5, 320) == pytest.approx(c.verify(1, 5, 320))
    with pytest.raises(ValueError, match="long"):
        CostTable(c.batch_sizes, c.rows, c.verify_s, c.host_s, c.draft,
                  long={"context": 64, "base": 128, "rows": c.rows, "verify_s": c.verify_s})
    menu = default_menu(4, 5, tree=False)
    # drafting costs a little per level: the budget is planned (not drafted, then trimmed)
    c = CostTable.synthetic(lambda b, r: 1.0 + 0.01 * (r - b), batch_sizes=(1, 2),
                            long_verify=lambda b, r: 1.2 + 0.1 * (r - b),
                            draft=(0.0, 0.03, 0.001, 0.0))
    pol = AutoPolicy(c, menu, _model_with([[0.3] * 4], widths=1, obs=60), probe_every=0)
    pol.set_context(130)
    short = pol.plan([0], [4])[0]
    pol.set_context(600)
    long = pol.plan([0], [4])[0]
    assert short.depth >= 3 and long.depth <= 1, (short, long)


def test_calibration_times_a_long_context(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRT_CACHE_DIR", str(tmp_path))
    tgt = tiny_model(seed=1, scale=3.0, max_pos=1024)
    eng = Engine(tgt, proposer=NgramProposer(k=3), max_batch_size=2, calibration_s=1.0)
    c = eng.calibrate()
    assert c.long is not None and c.long["context"] == 512 and c.long["base"] == 128
    assert len(c.long["rows"]) == len(c.batch_sizes)
    # a model whose context cannot hold it: one context only
    short = Engine(tiny_model(seed=1, scale=3.0, max_pos=256), proposer=NgramProposer(k=3),
                   max_batch_size=2,
                   calibration_s=0.5)
    assert short.calibrate().long is None
