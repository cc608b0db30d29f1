"""Cascade speculative drafting (specrt/proposers/cascade.py, the vertical cascade in
draft_model.py) on tiny random models (CPU, fp32).

- n-gram continuation: side-effect free (the index holds real tokens only) and equal to what
  propose() would rank first on the same context taken as real;
- vertical: the drafts (tokens, probabilities) equal plain drafting's for the same seeds, with
  fewer draft forwards, and the draft cache equals a rebuild after every step;
- greedy output equals plain decoding (both cascades, llama / qwen2, page sizes 1 / 16, batch
  1 and a batch of prompts of different lengths);
- sampling: chi-square of the first k + 1 tokens against the target's exact distribution (the
  method and alpha of test_engine.test_sampling_lossless_end_to_end), with checks that the
  cascade case happened (cheap tails accepted, inner guesses used);
- bad input raises ValueError.
"""
from __future__ import annotations

import argparse
import random

import pytest
import torch

from specrt.engine import Engine, SamplingParams
from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.models.llama import SkipSet
from specrt.proposers import (DraftModelProposer, HorizontalCascade, MedusaProposer,
                              NgramProposer, Proposer, SelfSpecProposer, create, vertical_cascade)
from specrt.proposers.cascade import from_spec

from _tiny import tiny_model
from test_engine import (_K, _N_STAT, _PROMPT, _VOCAB, _chi_square_p, _exact_joint,
                         _exact_tables, _perturbed, _random_heads, _sample_first_tokens,
                         stat_models)  # noqa: F401  (fixture)


def _prompts(n, vocab=97, seed=0):
    """Repetitive prompts of different lengths (n-gram matches)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(vocab) for _ in range(rng.randrange(2, 6))]
        out.append((base * 6)[: rng.randrange(3, 24)])
    return out


# -- the n-gram proposer's side-effect-free lookup ------------------------------------------

@pytest.mark.parametrize("prefer", ["recent", "earliest"])
def test_ngram_continuation_leaves_the_index_unchanged(prefer):
    rng = random.Random(1)
    for trial in range(40):
        real = [rng.randrange(5) for _ in range(rng.randrange(1, 30))]
        drafts = [rng.randrange(5) for _ in range(rng.randrange(0, 6))]
        depth = rng.randrange(1, 6)
        p = NgramProposer(k=4, max_n=3, prefer=prefer)
        ref = NgramProposer(k=4, max_n=3, prefer=prefer)
        if trial % 2:  # indexed by propose first, or not at all yet
            p.propose([_view(0, real)])
        got = p.continuation(0, real + drafts, len(real) - 1, depth)
        # only the real tokens are indexed: the state equals indexing them alone
        ref._state[0] = [{}, 0]
        ref._update(ref._state[0], real)
        assert p._state[0][1] == len(real)
        assert p._state[0][0] == ref._state[0][0]
        again = p.continuation(0, real + drafts, len(real) - 1, depth)
        assert again == got
        assert p._state[0][0] == ref._state[0][0]
        # and it is what propose() would rank first on the context taken as real
        fresh = NgramProposer(k=depth, max_n=3, prefer=prefer)
        tree = fresh.propose([_view(0, real + drafts)])[0]
        first = tree.first_chain()[0].tokens.tolist()[1:]
        assert got == first, (real, drafts, depth)


def _view(sid, toks, max_draft=8):
    from specrt.proposers import SeqView

    return SeqView(sid, list(toks), len(toks), len(toks) - 1, 0.0, 0, 1.0, 0, 0, max_draft)


# -- vertical cascade: same drafts, fewer forwards, a sound draft cache ----------------------

class _Recorder(Proposer):
    """Wraps a draft-model proposer: records every tree it proposes, and after every commit
    checks its cache against a rebuild of the committed positions."""

    def __init__(self, inner: DraftModelProposer):
        self.p, self.trees, self.checked = inner, [], 0
        self.name = inner.name

    def add(self, seq):
        self.p.add(seq)

    def release(self, seq_id):
        self.p.release(seq_id)

    def propose(self, seqs):
        trees = self.p.propose(seqs)
        self.trees.append([(t.tokens.tolist(), None if t.draft_probs is None else t.draft_probs.clone())
                           for t in trees])
        return trees

    def commit(self, seqs, results):
        self.p.commit(seqs, results)
        for s in seqs:
            if self.p.cache.has(s.seq_id):
                _check_cache(self.p, s.seq_id, s.token_ids)
                self.checked += 1


def _gather_kv(cache, sid, n):
    ps, pages = cache.page_size, cache.pages(sid)
    idx = torch.tensor([pages[p // ps] * ps + p % ps for p in range(n)], dtype=torch.long)
    kv = cache.kv.flatten(2, 3)  # [L, 2, pages * page_size, kvh, hd]
    return kv[:, :, idx]


def _check_cache(p: DraftModelProposer, sid, tokens):
    n = p.cache.committed_len(sid)
    assert n <= len(tokens) - 1
    if n == 0:
        return
    c = p.model.config
    fresh = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, -(-n // 16), torch.float32, "cpu")
    fresh.add_sequence(0)
    meta = build_metadata(fresh, [0], [n], "cpu")
    p.model(torch.tensor(tokens[:n]), torch.arange(n), fresh.kv, meta,
            logits_rows=torch.empty(0, dtype=torch.long))
    fresh.commit(0, n)
    # incremental and one-shot forwards round differently (~1e-4 here); K/V of a wrong token
    # at some position would be off by O(1)
    torch.testing.assert_close(_gather_kv(p.cache, sid, n), _gather_kv(fresh, 0, n),
                               atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def pair():
    tgt = tiny_model(seed=1, scale=3.0)
    return tgt, _perturbed(tgt, 0.05, seed=6)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("page_size", [1, 16])
def test_vertical_drafts_equal_plain_drafting(pair, temperature, page_size):
    tgt, drf = pair
    prompts = [[5, 6, 7, 8] * 5, [3, 9, 3, 9, 3], [11, 12, 13] * 3 + [11]]
    params = [SamplingParams(temperature=temperature, seed=s, max_new_tokens=24) for s in range(3)]
    runs = []
    for inner in (None, NgramProposer(k=4)):
        prop = DraftModelProposer(drf, tgt.config.vocab_size, k=5, page_size=page_size, inner=inner)
        rec = _Recorder(prop)
        outs = Engine(tgt, proposer=rec, num_pages=512, page_size=page_size, max_draft=5).generate(prompts, params)
        runs.append((outs, rec, prop))
    (plain_out, plain_rec, plain), (casc_out, casc_rec, casc) = runs
    assert [o.token_ids for o in casc_out] == [o.token_ids for o in plain_out]
    assert len(casc_rec.trees) == len(plain_rec.trees)
    for step_a, step_b in zip(plain_rec.trees, casc_rec.trees):
        for (ta, qa), (tb, qb) in zip(step_a, step_b):
            assert ta == tb
            torch.testing.assert_close(qb, qa, atol=1e-5, rtol=1e-5)
    assert casc_rec.checked > 0 and plain_rec.checked > 0
    # the same drafts for fewer draft forwards: the guesses were used
    assert casc.stats["drafts"] == plain.stats["drafts"]
    assert casc.forwards_saved > 0
    assert casc.stats["seq_forwards"] == plain.stats["seq_forwards"] - casc.forwards_saved


# -- greedy: identical to plain decoding ----------------------------------------------------

def _cascades(tgt, drf):
    v = tgt.config.vocab_size
    return {
        "vertical": lambda ps: vertical_cascade(DraftModelProposer(drf, v, k=4, page_size=ps),
                                                NgramProposer(k=4)),
        "vertical-adaptive": lambda ps: DraftModelProposer(drf, v, k=5, adaptive=True, page_size=ps,
                                                           inner=NgramProposer(k=3)),
        "vertical-self-spec": lambda ps: vertical_cascade(
            SelfSpecProposer(tgt, SkipSet((1, 3), (2,)), k=4), NgramProposer(k=4)),
        "horizontal-draft": lambda ps: HorizontalCascade(
            DraftModelProposer(drf, v, k=4, page_size=ps), NgramProposer(k=4), 2),
        "horizontal-medusa": lambda ps: HorizontalCascade(
            MedusaProposer(tgt, _random_heads(tgt, 3, seed=11), num_nodes=8, top_k=3),
            NgramProposer(k=4), 2, tail_nodes=6),
        "both": lambda ps: HorizontalCascade(
            vertical_cascade(DraftModelProposer(drf, v, k=4, page_size=ps), NgramProposer(k=3)),
            NgramProposer(k=4), 2),
    }


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_pair(request):
    # a small vocabulary: greedy text of a random model repeats itself now and then, so the
    # n-gram parts hit and the cascade paths run (a 97-token model's text hardly repeats)
    tgt = tiny_model(seed=1, scale=3.0, arch=request.param, vocab=_V)
    return tgt, _perturbed(tgt, 0.05, seed=7)


_V = 12


@pytest.mark.parametrize("name", ["vertical", "vertical-adaptive", "vertical-self-spec",
                                  "horizontal-draft", "horizontal-medusa", "both"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_lossless(arch_pair, name, page_size):
    tgt, drf = arch_pair
    prompts = _prompts(5, vocab=_V, seed=3)
    params = SamplingParams(max_new_tokens=24)
    plain = Engine(tgt, page_size=page_size, num_pages=1024).generate(prompts, params)
    make = _cascades(tgt, drf)[name]
    prop = make(page_size)
    eng = Engine(tgt, proposer=prop, page_size=page_size, num_pages=1024, max_draft=6)
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.metrics.accepted > 0
    one = Engine(tgt, proposer=make(page_size), page_size=page_size, num_pages=256,
                 max_draft=6).generate(prompts[:1], params)[0]
    assert one.token_ids == plain[0].token_ids
    # the cascade part was exercised
    if name.startswith("vertical"):
        assert prop.forwards_saved > 0
    else:
        assert prop.stats["tail_nodes"] > 0 and prop.stats["tail_accepted"] > 0, prop.stats


# -- sampling: the target's distribution ----------------------------------------------------

class _ExactContinuation(Proposer):
    """Test cheap part: the target's own most likely continuation (from exact tables), so the
    cheap tail is accepted often and shapes the tested distribution."""

    name = "exact-continuation"

    def __init__(self, table, prompt_len):
        self.table, self.prompt_len = table, prompt_len

    def continuation(self, seq_id, tokens, committed_len, depth):
        gen, out = tuple(tokens[self.prompt_len:]), []
        while len(out) < depth and gen in self.table:
            out.append(int(self.table[gen].argmax()))
            gen += (out[-1],)
        return out


def _stat_cascade(name, tgt, drf, table):
    if name == "vertical":
        return DraftModelProposer(drf, _VOCAB, k=_K, inner=NgramProposer(k=_K))
    if name == "horizontal-draft":
        # q from the draft model at depth 1, one-hot rows for the cheap tail
        return HorizontalCascade(DraftModelProposer(drf, _VOCAB, k=_K),
                                 _ExactContinuation(table, len(_PROMPT)), 1)
    if name == "horizontal-draft-ngram":
        return HorizontalCascade(DraftModelProposer(drf, _VOCAB, k=_K), NgramProposer(k=_K), 1)
    return HorizontalCascade(MedusaProposer(tgt, _random_heads(tgt, _K, seed=11), num_nodes=6,
                                            top_k=2), NgramProposer(k=_K), 1, tail_nodes=4)


@pytest.mark.parametrize("name,temperature,top_k,top_p", [
    ("vertical", 1.0, 0, 1.0),
    ("horizontal-draft", 1.0, 0, 1.0),
    ("horizontal-draft", 0.7, 5, 0.9),
    ("horizontal-draft-ngram", 1.0, 0, 1.0),
    ("horizontal-medusa", 0.8, 0, 1.0),
])
def test_sampling_lossless(stat_models, name, temperature, top_k, top_p):
    """Chi-square of the first k + 1 = 4 emitted tokens (jointly) over 3000 seeds against the
    target's exact distribution, alpha = 1e-4 per case (5 cases: false-failure rate <= 5e-4;
    fixed seeds, so a build passes or fails deterministically)."""
    pytest.importorskip("scipy.stats")
    tgt, drf = stat_models
    table = _exact_tables(tgt, _PROMPT, _K + 1, temperature, top_k, top_p)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = _stat_cascade(name, tgt, drf, table)
    outs, m = _sample_first_tokens(tgt, prop, _N_STAT, temperature, top_k, top_p)
    # the case under test happened: inner guesses saved forwards / cheap tails were accepted
    if name == "vertical":
        assert prop.forwards_saved >= 0.05 * _N_STAT, prop.stats
    elif name == "horizontal-draft":
        assert prop.stats["tail_accepted"] >= 0.3 * _N_STAT, prop.stats
    else:
        assert prop.stats["tail_accepted"] >= 0.02 * _N_STAT, prop.stats
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval > 1e-4, f"{name}: chi-square p = {pval:.2e}, depth histogram {m.depth_hist}"


def test_sampling_test_has_power(stat_models, monkeypatch):
    """The same test fails when the cheap tail's q rows are wrong (the strong draft's last
    distribution repeated instead of one-hot rows at the cheap tokens)."""
    pytest.importorskip("scipy.stats")
    tgt, drf = stat_models
    import specrt.proposers.cascade as cascade_mod

    def wrong_rows(tokens, like):
        return like[-1:].expand(len(tokens), -1)

    monkeypatch.setattr(cascade_mod, "_one_hot_rows", wrong_rows)
    table = _exact_tables(tgt, _PROMPT, _K + 1, 1.0)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = _stat_cascade("horizontal-draft", tgt, drf, table)
    outs, _ = _sample_first_tokens(tgt, prop, _N_STAT, 1.0)
    assert _chi_square_p(outs, exact, _VOCAB, _K + 1) < 1e-4


# -- commit mapping --------------------------------------------------------------------------

def test_horizontal_commit_clamps_to_the_strong_part(arch_pair):
    """The strong draft model sees only its own part of the accepted path: its cache holds
    exactly the committed positions it ran (rebuild check), also when the tail was accepted."""
    tgt, drf = arch_pair
    strong = DraftModelProposer(drf, tgt.config.vocab_size, k=3)
    rec = _Recorder(strong)
    casc = HorizontalCascade(rec, NgramProposer(k=4), 2)
    prompts = _prompts(4, vocab=_V, seed=8)
    eng = Engine(tgt, proposer=casc, num_pages=512, max_draft=6)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=30))
    plain = Engine(tgt, num_pages=512).generate(prompts, SamplingParams(max_new_tokens=30))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert casc.stats["tail_accepted"] > 0 and rec.checked > 0


# -- bad input -------------------------------------------------------------------------------

def test_bad_input(pair):
    tgt, drf = pair
    v = tgt.config.vocab_size
    parts = {"ngram": lambda: NgramProposer(), "draft": lambda: DraftModelProposer(drf, v, k=3)}
    make = lambda n: parts[n]()  # noqa: E731
    for spec in ("nonsense", "", "medusa", "medusa+", "foo+ngram", "medusa+draft",
                 "draft@0+ngram", "medusa@x+ngram", "draft@9+ngram", None):
        with pytest.raises(ValueError):
            from_spec(spec, make)
    for depth in (0, -1, 4, 2.5, True, "2"):
        with pytest.raises(ValueError):
            HorizontalCascade(DraftModelProposer(drf, v, k=3), NgramProposer(), depth)
    for tail in (0, -2):
        with pytest.raises(ValueError):
            HorizontalCascade(DraftModelProposer(drf, v, k=3), NgramProposer(), 1, tail=tail)
    with pytest.raises(ValueError):  # a cheap part without a side-effect-free continuation
        HorizontalCascade(DraftModelProposer(drf, v, k=3), DraftModelProposer(drf, v, k=3), 1)
    with pytest.raises(ValueError):
        vertical_cascade(DraftModelProposer(drf, v, k=3, tree_width=2), NgramProposer())
    with pytest.raises(ValueError):
        DraftModelProposer(drf, v, k=3, tree_width=2, inner=NgramProposer())
    with pytest.raises(ValueError):
        DraftModelProposer(drf, v, k=3, inner=DraftModelProposer(drf, v, k=3))
    with pytest.raises(ValueError):
        vertical_cascade(NgramProposer(), NgramProposer())
    with pytest.raises(ValueError):
        create("cascade", tgt, argparse.Namespace(cascade="medusa+medusa", num_draft=None))
    # valid specs build what they say
    p = from_spec("draft+ngram", make)
    assert isinstance(p, DraftModelProposer) and isinstance(p.inner, NgramProposer)
    h = from_spec("draft@2+ngram", make)
    assert isinstance(h, HorizontalCascade) and h.strong_depth == 2 and h.strong.inner is not None
    assert h.max_depth == 2 + h.tail
