"""The engine and the proposers, end to end on tiny random models (CPU, fp32).

Lossless claims tested here:
- greedy: every proposer's output ids equal plain greedy decoding's (exact), batched and
  unbatched, and plain decoding equals an independent full-recompute greedy loop;
- sampling: the joint distribution of the first k + 1 emitted tokens (k = the full draft
  depth, so deep acceptance and the bonus token after k accepted drafts are covered) equals the
  target's exact distribution (chi-square; see test_sampling_lossless_end_to_end), and the
  same test fails on deliberately wrong verification (test_sampling_test_has_power);
- mixed batches: greedy and sampled requests together, with every proposer;
- fixed seeds: the same request gives the same output whatever else is in the batch, and
  after a preemption.
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

from specrt import ops
from specrt.engine import Engine, SamplingParams
from specrt.acceptance import TypicalAcceptance
from specrt.models.llama import SkipSet
from specrt.proposers import (DraftModelProposer, EagleProposer, MedusaHeads, SelfSpecProposer,
                              MedusaProposer, NgramProposer, Proposer)
from specrt.tree import DraftTree

from _tiny import CharTokenizer, random_eagle_head, tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=1, scale=3.0)


@pytest.fixture(scope="module")
def draft():
    # a different random model: low acceptance, which exercises rejections
    return tiny_model(seed=2, scale=3.0, layers=2)


def _prompts(n, vocab=97, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        base = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        out.append((base * 4)[: rng.randrange(1, 20)])  # repetitive: n-gram matches
    return out


class RandomTreeProposer(Proposer):
    """Test proposer: random trees of random tokens (deterministic drafts)."""

    name = "random-tree"

    def __init__(self, vocab, max_nodes=9, seed=0, near=None):
        self.vocab, self.max_nodes, self.rng, self.near = vocab, max_nodes, random.Random(seed), near

    def propose(self, seqs):
        trees = []
        for s in seqs:
            if s.max_draft == 0:
                trees.append(DraftTree.single(s.token_ids[-1]))
                continue
            t = self.rng.randrange(1, self.max_nodes + 1)
            parents, depth = [-1], [0]
            for i in range(1, t):
                cands = [j for j in range(i) if depth[j] < s.max_draft]
                p = self.rng.choice(cands)
                parents.append(p)
                depth.append(depth[p] + 1)
            toks = [s.token_ids[-1]] + [self.rng.randrange(self.vocab if self.near is None else self.near)
                                        for _ in range(t - 1)]
            trees.append(DraftTree(toks, parents).truncated(s.max_draft, s.max_nodes))
        return trees


def _proposers(target, draft):
    return {
        "ngram": lambda: NgramProposer(k=4, max_branches=2),
        "draft": lambda: DraftModelProposer(draft, target.config.vocab_size, k=3),
        "draft-adaptive": lambda: DraftModelProposer(draft, target.config.vocab_size, k=5, adaptive=True),
        "draft-tree": lambda: DraftModelProposer(draft, target.config.vocab_size, k=3, tree_width=3),
        "self-spec": lambda: SelfSpecProposer(target, SkipSet((1, 3), (2,)), k=3),
        "random-tree": lambda: RandomTreeProposer(target.config.vocab_size, max_nodes=12, near=8),
    }


def _greedy_reference(model, prompt, n):
    """Independent greedy loop: full recompute through a fresh cache each step."""
    eng = Engine(model, page_size=4, num_pages=64, max_batch_size=1)
    toks = list(prompt)
    for _ in range(n):
        out = eng.generate([toks], SamplingParams(max_new_tokens=1))[0]
        toks.append(out.token_ids[0])
    return toks[len(prompt):]


def test_plain_greedy_matches_recompute(target):
    prompts = _prompts(3, seed=5)
    eng = Engine(target, page_size=16, num_pages=64)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=8))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _greedy_reference(target, p, 8)
        assert o.finish_reason == "length"


@pytest.mark.parametrize("name", ["ngram", "draft", "draft-adaptive", "draft-tree", "self-spec", "random-tree"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_lossless(target, draft, name, page_size):
    prompts = _prompts(7, seed=11)
    params = SamplingParams(max_new_tokens=20)
    plain = Engine(target, page_size=page_size, num_pages=2048).generate(prompts, params)
    make = _proposers(target, draft)[name]
    eng = Engine(target, proposer=make(), page_size=page_size, num_pages=2048, max_draft=5)
    spec = eng.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
    # unbatched gives the same ids
    for p, a in zip(prompts[:3], plain[:3]):
        one = Engine(target, proposer=make(), page_size=page_size, num_pages=512).generate([p], params)[0]
        assert one.token_ids == a.token_ids
    m = eng.metrics
    assert m.generated == sum(len(o.token_ids) for o in spec)
    assert m.mean_accepted_length >= 1.0


def _mixed_proposers(target, draft):
    v = target.config.vocab_size
    return {
        "ngram": lambda: NgramProposer(k=4, max_branches=2),
        "draft": lambda: DraftModelProposer(draft, v, k=3),
        "draft-tree": lambda: DraftModelProposer(draft, v, k=3, tree_width=3),
        "self-draft-tree": lambda: DraftModelProposer(target, v, k=3, tree_width=2),
        "self-spec": lambda: SelfSpecProposer(target, SkipSet((1, 3), (2,)), k=3),
        "eagle3": lambda: EagleProposer(target, random_eagle_head(target, "eagle3", seed=13),
                                        top_k=3, depth=3, total_tokens=10),
        "eagle1-choices": lambda: EagleProposer(
            target, random_eagle_head(target, "eagle1", seed=14),
            tree=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
        # sampled requests' branching deterministic trees next to draft probabilities
        "mixed": lambda: MixedProposer(DraftModelProposer(draft, v, k=3),
                                       RandomTreeProposer(v, max_nodes=12, near=8)),
    }


@pytest.mark.parametrize("name", ["ngram", "draft", "draft-tree", "self-draft-tree", "self-spec",
                                  "eagle3", "eagle1-choices", "mixed"])
def test_mixed_greedy_and_sampled_batch(target, draft, name):
    """Greedy and sampled requests in one batch: nothing raises, greedy rows equal plain greedy
    decoding token for token, and each seeded sampled row equals the same request run without
    the greedy ones."""
    prompts = _prompts(8, seed=21)
    greedy = [i % 2 == 0 for i in range(8)]
    params = [SamplingParams(max_new_tokens=16) if g else
              SamplingParams(temperature=0.8, top_p=0.95, seed=40 + i, max_new_tokens=16)
              for i, g in enumerate(greedy)]
    make = _mixed_proposers(target, draft)[name]
    prop = make()
    seen = {"branching": False, "sampled-branching": False}
    inner = prop.propose

    def spy(views):
        trees = inner(views)
        if any(t.draft_probs is not None for t in trees):
            branching = [not t.is_chain for t in trees]
            seen["branching"] |= any(branching)
            seen["sampled-branching"] |= any(b and v.temperature > 0
                                             for b, v in zip(branching, views))
        return trees

    prop.propose = spy
    eng = Engine(target, proposer=prop, num_pages=1024, max_draft=4)
    outs = eng.generate(prompts, params)
    assert all(o.error is None and len(o.token_ids) == 16 for o in outs)
    plain = Engine(target, num_pages=1024).generate(
        [p for p, g in zip(prompts, greedy) if g], SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o, g in zip(outs, greedy) if g] == [o.token_ids for o in plain]
    if name in ("draft-tree", "self-draft-tree", "mixed"):
        # the case under test happened: branching trees next to draft probabilities
        assert seen["branching"]
    if name == "mixed":  # ... and sampled ones, which the engine reduces to their first chain
        assert seen["sampled-branching"]
    if name != "mixed":  # (mixed assigns trees by sequence id, which depends on the batch)
        alone = Engine(target, proposer=make(), num_pages=1024, max_draft=4).generate(
            [p for p, g in zip(prompts, greedy) if not g],
            [x for x, g in zip(params, greedy) if not g])
        assert [o.token_ids for o, g in zip(outs, greedy) if not g] == [o.token_ids for o in alone]


def test_ngram_accepts_on_repetitive_text(target):
    # a model that copies: with a repetitive prompt greedy output repeats, n-gram drafts hit
    prompt = [5, 6, 7, 8] * 6
    eng = Engine(target, proposer=NgramProposer(k=4), num_pages=256)
    spec = eng.generate([prompt], SamplingParams(max_new_tokens=40))
    plain_eng = Engine(target, num_pages=256)
    plain = plain_eng.generate([prompt], SamplingParams(max_new_tokens=40))
    assert spec[0].token_ids == plain[0].token_ids
    # drafts were accepted, so speculation took strictly fewer verify steps than tokens
    # (NoProposer, which accepts nothing, fails both)
    assert eng.metrics.accepted > 0
    assert eng.metrics.steps < plain_eng.metrics.steps == 40


def _last_logits(model, seqs):
    """Next-token logits after each token sequence (one batched forward on a fresh cache)."""
    from specrt.kv_cache import PagedKVCache, build_metadata

    c = model.config
    pages = sum(-(-len(x) // 16) for x in seqs)
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, pages, torch.float32, "cpu")
    for i in range(len(seqs)):
        cache.add_sequence(i)
    meta = build_metadata(cache, list(range(len(seqs))), [len(x) for x in seqs], "cpu")
    toks = torch.tensor([t for x in seqs for t in x])
    pos = torch.cat([torch.arange(len(x)) for x in seqs])
    rows = torch.tensor([len(x) for x in seqs]).cumsum(0) - 1
    return model(toks, pos, cache.kv, meta, logits_rows=rows).logits


def _exact_tables(model, prompt, depth, temperature, top_k=0, top_p=1.0):
    """Processed target distribution (as the op computes it) after ``prompt + prefix``, for
    every prefix of fewer than ``depth`` tokens that has positive probability."""
    from specrt.reference import processed_probs

    v = model.config.vocab_size
    table, level = {}, [()]
    for _ in range(depth):
        n = len(level)
        probs = processed_probs(_last_logits(model, [prompt + list(x) for x in level]),
                                torch.full((n,), float(temperature)),
                                torch.full((n,), top_k, dtype=torch.int32),
                                torch.full((n,), float(top_p))).double()
        nxt = []
        for x, p in zip(level, probs):
            table[x] = p
            for a in range(v):
                if p[a] > 0:
                    nxt.append(x + (a,))
        level = nxt
    return table


def _exact_joint(table, vocab, depth):
    """float64 [vocab ** depth]: exact probability of each sequence of the first ``depth``
    tokens (index = the tokens as base-``vocab`` digits, first token most significant)."""
    joint = torch.zeros(vocab ** depth, dtype=torch.float64)

    def walk(prefix, p):
        if len(prefix) == depth:
            idx = 0
            for t in prefix:
                idx = idx * vocab + t
            joint[idx] = p
            return
        row = table[prefix]
        for a in range(vocab):
            if row[a] > 0:
                walk(prefix + (a,), p * float(row[a]))

    walk((), 1.0)
    return joint


def _chi_square_p(outs, exact, vocab, depth):
    """p-value of the emitted first-``depth``-token sequences against ``exact`` (cells with
    an expectation below 5 are merged into one bin so the chi-square approximation holds)."""
    from scipy import stats as scipy_stats

    counts = torch.zeros(vocab ** depth, dtype=torch.float64)
    for o in outs:
        assert len(o.token_ids) == depth, o.token_ids
        idx = 0
        for t in o.token_ids:
            idx = idx * vocab + t
        counts[idx] += 1
    assert counts[exact == 0].sum() == 0, "a sequence outside the target's support was emitted"
    n = len(outs)
    exp, obs = exact * n, counts
    keep = exp > 0
    small = keep & (exp < 5)
    e = torch.cat([exp[keep & ~small], exp[small].sum()[None]])
    o = torch.cat([obs[keep & ~small], obs[small].sum()[None]])
    if e[-1] == 0:
        e, o = e[:-1], o[:-1]
    return scipy_stats.chisquare(o.numpy(), e.numpy() * (o.sum() / e.sum()).item()).pvalue


class ExactTreeProposer(Proposer):
    """Test proposer: deterministic trees of the target's own ``width`` most likely tokens at
    every node (from exact tables), so drafts reach full depth often and sibling rejection is
    exercised; ``swap`` lists the second-best child first (a worse ranking, still lossless)."""

    name = "exact-tree"

    def __init__(self, table, prompt_len, width=2, swap=False):
        self.table, self.prompt_len, self.width, self.swap = table, prompt_len, width, swap

    def propose(self, seqs):
        trees = []
        for s in seqs:
            gen = tuple(s.token_ids[self.prompt_len:])
            paths = []

            def grow(prefix, path):
                row = self.table.get(gen + prefix)
                if len(path) == s.max_draft or row is None:
                    if path:
                        paths.append(path)
                    return
                top = row.topk(self.width).indices.tolist()
                if self.swap:
                    top = top[1:] + top[:1]
                for a in top:
                    if row[a] > 0:
                        grow(prefix + (a,), path + [a])

            grow((), [])
            tree = (DraftTree.from_paths(s.token_ids[-1], paths) if paths
                    else DraftTree.single(s.token_ids[-1]))
            trees.append(tree.truncated(s.max_draft, s.max_nodes))  # the step's budget
        return trees


class MixedProposer(Proposer):
    """Test proposer: draft-model chains with probabilities for odd sequence ids, another
    proposer's deterministic (branching) trees for even ones, in the same batch."""

    name = "mixed"

    def __init__(self, chains: DraftModelProposer, trees: Proposer):
        self.chains, self.trees = chains, trees

    def add(self, seq):
        self.chains.add(seq)
        self.trees.add(seq)

    def release(self, seq_id):
        self.chains.release(seq_id)
        self.trees.release(seq_id)

    def propose(self, seqs):
        odd = [s for s in seqs if s.seq_id % 2]
        chains = iter(self.chains.propose(odd)) if odd else iter(())
        trees = iter(self.trees.propose([s for s in seqs if not s.seq_id % 2]))
        return [next(chains) if s.seq_id % 2 else next(trees) for s in seqs]

    def commit(self, seqs, results):
        pick = [i for i, s in enumerate(seqs) if s.seq_id % 2]
        self.chains.commit([seqs[i] for i in pick], [results[i] for i in pick])


def _perturbed(model, eps, seed):
    """A copy of ``model`` with relative noise ``eps`` on its matrices: a draft that agrees
    with the target often, but not always."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * eps * p.std())
    return d


_VOCAB, _K, _PROMPT = 8, 3, [1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def stat_models():
    tgt = tiny_model(seed=3, scale=3.0, vocab=_VOCAB, hidden=32, layers=3)
    return tgt, _perturbed(tgt, 0.1, seed=5)


def _sample_first_tokens(tgt, proposer, n, temperature, top_k=0, top_p=1.0, depth=_K + 1):
    """The first ``depth`` tokens of ``n`` seeded requests of the same prompt."""
    eng = Engine(tgt, proposer=proposer, num_pages=8192, page_size=4, max_batch_size=512,
                 max_draft=_K)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             max_new_tokens=depth) for s in range(n)]
    return eng.generate([_PROMPT] * n, params), eng.metrics


def _stat_proposer(name, tgt, drf, table):
    return {
        "none": lambda: None,
        "draft": lambda: DraftModelProposer(drf, _VOCAB, k=_K),
        "draft-far": lambda: DraftModelProposer(
            tiny_model(seed=4, scale=3.0, vocab=_VOCAB, hidden=32, layers=1), _VOCAB, k=_K),
        "self-spec": lambda: SelfSpecProposer(tgt, SkipSet((2,), (2,)), k=_K),
        "exact-tree": lambda: ExactTreeProposer(table, len(_PROMPT)),
        "exact-tree-swapped": lambda: ExactTreeProposer(table, len(_PROMPT), swap=True),
        "random-tree": lambda: RandomTreeProposer(_VOCAB, max_nodes=10, seed=7),
        "ngram": lambda: NgramProposer(k=_K, max_branches=3),
        "medusa": lambda: MedusaProposer(tgt, _random_heads(tgt, _K, seed=11), num_nodes=12,
                                         top_k=3),
        "medusa-choices": lambda: MedusaProposer(
            tgt, _random_heads(tgt, _K, seed=12),
            tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]]),
        "eagle3": lambda: EagleProposer(
            tgt, random_eagle_head(tgt, "eagle3", seed=13, feature_layers=(1, 1, 2), scale=2.0),
            top_k=3, depth=_K, total_tokens=10),
        "eagle1-choices": lambda: EagleProposer(
            tgt, random_eagle_head(tgt, "eagle1", seed=14, scale=2.0),
            tree=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]),
        "mixed": lambda: MixedProposer(DraftModelProposer(drf, _VOCAB, k=_K),
                                       ExactTreeProposer(table, len(_PROMPT), width=2)),
    }[name]()


def _random_heads(tgt, k, seed, scale=0.3):
    """Medusa heads with random blocks (head outputs through the target's LM head)."""
    c = tgt.config
    h = MedusaHeads(c.hidden_size, c.vocab_size, k, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h.block_weight.copy_(torch.randn(h.block_weight.shape, generator=g) * scale
                             / c.hidden_size ** 0.5)
        h.block_bias.copy_(torch.randn(h.block_bias.shape, generator=g) * 0.1)
    return h


_N_STAT = 3000


@pytest.mark.parametrize("name,temperature,top_k,top_p", [
    ("none", 1.0, 0, 1.0),
    ("draft", 1.0, 0, 1.0),
    ("draft", 0.7, 5, 0.9),
    ("draft-far", 1.0, 0, 1.0),
    ("self-spec", 1.0, 0, 1.0),
    ("exact-tree", 1.0, 0, 1.0),
    ("exact-tree-swapped", 0.8, 0, 0.95),
    ("random-tree", 1.0, 0, 1.0),
    ("ngram", 0.7, 0, 1.0),
    ("mixed", 1.0, 0, 1.0),
    ("medusa", 1.0, 0, 1.0),
    ("medusa-choices", 0.8, 4, 0.9),
    ("eagle3", 1.0, 0, 1.0),
    ("eagle1-choices", 0.7, 0, 0.9),
])
def test_sampling_lossless_end_to_end(stat_models, name, temperature, top_k, top_p):
    """Chi-square of the first k + 1 = 4 emitted tokens (jointly) over 3000 seeds against the
    target's exact distribution. With max_new_tokens = k + 1 the first step drafts to the
    full depth k = 3, so deep acceptance, sibling rejection at every level and the bonus token
    after k accepted drafts all shape the tested distribution. alpha = 1e-4 per case: the
    false-failure rate of the 14 cases is at most 1.4e-3 (the seeds are fixed, so a given build
    either passes or fails deterministically)."""
    pytest.importorskip("scipy.stats")
    tgt, drf = stat_models
    table = _exact_tables(tgt, _PROMPT, _K + 1, temperature, top_k, top_p)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = _stat_proposer(name, tgt, drf, table)
    outs, m = _sample_first_tokens(tgt, prop, _N_STAT, temperature, top_k, top_p)
    if name in ("draft", "self-spec", "exact-tree", "mixed"):
        # the case reaches the bonus token after k accepted drafts often enough to matter
        assert len(m.depth_hist) == _K + 1 and m.depth_hist[_K] >= 0.05 * _N_STAT, m.depth_hist
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval > 1e-4, f"{name}: chi-square p = {pval:.2e}, depth histogram {m.depth_hist}"


def _wrong_temperature(real):
    def op(*a, temperature, **kw):
        return real(*a, temperature=temperature * 1.25, **kw)
    return op


def _wrong_deep_q(real):
    """Acceptance of the 2nd and later drafts of a chain uses a uniform q instead of the
    distribution the draft was sampled from (the first draft is verified correctly)."""
    def op(logits, tokens, parents, indptr, *, draft_probs=None, **kw):
        if draft_probs is not None:
            local = torch.arange(tokens.shape[0]) - torch.repeat_interleave(
                indptr[:-1].long(), (indptr[1:] - indptr[:-1]).long())
            draft_probs = draft_probs.clone()
            draft_probs[local >= 1] = 1.0 / draft_probs.shape[1]
        return real(logits, tokens, parents, indptr, draft_probs=draft_probs, **kw)
    return op


def _wrong_bonus(real):
    """After two or more accepted drafts ending at a leaf, the bonus token is the argmax of the
    leaf's logits instead of a sample."""
    def op(logits, tokens, parents, indptr, **kw):
        out = real(logits, tokens, parents, indptr, **kw)
        for b in range(indptr.shape[0] - 1):
            lo, hi = int(indptr[b]), int(indptr[b + 1])
            na = int(out.num_accepted[b])
            last = int(out.path[b, na]) if na >= 0 else -1
            if na >= 2 and last not in parents[lo + 1:hi].tolist():
                out.tokens[b, na] = int(logits[lo + last].argmax())
        return out
    return op


@pytest.mark.parametrize("bug,name", [
    ("temperature", "draft"),
    ("deep-q", "self-spec"),
    ("bonus", "self-spec"),
    ("bonus", "exact-tree"),
])
def test_sampling_test_has_power(stat_models, monkeypatch, bug, name):
    """The statistical test above must reject a broken verification. The deep-q and bonus bugs
    only act from the second draft on, where a test of the first two tokens (one draft)
    cannot see them."""
    pytest.importorskip("scipy.stats")
    tgt, drf = stat_models
    table = _exact_tables(tgt, _PROMPT, _K + 1, 1.0)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    wrap = {"temperature": _wrong_temperature, "deep-q": _wrong_deep_q, "bonus": _wrong_bonus}[bug]
    monkeypatch.setattr(ops, "rejection_sample", wrap(ops.rejection_sample))
    outs, m = _sample_first_tokens(tgt, _stat_proposer(name, tgt, drf, table), _N_STAT, 1.0)
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval < 1e-6, f"{bug}: the wrong verification passed (p = {pval:.2e})"


def test_seed_is_batch_independent(target, draft):
    p = SamplingParams(temperature=0.8, seed=1234, max_new_tokens=12)
    prompt = [3, 4, 5, 3, 4]
    for make in (lambda: None, lambda: DraftModelProposer(draft, target.config.vocab_size, k=3)):
        alone = Engine(target, proposer=make(), num_pages=512).generate([prompt], p)[0].token_ids
        again = Engine(target, proposer=make(), num_pages=512).generate([prompt], p)[0].token_ids
        others = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=9) for s in range(5)]
        mixed = Engine(target, proposer=make(), num_pages=512).generate(
            _prompts(5, seed=2) + [prompt], others + [p])[-1].token_ids
        assert alone == again == mixed


def test_stop_rules(target):
    tok = CharTokenizer()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    plain = Engine(target, tok, num_pages=256).generate([prompt], SamplingParams(max_new_tokens=30))[0]
    ids = plain.token_ids
    # a stop token in the middle of what would be an accepted path: nothing after it
    stop_tok = ids[5]
    first = ids.index(stop_tok)
    for prop in (None, NgramProposer(k=6), RandomTreeProposer(97, near=8)):
        o = Engine(target, tok, proposer=prop, num_pages=256).generate(
            [prompt], SamplingParams(max_new_tokens=30, stop_token_ids=[stop_tok]))[0]
        assert o.token_ids == ids[: first + 1] and o.finish_reason == "stop"
        assert o.text == tok.decode(ids[:first])
        o = Engine(target, tok, proposer=prop, num_pages=256).generate(
            [prompt], SamplingParams(max_new_tokens=7))[0]
        assert o.token_ids == ids[:7] and o.finish_reason == "length"
    # stop string: the text is cut before it
    text = tok.decode(ids)
    s = text[6:8]
    o = Engine(target, tok, proposer=NgramProposer(k=5), num_pages=256).generate(
        [prompt], SamplingParams(max_new_tokens=30, stop=[s]))[0]
    assert o.finish_reason == "stop" and o.text == text[: text.index(s)]


def test_streaming_concatenates_to_generate(target):
    tok = CharTokenizer()
    prompts = ["abcabc", "xyzxy", "a"]
    params = SamplingParams(max_new_tokens=15)
    full = Engine(target, tok, proposer=NgramProposer(), num_pages=256).generate(prompts, params)
    got = {i: ("", []) for i in range(3)}
    finals = {}
    for ev in Engine(target, tok, proposer=NgramProposer(), num_pages=256).stream(prompts, params):
        t, ids = got[ev.index]
        got[ev.index] = (t + ev.text, ids + ev.token_ids)
        if ev.finished:
            finals[ev.index] = ev.output
    for i, o in enumerate(full):
        assert got[i][0] == o.text and got[i][1] == o.token_ids
        assert finals[i].token_ids == o.token_ids


def test_bad_requests_do_not_disturb_others(target):
    eng = Engine(target, CharTokenizer(), num_pages=256, max_seq_len=64)
    good = [1, 2, 3]
    outs = eng.generate([[], good, [1] * 100, [5, 999], good],
                        [SamplingParams(max_new_tokens=5)] * 2 + [SamplingParams(max_new_tokens=5)] * 3)
    assert outs[0].error and "empty" in outs[0].error
    assert outs[2].error and "context" in outs[2].error
    assert outs[3].error and "token ids" in outs[3].error
    ref = Engine(target, num_pages=256).generate([good], SamplingParams(max_new_tokens=5))[0]
    assert outs[1].token_ids == ref.token_ids == outs[4].token_ids
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1).validate()
    bad = eng.generate([good], SamplingParams(top_p=0.0))[0]
    assert bad.error and "top_p" in bad.error


def test_out_of_pages_preempts_and_stays_lossless(target, draft):
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_new_tokens=24)
    ref = Engine(target, num_pages=2048, page_size=4).generate(prompts, params)
    # room for ~2 sequences at a time: requests wait or get preempted and recomputed
    eng = Engine(target, proposer=DraftModelProposer(draft, target.config.vocab_size, k=3),
                 num_pages=40, page_size=4, max_tree_nodes=8, max_draft=3)
    outs = eng.generate(prompts, params)
    assert eng.metrics.preemptions >= 1
    for a, b in zip(ref, outs):
        assert a.token_ids == b.token_ids and b.error is None
    # seeded sampling: the request's Philox offsets (its step count) survive preemption and the
    # recomputed cache holds the same K/V, so a preempted run equals an unpreempted one
    sampled = [SamplingParams(temperature=0.9, seed=100 + i, max_new_tokens=24) for i in range(6)]
    make = lambda: DraftModelProposer(draft, target.config.vocab_size, k=3)  # noqa: E731
    roomy = Engine(target, proposer=make(), num_pages=2048, page_size=4, max_tree_nodes=8,
                   max_draft=3)
    ref = roomy.generate(prompts, sampled)
    assert roomy.metrics.preemptions == 0
    eng = Engine(target, proposer=make(), num_pages=40, page_size=4, max_tree_nodes=8, max_draft=3)
    outs = eng.generate(prompts, sampled)
    assert eng.metrics.preemptions >= 1
    for a, b in zip(ref, outs):
        assert a.token_ids == b.token_ids and b.error is None
    # a request that can never fit fails cleanly, the others complete
    eng = Engine(target, num_pages=6, page_size=4, max_tree_nodes=4)
    outs = eng.generate([[1] * 30, [1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert outs[0].error is not None and "KV cache" in outs[0].error
    assert outs[1].error is None and len(outs[1].token_ids) == 3


@pytest.mark.parametrize("width", [1, 3])
def test_self_draft_accepts_everything(target, width):
    """The target drafting for itself (greedy) must have every draft accepted: any corruption
    of the draft cache (catch-up, tree rollback via kv_rollback) would show as a rejection."""
    prop = DraftModelProposer(target, target.config.vocab_size, k=3, tree_width=width)
    eng = Engine(target, proposer=prop, num_pages=512, max_draft=3)
    outs = eng.generate(_prompts(3, seed=9), SamplingParams(max_new_tokens=17))
    for o in outs:
        # 17 tokens = four full steps of 3 drafts + bonus, then one step with no room to draft
        assert o.metrics.depth_hist == [1, 0, 0, 4], o.metrics.depth_hist
        assert len(o.token_ids) == 17 and o.metrics.steps == 5


def test_engine_plans_split_kv_on_cuda_only(target, monkeypatch):
    """The engine builds a split-KV planner for CUDA devices only (checked on a pretend CUDA
    device: the planner allocates nothing until it plans)."""
    import types

    from specrt.attention_plan import AttentionPlanner
    from specrt.engine import attention_planner

    cfg = target.config
    assert Engine(target, num_pages=64).planner is None  # CPU: the op ignores plans
    assert attention_planner(cfg, 16, torch.device("cpu"), 4, 8) is None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(multi_processor_count=132))
    pl = attention_planner(cfg, 16, torch.device("cuda:0"), 4, 8)
    assert isinstance(pl, AttentionPlanner) and pl.device == torch.device("cuda:0")
    assert (pl.num_qo_heads, pl.num_kv_heads, pl.head_dim, pl.page_size, pl.num_sms) == \
        (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16, 132)
    assert (pl.max_batch, pl.max_t) == (4, 8)


def test_engine_verify_steps_carry_the_plan(target, draft):
    """With a planner (on CUDA; here one on the CPU, whose op ignores the plan), every verify
    step's metadata carries the plan of exactly that step, shared by all layers, and the
    output is unchanged."""
    from specrt.attention_plan import AttentionPlanner, plan_tree_attention

    cfg = target.config
    prompts = [[3, 1, 4, 1, 5] * 30, [2, 7]]  # 150 tokens: past one 128-key chunk, so it splits
    params = SamplingParams(max_new_tokens=10)
    ref = Engine(target, num_pages=256).generate(prompts, params)
    eng = Engine(target, proposer=DraftModelProposer(draft, cfg.vocab_size, k=3, tree_width=2),
                 num_pages=256)
    eng.planner = AttentionPlanner(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   eng.cache.page_size, "cpu", max_batch=2, max_t=64, num_sms=132)
    metas = []
    inner = target.forward

    def spy(ids, pos, kv, meta, **kw):
        if kv is eng.cache.kv:
            plan = None if meta.plan is None else meta.plan.clone()  # the buffer is reused
            metas.append((plan, meta.qo_indptr.clone(), meta.seq_lens.clone(),
                          kw.get("logits_rows")))
        return inner(ids, pos, kv, meta, **kw)

    target.forward = spy
    try:
        outs = eng.generate(prompts, params)
    finally:
        del target.forward
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    verify = [m for m in metas if m[3] is None]  # a prefill asks for no logits rows
    assert verify and all(m[0] is not None for m in verify)
    assert all(m[0] is None for m in metas if m[3] is not None)  # prefills never split
    assert eng.planner.num_plans == len(verify)  # one plan per step, for every layer
    for plan, qo, lens, _ in verify:
        want, _ = plan_tree_attention(qo, lens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                      eng.cache.page_size, 132, "cpu")
        assert torch.equal(plan, want)
        assert int(plan[0]) > qo.numel() - 1  # the long sequence is split into several items


def test_nvml_flag_needs_cuda(target):
    with pytest.raises(ValueError, match="CUDA"):
        Engine(target, nvml=True)


def _gpu_model():
    """The tiny target in bf16 on CUDA, with head_dim 64 (the CUDA tree_attention kernel takes
    head_dim 64 / 128 / 256)."""
    m = tiny_model(seed=1, scale=3.0, hidden=256, heads=4, kv_heads=2)
    assert m.config.head_dim == 64
    m = m.to(device="cuda", dtype=torch.bfloat16)
    m.device, m.dtype = torch.device("cuda"), torch.bfloat16
    return m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_gpu_lossless_and_bandwidth():
    """bf16 on GPU (the CUDA kernels take fp16/bf16): speculative greedy vs plain greedy on the
    same device. Different tree shapes may take different attention paths whose bf16 rounding
    differs, so a late near-tie can flip: require 3 of 4 prompts identical and every output's
    first 4 tokens identical. NVML must really measure (GPM, or the utilization fallback)."""
    gpu = _gpu_model()
    prompts = _prompts(4, seed=1)
    p = SamplingParams(max_new_tokens=16)
    ref = Engine(gpu, num_pages=512).generate(prompts, p)
    eng = Engine(gpu, proposer=NgramProposer(k=4), num_pages=512, nvml=True)
    outs = eng.generate(prompts, p)
    assert all(o.error is None and len(o.token_ids) == 16 for o in outs + ref)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, outs))
    assert same >= 3 and all(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(ref, outs))
    assert eng.planner is not None and eng.planner.num_plans > 0
    bw = eng.metrics.bandwidth
    assert bw.get("method") in ("gpm", "utilization"), bw
    assert bw.get("dram_bw_util_pct") is not None, bw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_split_kv_plan_on_gpu():
    """Long contexts on CUDA: the engine's verify steps run the split-KV path (more plan items
    than sequences: partial outputs + merge) with a mixed greedy / sampled batch, and agree with
    the same engine without a plan (first tokens exactly; fp32 partial merging may round bf16
    differently, so a late near-tie may flip)."""
    gpu = _gpu_model()
    prompts = [[3, 1, 4, 1, 5] * 60, [2, 7, 1, 8] * 40 + [2], [9, 9, 8]]  # 300, 161, 3 tokens
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12),
              SamplingParams(temperature=0.8, seed=5, max_new_tokens=12)]
    draft = tiny_model(seed=2, scale=3.0, hidden=256, heads=4, kv_heads=2, layers=2).to(
        device="cuda", dtype=torch.bfloat16)
    make = lambda: DraftModelProposer(draft, gpu.config.vocab_size, k=3, tree_width=2)  # noqa: E731
    eng = Engine(gpu, proposer=make(), num_pages=512)
    assert eng.planner is not None
    items = []
    inner = eng.planner.plan

    def spy(qo, lens):
        plan, ws = inner(qo, lens)
        items.append((int(plan[0]), len(lens)))
        return plan, ws

    eng.planner.plan = spy
    outs = eng.generate(prompts, params)
    assert all(o.error is None and len(o.token_ids) == 12 for o in outs)
    assert items and any(n > b for n, b in items), items
    noplan = Engine(gpu, proposer=make(), num_pages=512)
    noplan.planner = None
    ref = noplan.generate(prompts, params)
    assert all(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(outs, ref))
    assert sum(a.token_ids == b.token_ids for a, b in zip(outs, ref)) >= 2


def test_host_time_per_step_is_reported(target):
    """The engine's own time per verify step (outside the target's forward) is measured and
    exported (bench/e2e.py reports it); it is part of the step time, not more."""
    eng = Engine(target, proposer=NgramProposer(k=4), num_pages=256)
    eng.generate([[5, 6, 7, 8] * 4], SamplingParams(max_new_tokens=20))
    m = eng.metrics
    d = m.as_dict()
    assert m.steps > 0 and m.target_s > 0
    step_ms = 1e3 * sum(m.phase_s[p] for p in ("propose", "verify", "sample", "rollback",
                                                 "commit", "host")) / m.steps
    assert 0 < m.host_ms_per_step < step_ms
    assert d["host_ms_per_step"] == m.host_ms_per_step


def test_typical_acceptance_is_lossy_and_opt_in(stat_models):
    """Medusa's typical acceptance (opt-in, lossy) visibly changes the sampled distribution:
    the chi-square test that the default (exact) verification passes rejects it. Greedy
    requests stay exact under it."""
    pytest.importorskip("scipy.stats")
    tgt, _ = stat_models
    table = _exact_tables(tgt, _PROMPT, _K + 1, 1.0)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = ExactTreeProposer(table, len(_PROMPT))
    eng = Engine(tgt, proposer=prop, num_pages=8192, page_size=4, max_batch_size=512,
                 max_draft=_K, lossy_acceptance=TypicalAcceptance(0.3, 0.3))
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=_K + 1)
              for s in range(_N_STAT)]
    outs = eng.generate([_PROMPT] * _N_STAT, params)
    # the filtered bonus token never leaves the support, but the frequencies move
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval < 1e-6, f"typical acceptance looked lossless (p = {pval:.2e})"
    greedy = SamplingParams(max_new_tokens=12)
    ref = Engine(tgt).generate([_PROMPT], greedy)[0].token_ids
    got = Engine(tgt, proposer=prop, max_draft=_K,
                 lossy_acceptance=TypicalAcceptance()).generate([_PROMPT], greedy)[0].token_ids
    assert got == ref
