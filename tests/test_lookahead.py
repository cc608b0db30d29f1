"""Lookahead decoding: Jacobi window as auxiliary rows of the verify forward, n-gram pool,
lossless verification (greedy == plain, sampled output by chi-square), and the engine's
auxiliary-row contract (the rows' K/V never join the sequence)."""
from __future__ import annotations

import pytest
import torch

from specrt.engine import Engine, SamplingParams
from specrt.kv_cache import build_metadata
from specrt.proposers import LookaheadProposer
from specrt.proposers.base import AuxRows, SeqView
from _tiny import tiny_model
from test_engine import (_K, _N_STAT, _PROMPT, _VOCAB, _chi_square_p, _exact_joint,
                         _exact_tables, _prompts)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request):
    return tiny_model(seed=1, scale=3.0, arch=request.param)


class Recorder(LookaheadProposer):
    """Lookahead that records each step's aux rows, predictions and the emitted tokens."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log = []

    def commit(self, seqs, results):
        for s, r, a in zip(seqs, results, self._aux):
            self.log.append((s.seq_id, list(s.token_ids), s.committed_len, a, r.aux_tokens,
                             r.num_accepted))
        super().commit(seqs, results)


@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_equals_plain(target, page_size):
    prompts = _prompts(7, seed=11)
    params = SamplingParams(max_new_tokens=24)
    plain = Engine(target, page_size=page_size, num_pages=2048).generate(prompts, params)
    prop = Recorder(window=3, ngram=3, guesses=3)
    eng = Engine(target, proposer=prop, page_size=page_size, num_pages=2048, max_draft=4)
    spec = eng.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
    # the case under test happened: aux rows ran and drafts were accepted
    assert any(rec[3] is not None for rec in prop.log)
    assert eng.metrics.mean_accepted_length > 1.0
    # rows counted per verify forward: plain decoding of one prompt has one row per step;
    # lookahead's steps carry tree nodes and aux rows
    one = Engine(target, page_size=page_size, num_pages=512)
    one.generate(prompts[:1], params)
    assert one.metrics.verify_forwards == one.metrics.steps == 24
    assert one.metrics.rows_per_forward == 1.0
    assert eng.metrics.rows_per_forward > len(prompts)
    for p, a in zip(prompts[:2], plain[:2]):  # unbatched
        one = Engine(target, proposer=LookaheadProposer(window=3, ngram=3, guesses=3),
                     page_size=page_size, num_pages=512).generate([p], params)[0]
        assert one.token_ids == a.token_ids


def test_fallback_spends_rows_only_without_a_lookup_match(target):
    """fallback=True: in a step where prompt lookup found a continuation the tree is that chain
    alone and no aux rows run; elsewhere window and pool run. Batched, both kinds of steps
    occur, and the output equals plain decoding."""
    prompts = _prompts(6, seed=5)
    prompts = [p + p[:6] for p in prompts]  # repeated text: lookup matches in some steps
    params = SamplingParams(max_new_tokens=30)
    plain = Engine(target, page_size=4, num_pages=2048).generate(prompts, params)
    prop = Recorder(window=2, ngram=3, guesses=2, fallback=True)
    seen = {"matched": 0, "window": 0}
    orig, orig_lookup = prop.propose, prop._lookup.propose
    lookups = []

    def lookup(seqs):
        lookups[:] = orig_lookup(seqs)
        return lookups

    def propose(seqs):
        trees = orig(seqs)
        for t, lk, a in zip(trees, lookups, prop._aux):
            if lk.num_nodes > 1:  # prompt lookup matched: its chain alone, no window
                seen["matched"] += 1
                assert a is None and t.tokens.tolist() == lk.tokens.tolist()
            elif a is not None:
                seen["window"] += 1
        return trees

    prop._lookup.propose, prop.propose = lookup, propose
    eng = Engine(target, proposer=prop, page_size=4, num_pages=2048)
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert seen["matched"] > 0 and seen["window"] > 0, seen
    with pytest.raises(ValueError, match="fallback"):
        LookaheadProposer(fallback=True, prompt_lookup=False)


def test_jacobi_only_drafts_are_used(target):
    """Without prompt lookup and without pooling the text, every draft comes from n-grams
    the Jacobi window harvested: still lossless, and some are accepted."""
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=40)
    plain = Engine(target, page_size=4, num_pages=1024).generate(prompts, params)
    prop = LookaheadProposer(window=4, ngram=3, guesses=4, prompt_lookup=False,
                             pool_from_text=False)
    eng = Engine(target, proposer=prop, page_size=4, num_pages=1024)
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.metrics.mean_accepted_length > 1.0


def test_aux_rows_predict_what_the_target_predicts(target):
    """Each aux row's prediction is the target's argmax after the context its mask and
    position describe: committed tokens, root, level 0 up to its column, its column's earlier
    levels (checked against an independent plain forward of that context)."""
    prop = Recorder(window=3, ngram=4, guesses=2)
    eng = Engine(target, proposer=prop, page_size=4, num_pages=256)
    eng.generate([[5, 9, 13, 2, 7]], SamplingParams(max_new_tokens=12))
    checked = 0
    ref = Engine(target, page_size=4, num_pages=256)
    for sid, toks, committed, aux, preds, na in prop.log[:6]:
        if aux is None:
            continue
        ctx0 = toks[:committed + 1]  # committed tokens and the root
        for a, (tok, off, m) in enumerate(zip(aux.tokens, aux.offsets, aux.sees)):
            seen = [aux.tokens[j] for j in range(a + 1) if (m >> j) & 1]
            assert len(seen) == off  # a contiguous context of offsets 1..off
            want = ref.generate([ctx0 + seen], SamplingParams(max_new_tokens=1))[0].token_ids[0]
            assert preds[a] == want, (a, off)
            checked += 1
    assert checked >= 9 * 3


def test_aux_rows_never_reach_the_cache(target):
    """After every step the sequence's cached K/V equal those of a plain prefill of the same
    tokens, and the committed length counts tree tokens only."""
    snaps = []

    class Snap(LookaheadProposer):
        def commit(self, seqs, results):
            super().commit(seqs, results)
            s = seqs[0]
            c = eng.cache
            n = c.committed_len(s.seq_id)
            assert n == len(s.token_ids) - 1
            slots = torch.as_tensor(c.slot_mapping(s.seq_id, 0, n))
            kv = c.kv.flatten(2, 3)[:, :, slots].clone()
            snaps.append((list(s.token_ids[:n]), kv))

    eng = Engine(target, proposer=Snap(window=4, ngram=3, guesses=3), page_size=4,
                 num_pages=256)
    eng.generate([[3, 4, 5, 3, 4]], SamplingParams(max_new_tokens=16))
    assert len(snaps) >= 3
    for toks, kv in snaps:
        ref = Engine(target, page_size=4, num_pages=256)
        c = ref.cache
        c.add_sequence(1)
        meta = build_metadata(c, [1], [len(toks)])
        target(torch.tensor(toks), torch.arange(len(toks)), c.kv, meta)
        c.commit(1, len(toks))
        slots = torch.as_tensor(c.slot_mapping(1, 0, len(toks)))
        want = c.kv.flatten(2, 3)[:, :, slots]
        # (rounding of different GEMM shapes only: a leaked aux row would differ by O(1))
        torch.testing.assert_close(kv, want, rtol=1e-4, atol=1e-4)


def test_batch_with_different_windows_and_pools(target):
    """Requests with their own W / N / G (per-request draft_options), admitted at different
    times (batch limit 3 for 6 prompts): each equals plain decoding."""
    prompts = _prompts(6, seed=21)
    opts = [None, {"window": 1, "ngram": 2}, {"window": 5, "ngram": 4, "guesses": 1},
            {"guesses": 0}, {"window": 0, "guesses": 5}, {"ngram": 5, "window": 2}]
    params = [SamplingParams(max_new_tokens=18 + i, draft_options=o) for i, o in enumerate(opts)]
    plain = Engine(target, page_size=4, num_pages=1024).generate(
        prompts, [SamplingParams(max_new_tokens=p.max_new_tokens) for p in params])
    prop = Recorder(window=3, ngram=3, guesses=2)
    eng = Engine(target, proposer=prop, page_size=4, num_pages=1024, max_batch_size=3)
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    sizes = {len(rec[3].tokens) for rec in prop.log if rec[3] is not None}
    assert len(sizes) >= 3  # different window states side by side


def test_pool_is_bounded(target):
    prop = LookaheadProposer(window=4, ngram=3, guesses=2, pool_per_key=2, pool_keys=5)
    seen = []
    eng = Engine(target, proposer=prop, page_size=4, num_pages=256)
    orig = prop.commit

    def commit(seqs, results):
        orig(seqs, results)
        for st in prop._state.values():
            seen.append((len(st.pool), max((len(g) for g in st.pool.values()), default=0)))

    prop.commit = commit
    eng.generate(_prompts(2, seed=4), SamplingParams(max_new_tokens=40))
    assert seen and max(k for k, _ in seen) == 5 and max(g for _, g in seen) <= 2


def test_bad_settings():
    for kw in ({"window": -1}, {"ngram": 1}, {"guesses": -2}, {"window": 0, "guesses": 0},
               {"window": 2.5}, {"lookup_depth": 0}, {"lookup_depth": True}):
        with pytest.raises(ValueError):
            LookaheadProposer(**kw)
    tgt = tiny_model(seed=1, scale=3.0)
    eng = Engine(tgt, proposer=LookaheadProposer(), page_size=4, num_pages=256)
    good = SamplingParams(max_new_tokens=4)
    bad = [SamplingParams(max_new_tokens=4, draft_options={"window": 40, "ngram": 4}),
           SamplingParams(max_new_tokens=4, draft_options={"windw": 3}),
           SamplingParams(max_new_tokens=4, draft_options={"ngram": 0})]
    outs = eng.generate([[1, 2, 3]] * 4, [good] + bad)
    assert outs[0].error is None and len(outs[0].token_ids) == 4
    assert "max_tree_nodes" in outs[1].error
    assert "windw" in outs[2].error
    assert "ngram" in outs[3].error
    with pytest.raises(ValueError, match="itself"):
        AuxRows((1, 2), (1, 2), (1, 1))
    with pytest.raises(ValueError, match="offset"):
        AuxRows((1,), (0,), (1,))


def test_prompt_lookup_chain_runs_deeper_than_the_ngrams():
    """The prompt-lookup branch drafts up to lookup_depth tokens (here 5 > N - 1 = 2), capped
    by the step's max_draft; the pool's guesses stay N - 1 long; the row bound counts both."""
    prop = LookaheadProposer(window=2, ngram=3, guesses=1, lookup_depth=5)
    assert prop.max_depth == 5 and prop.max_nodes == 1 + 5 + (1 + 2) * 2
    assert LookaheadProposer(window=2, ngram=4, guesses=1, prompt_lookup=False).max_depth == 3
    toks = [5, 6, 7, 8, 9, 10, 11, 12, 3, 4, 5, 6]  # "5 6" occurred before: lookup 7 8 9 10 11
    for max_draft, want in ((8, [7, 8, 9, 10, 11]), (3, [7, 8, 9])):
        view = SeqView(0, toks, len(toks), len(toks) - 1, 0.0, 0, 1.0, 0, 0, max_draft, {})
        prop.add(view)
        tree = prop.propose([view])[0]
        toks_np, par = tree.tokens.tolist(), list(tree.parents)

        def path(n):
            out = []
            while n > 0:
                out.append(toks_np[n])
                n = par[n]
            return tuple(reversed(out))
        paths = {path(n) for n in range(1, len(toks_np)) if n not in par}
        assert tuple(want) in paths, paths
        assert all(len(p) <= 2 for p in paths if p[:len(want)] != tuple(want)), paths
        prop.release(0)


@pytest.fixture(scope="module")
def stat_target():
    return tiny_model(seed=3, scale=3.0, vocab=_VOCAB, hidden=32, layers=3)


# The prompt holds the target's greedy 2-token continuation after "2" (a fixed point found by
# search), so the pool's guesses are accepted to full depth often enough to matter.
_STAT_PROMPT = _PROMPT + [1, 4] + _PROMPT  # greedy continues it with 1, 4


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_sampling_lossless(stat_target, temperature, top_k, top_p):
    """Chi-square of the first k + 1 = 4 tokens over 3000 seeds against the exact
    distribution (the method of test_engine.test_sampling_lossless_end_to_end, alpha 1e-4 per
    case). N = 3: the Jacobi window harvests n-grams after its second step, so pooled text,
    prompt lookup and Jacobi guesses all draft within the tested tokens."""
    pytest.importorskip("scipy.stats")
    tgt = stat_target
    table = _exact_tables(tgt, _STAT_PROMPT, _K + 1, temperature, top_k, top_p)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = LookaheadProposer(window=3, ngram=3, guesses=3)
    eng = Engine(tgt, proposer=prop, num_pages=8192, page_size=4, max_batch_size=512,
                 max_draft=_K)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             max_new_tokens=_K + 1) for s in range(_N_STAT)]
    outs = eng.generate([_STAT_PROMPT] * _N_STAT, params)
    m = eng.metrics
    # drafts were accepted to the pool's full depth (N - 1 = 2) often, and the prompt-lookup
    # chain (lookup_depth 4, capped by max_draft = k) beyond it
    assert len(m.depth_hist) <= _K + 1 and sum(m.depth_hist[2:]) >= 0.05 * sum(m.depth_hist), \
        m.depth_hist
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval > 1e-4, f"chi-square p = {pval:.2e}, depth histogram {m.depth_hist}"
