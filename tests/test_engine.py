"""The engine and the proposers, end to end on tiny random models (CPU, fp32).

Lossless claims tested here:
- greedy: every proposer's output ids equal plain greedy decoding's (exact), batched and
  unbatched, and plain decoding equals an independent full-recompute greedy loop;
- sampling: the joint distribution of the first two emitted tokens under speculation equals
  the target's exact distribution (chi-square; see test_sampling_lossless_end_to_end);
- fixed seeds: the same request gives the same output whatever else is in the batch.
"""
from __future__ import annotations

import random

import pytest
import torch

from specrt.engine import Engine, SamplingParams
from specrt.proposers import (DraftModelProposer, LayerSkipProposer, NgramProposer, Proposer)
from specrt.tree import DraftTree

from _tiny import CharTokenizer, tiny_model

scipy_stats = pytest.importorskip("scipy.stats")


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
            trees.append(DraftTree(toks, parents))
        return trees


def _proposers(target, draft):
    return {
        "ngram": lambda: NgramProposer(k=4, max_branches=2),
        "draft": lambda: DraftModelProposer(draft, target.config.vocab_size, k=3),
        "draft-adaptive": lambda: DraftModelProposer(draft, target.config.vocab_size, k=5, adaptive=True),
        "draft-tree": lambda: DraftModelProposer(draft, target.config.vocab_size, k=3, tree_width=3),
        "layer-skip": lambda: LayerSkipProposer(target, 2, k=3),
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


@pytest.mark.parametrize("name", ["ngram", "draft", "draft-adaptive", "draft-tree", "layer-skip", "random-tree"])
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


def test_ngram_accepts_on_repetitive_text(target):
    # a model that copies: with a repetitive prompt greedy output repeats, n-gram drafts hit
    prompt = [5, 6, 7, 8] * 6
    eng = Engine(target, proposer=NgramProposer(k=4), num_pages=256)
    eng.generate([prompt], SamplingParams(max_new_tokens=40))
    plain = Engine(target, num_pages=256).generate([prompt], SamplingParams(max_new_tokens=40))
    assert eng.metrics.steps <= plain[0].metrics.steps  # never more verify steps than tokens


def _exact_first_two(model, prompt, temperature, top_k=0, top_p=1.0):
    """Exact joint distribution of the first two sampled tokens (processed like the op)."""
    from specrt.reference import processed_probs

    v = model.config.vocab_size

    dist = lambda toks: _next_logits(model, toks)  # noqa: E731

    t = torch.tensor([temperature], dtype=torch.float32)
    k = torch.tensor([top_k], dtype=torch.int32)
    p = torch.tensor([top_p], dtype=torch.float32)
    p1 = processed_probs(dist(prompt)[None], t, k, p)[0].double()
    joint = torch.zeros(v, v, dtype=torch.float64)
    for a in range(v):
        if p1[a] > 0:
            joint[a] = p1[a] * processed_probs(dist(prompt + [a])[None], t, k, p)[0].double()
    return joint


def _next_logits(model, toks):
    from specrt.kv_cache import PagedKVCache, build_metadata

    c = model.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 16, torch.float32, "cpu")
    cache.add_sequence(0)
    meta = build_metadata(cache, [0], [len(toks)], "cpu")
    out = model(torch.tensor(toks), torch.arange(len(toks)), cache.kv, meta,
                logits_rows=torch.tensor([len(toks) - 1]))
    return out.logits[0]


@pytest.mark.parametrize("name,temperature,top_k,top_p", [
    ("none", 1.0, 0, 1.0),
    ("draft", 1.0, 0, 1.0),
    ("draft", 0.7, 5, 0.9),
    ("layer-skip", 1.0, 0, 1.0),
    ("random-tree", 1.0, 0, 1.0),
    ("ngram", 0.7, 0, 1.0),
])
def test_sampling_lossless_end_to_end(name, temperature, top_k, top_p):
    """Chi-square of the (first, second) emitted-token pair over 3000 seeds against the exact
    target distribution. alpha = 1e-4 per case (false-failure rate 6e-4 over the 6 cases)."""
    vocab = 8
    tgt = tiny_model(seed=3, scale=2.0, vocab=vocab, hidden=32, layers=3)
    drf = tiny_model(seed=4, scale=2.0, vocab=vocab, hidden=32, layers=1)
    prompt = [1, 2, 3, 1, 2]
    makers = {
        "none": lambda: None,
        "draft": lambda: DraftModelProposer(drf, vocab, k=3),
        "layer-skip": lambda: LayerSkipProposer(tgt, 1, k=3),
        "random-tree": lambda: RandomTreeProposer(vocab, max_nodes=10, seed=7),
        "ngram": lambda: NgramProposer(k=3, max_branches=3),
    }
    n = 3000
    eng = Engine(tgt, proposer=makers[name](), num_pages=4096, page_size=4, max_batch_size=512,
                 max_draft=3)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                             max_new_tokens=2) for s in range(n)]
    outs = eng.generate([prompt] * n, params)
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for o in outs:
        assert len(o.token_ids) == 2
        counts[o.token_ids[0], o.token_ids[1]] += 1
    exact = _exact_first_two(tgt, prompt, temperature, top_k, top_p)
    assert counts[exact == 0].sum() == 0, "a token outside the target's support was emitted"
    exp = exact.flatten() * n
    obs = counts.flatten()
    keep = exp > 0
    # merge cells with small expectations into one bin so the chi-square approximation holds
    small = keep & (exp < 5)
    e = torch.cat([exp[keep & ~small], exp[small].sum()[None]])
    o = torch.cat([obs[keep & ~small], obs[small].sum()[None]])
    if e[-1] == 0:
        e, o = e[:-1], o[:-1]
    stat, pval = scipy_stats.chisquare(o.numpy(), e.numpy() * (o.sum() / e.sum()).item())
    assert pval > 1e-4, f"{name}: chi-square p = {pval:.2e}"


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


def test_nvml_flag_needs_cuda(target):
    with pytest.raises(ValueError, match="CUDA"):
        Engine(target, nvml=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_gpu_lossless_and_bandwidth():
    """bf16 on GPU (the CUDA kernels take fp16/bf16): speculative greedy vs plain greedy on the
    same device. Different tree shapes may take different attention paths whose bf16 rounding
    differs, so a late near-tie can flip: require 3 of 4 prompts identical and every output's
    first 4 tokens identical."""
    gpu = tiny_model(seed=1, scale=3.0).to(device="cuda", dtype=torch.bfloat16)
    gpu.device, gpu.dtype = torch.device("cuda"), torch.bfloat16
    prompts = _prompts(4, seed=1)
    p = SamplingParams(max_new_tokens=16)
    ref = Engine(gpu, num_pages=512).generate(prompts, p)
    eng = Engine(gpu, proposer=NgramProposer(k=4), num_pages=512, nvml=True)
    outs = eng.generate(prompts, p)
    same = sum(a.token_ids == b.token_ids for a, b in zip(ref, outs))
    assert same >= 3 and all(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(ref, outs))
    assert eng.metrics.bandwidth.get("method") in ("gpm", "utilization", "none")
