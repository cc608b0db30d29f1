"""Medusa: checkpoint layouts, trees, the proposer's losslessness, typical acceptance.

Sampling losslessness of Medusa trees is in test_engine.py (test_sampling_lossless_end_to_end,
cases "medusa" and "medusa-choices"), next to the other proposers.
"""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from specrt.acceptance import TypicalAcceptance
from specrt.engine import Engine, SamplingParams
from specrt.ops import VerifyOutput
from specrt.proposers import MedusaHeads, MedusaProposer
from specrt.proposers.medusa import (MC_SIM_7B_63, _best_paths, choices_topology,
                                     load_medusa_heads, save_medusa_heads, sparse_choices)
from specrt.tree import DraftTree, batch_trees

from _tiny import tiny_model

H, V = 64, 97


def _rand(shape, g, scale=0.1):
    return torch.randn(shape, generator=g) * scale


def _reference_head_logits(sd, k, num_layers, x, lm_head):
    """One head by the formula, from raw tensors (independent of MedusaHeads)."""
    y = x
    for j in range(num_layers):
        z = y @ sd[f"w{k}.{j}"].t()
        if f"b{k}.{j}" in sd:
            z = z + sd[f"b{k}.{j}"]
        y = y + F.silu(z)
    return y @ lm_head.t()


def _raw(num_heads=3, num_layers=2, bias=True, rows=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in range(num_heads):
        for j in range(num_layers):
            sd[f"w{k}.{j}"] = _rand((H, H), g)
            if bias:
                sd[f"b{k}.{j}"] = _rand((H,), g)
        sd[f"lm{k}"] = _rand((rows, H), g, 0.3)
    return sd


def _write(tmp, name, tensors, cfg, fmt="safetensors"):
    d = tmp / name
    d.mkdir()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        fname = "model.safetensors" if any(k.startswith(("blocks", "medusa_heads")) for k in tensors) \
            else "medusa_lm_head.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / fname))
    else:
        torch.save(tensors, str(d / "medusa_lm_head.pt"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=1, scale=3.0, vocab=V, hidden=H)


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_three_layouts_load_to_the_same_heads(tmp_path, target, fmt):
    """Hand-written checkpoints (FasterDecoding Medusa-1, ResBlock-only, vLLM with and without
    the medusa_heads. prefix) give the logits of the formula."""
    K, L = 3, 2
    sd = _raw(K, L)
    x = _rand((5, H), torch.Generator().manual_seed(9), 1.0)
    fd, rb, vl = {}, {}, {}
    for k in range(K):
        for j in range(L):
            fd[f"{k}.{j}.linear.weight"] = rb[f"{k}.{j}.linear.weight"] = sd[f"w{k}.{j}"]
            fd[f"{k}.{j}.linear.bias"] = rb[f"{k}.{j}.linear.bias"] = sd[f"b{k}.{j}"]
            vl[f"medusa_heads.blocks.{k}.layers.{j}.weight"] = sd[f"w{k}.{j}"]
            vl[f"medusa_heads.blocks.{k}.layers.{j}.bias"] = sd[f"b{k}.{j}"]
        fd[f"{k}.{L}.weight"] = sd[f"lm{k}"]
        vl[f"medusa_heads.lm_heads.{k}.weight"] = sd[f"lm{k}"]
    cfg = {"medusa_num_heads": K, "medusa_num_layers": L}
    d1 = _write(tmp_path, "fd", fd, cfg, fmt)
    d2 = _write(tmp_path, "rb", rb, cfg, fmt)
    d3 = _write(tmp_path, "vllm", vl, {"num_heads": K, "num_hidden_layers": L, "vocab_size": V,
                                         "hidden_size": H}, "safetensors")
    want = torch.stack([_reference_head_logits(sd, k, L, x, sd[f"lm{k}"]) for k in range(K)])
    shared = torch.stack([_reference_head_logits(sd, k, L, x, target.lm_head) for k in range(K)])
    for d, layout, ref in ((d1, "medusa1", want), (d2, "resblock", shared), (d3, "vllm", want)):
        heads, got_layout, _ = load_medusa_heads(d, target.config)
        assert got_layout == layout
        assert heads.num_heads == K and heads.num_layers == L
        out = heads(x, target.lm_head)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_vllm_token_map_and_original_lm_head(tmp_path, target):
    """vLLM: a token_map with full-size lm_heads (sliced at load) or truncated ones, and
    original_lm_head (one shared projection): logits per draft column = the formula's logits at
    target id token_map[c]."""
    K, L = 2, 1
    sd = _raw(K, L, bias=False)
    x = _rand((4, H), torch.Generator().manual_seed(3), 1.0)
    tmap = torch.tensor([5, 0, 17, 96, 40, 41], dtype=torch.int64)
    full = {f"blocks.{k}.layers.0.weight": sd[f"w{k}.0"] for k in range(K)}
    full.update({f"lm_heads.{k}.weight": sd[f"lm{k}"] for k in range(K)})
    cfg = {"num_heads": K, "num_hidden_layers": L, "vocab_size": V, "truncated_vocab_size": 6}
    d = _write(tmp_path, "full", dict(full, token_map=tmap), cfg)
    trunc = dict(full)
    trunc.update({f"lm_heads.{k}.weight": sd[f"lm{k}"][tmap] for k in range(K)})
    d2 = _write(tmp_path, "trunc", dict(trunc, token_map=tmap), cfg)
    ref = torch.stack([_reference_head_logits(sd, k, L, x, sd[f"lm{k}"]) for k in range(K)])
    for path in (d, d2):
        heads, layout, _ = load_medusa_heads(path, target.config)
        assert layout == "vllm" and heads.draft_vocab_size == 6
        out = heads(x)
        torch.testing.assert_close(out, ref[:, :, tmap], rtol=1e-5, atol=1e-5)
        assert heads.to_target_ids(torch.tensor([3, 0])).tolist() == [96, 5]
    orig = {f"blocks.{k}.layers.0.weight": sd[f"w{k}.0"] for k in range(K)}
    orig["lm_heads.0.weight"] = sd["lm0"]
    d3 = _write(tmp_path, "orig", orig, dict(cfg, original_lm_head=True, truncated_vocab_size=V))
    heads, _, _ = load_medusa_heads(d3, target.config)
    ref0 = torch.stack([_reference_head_logits(sd, k, L, x, sd["lm0"]) for k in range(K)])
    torch.testing.assert_close(heads(x), ref0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["medusa1", "resblock", "vllm"])
def test_save_load_round_trip(tmp_path, target, layout):
    g = torch.Generator().manual_seed(4)
    tmap = torch.randperm(V, generator=g)[:20]
    heads = MedusaHeads(H, V, 4, 1, token_map=tmap)
    with torch.no_grad():
        heads.block_weight.copy_(_rand(heads.block_weight.shape, g))
        heads.block_bias.copy_(_rand(heads.block_bias.shape, g))
    x = _rand((3, H), g, 1.0)
    want = heads(x, target.lm_head)
    d = save_medusa_heads(heads, tmp_path / layout, layout,
                          {"target_lm_head": target.lm_head, "medusa_rank_accuracy": [[0.5]]})
    back, got, cfg = load_medusa_heads(d, target.config)
    assert got == layout and cfg["medusa_rank_accuracy"] == [[0.5]]
    torch.testing.assert_close(back(x, target.lm_head), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(back.token_map, tmap)


def test_checkpoint_errors(tmp_path, target):
    sd = _raw(2, 1)
    good = {f"{k}.0.linear.weight": sd[f"w{k}.0"] for k in range(2)}
    other = tiny_model(seed=0, vocab=V, hidden=32, heads=4)
    d = _write(tmp_path, "ok", good, {"medusa_num_heads": 2, "medusa_num_layers": 1, "vocab_size": V})
    with pytest.raises(ValueError, match="hidden size 64 cannot read a target of hidden size 32"):
        load_medusa_heads(d, other.config)
    with pytest.raises(ValueError, match="another model"):
        MedusaProposer(tiny_model(seed=0, vocab=50, hidden=H), d)
    d = _write(tmp_path, "cfgheads", good, {"medusa_num_heads": 3})
    with pytest.raises(ValueError, match="config says 3 heads"):
        load_medusa_heads(d, target.config)
    d = _write(tmp_path, "junk", dict(good, **{"model.embed_tokens.weight": sd["lm0"]}), {})
    with pytest.raises(ValueError, match="not a Medusa checkpoint"):
        load_medusa_heads(d, target.config)
    d = _write(tmp_path, "gap", {"0.0.linear.weight": sd["w0.0"], "1.1.linear.weight": sd["w1.0"]}, {})
    with pytest.raises(ValueError, match="lacks block"):
        load_medusa_heads(d, target.config)
    lm = {f"{k}.1.weight": sd[f"lm{k}"][:50] for k in range(2)}
    d = _write(tmp_path, "vocab", dict(good, **lm), {})
    with pytest.raises(ValueError, match="50 rows for a vocabulary of 97"):
        load_medusa_heads(d, target.config)
    d = _write(tmp_path, "tmap", dict(good, token_map=torch.tensor([3, 3])), {})
    with pytest.raises(ValueError, match="duplicate"):
        load_medusa_heads(d, target.config)
    with pytest.raises(FileNotFoundError):
        load_medusa_heads(tmp_path / "nope", target.config)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "medusa_lm_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load_medusa_heads(tmp_path / "bad", target.config)


# ------------------------------------------------------------------------------ trees


def test_mc_sim_tree_matches_reference_ordering():
    parents, heads, ranks = choices_topology(MC_SIM_7B_63, 4)
    assert len(parents) == 64
    paths = sorted((tuple(c) for c in MC_SIM_7B_63), key=lambda p: (len(p), p))
    for i, p in enumerate(paths, start=1):
        assert heads[i] == len(p) - 1 and ranks[i] == p[-1]
        # walking parents reproduces the path's ranks
        node, back = i, []
        while node > 0:
            back.append(ranks[node])
            node = parents[node]
        assert tuple(reversed(back)) == p
    DraftTree(list(range(64)), list(parents))  # a valid topological tree


@pytest.mark.parametrize("bad,msg", [
    ([], "at least one path"),
    ("[[0]]", "list of paths"),
    ([[0], []], "non-empty"),
    ([[0], [0, -1]], ">= 0"),
    ([[0], [0.5]], "integers"),
    ([[0], [0]], "duplicate"),
    ([[0], [1, 0]], "lacks its prefix"),
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]], "only 4 heads"),
])
def test_malformed_choices(bad, msg):
    with pytest.raises(ValueError, match=msg):
        choices_topology(bad, 4)


def test_best_paths_is_the_top_set():
    """The best-first search returns exactly the budget paths of highest score (brute force
    over every rank path), ancestor-closed, parents before children, siblings in rank order."""
    rng = random.Random(0)
    for trial in range(30):
        depth, width, budget = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 20)
        logp = [sorted((math.log(rng.random()) for _ in range(width)), reverse=True)
                for _ in range(depth)]
        got = _best_paths(logp, budget, depth)
        allp = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
        score = {p: sum(logp[i][r] for i, r in enumerate(p)) for p in allp}
        want = sorted(allp, key=lambda p: -score[p])[:budget]
        assert sorted(score[p] for p in got) == pytest.approx(sorted(score[p] for p in want))
        seen = set()
        for p in got:
            assert len(p) == 1 or p[:-1] in seen
            if p[-1] > 0:
                assert p[:-1] + (p[-1] - 1,) in seen
            seen.add(p)
    assert _best_paths(logp, 5, 2) == _best_paths(logp, 5, 2)
    assert all(len(p) <= 2 for p in _best_paths(logp, 50, 2))


def test_sparse_choices_from_accuracies():
    acc = [[0.6, 0.1, 0.05], [0.4, 0.1], [0.3]]
    ch = sparse_choices(acc, 5)
    assert ch == [[0], [0, 0], [1], [0, 0, 0], [0, 1]]  # products .6 .24 .1 .072 .06
    parents, _, _ = choices_topology(ch, 3)
    assert len(parents) == 6
    with pytest.raises(ValueError):
        sparse_choices([[1.5]], 3)


# ------------------------------------------------------------------------------ proposer


def _heads(target, k=3, seed=0, scale=0.3, **kw):
    c = target.config
    h = MedusaHeads(c.hidden_size, c.vocab_size, k, 1, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h.block_weight.copy_(_rand(h.block_weight.shape, g, scale / c.hidden_size ** 0.5))
        h.block_bias.copy_(_rand(h.block_bias.shape, g))
        if h.lm_head is not None:
            h.lm_head.copy_(_rand(h.lm_head.shape, g, 1.0))
    return h


def _prompts(n, seed=0, vocab=V):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tree", ["dynamic", "mc_sim_7b_63", "choices", "own-head", "token-map"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_equals_plain(arch, tree, page_size):
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H, arch=arch)
    kw = {}
    if tree == "own-head":
        kw["own_lm_head"] = True
    if tree == "token-map":
        kw["token_map"] = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:40]
    heads = _heads(target, 4, **kw)
    spec = {"choices": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]],
            "mc_sim_7b_63": "mc_sim_7b_63"}.get(tree, "dynamic")
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=24)
    ref = Engine(target, page_size=page_size).generate(prompts, params)
    prop = MedusaProposer(target, heads, tree=spec, num_nodes=10, top_k=4)
    for batch in (1, 8):
        eng = Engine(target, proposer=prop, page_size=page_size, max_batch_size=batch)
        outs = eng.generate(prompts, params)
        for a, b in zip(ref, outs):
            assert a.token_ids == b.token_ids
        assert eng.metrics.depth_hist and len(eng.metrics.depth_hist) > 1


def _full_hidden(target, ids):
    """Pre-norm last-layer hidden state of the last token of ``ids``, by a fresh prefill."""
    from specrt.kv_cache import PagedKVCache, build_metadata

    c = target.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 64, torch.float32, "cpu")
    cache.add_sequence(0)
    cache.reserve(0, len(ids))
    meta = build_metadata(cache, [0], [len(ids)], "cpu")
    out = target(torch.tensor(ids), torch.arange(len(ids)), cache.kv, meta)
    return out.hidden[-1]


class _Spy(MedusaProposer):
    def propose(self, seqs):
        for s in seqs:
            self.seen.append((list(s.token_ids), self._hidden.get(s.seq_id)))
        return super().propose(seqs)


def test_heads_read_the_hidden_state_that_predicted_the_root():
    """At every step (first one after prefill included, batched, after partial acceptance) the
    heads read the target's hidden state at the position before the root: the one whose LM
    head output produced the root, so head k drafts depth k + 1."""
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H)
    prop = _Spy(target, _heads(target, 3), num_nodes=8)
    prop.seen = []
    prompts = _prompts(4, seed=8) + [[3, 4]]
    Engine(target, proposer=prop, max_batch_size=3).generate(prompts, SamplingParams(max_new_tokens=12))
    assert len(prop.seen) > 20
    for toks, h in prop.seen:
        if len(toks) < 2:
            assert h is None  # a one-token prompt has no cached position yet
            continue
        ref = _full_hidden(target, toks[:-1])
        # fp32 round-off of a different batch / tree shape; another position differs by O(1)
        assert float((h - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-5


def test_proposer_limits_and_errors():
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H)
    heads = _heads(target, 3)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        Engine(target, proposer=MedusaProposer(target, heads, tree="mc_sim_7b_63"),
               max_tree_nodes=16)
    with pytest.raises(ValueError, match="unknown Medusa tree"):
        MedusaProposer(target, heads, tree="nope")
    with pytest.raises(ValueError, match="medusa_rank_accuracy"):
        MedusaProposer(target, heads, tree="calibrated")
    with pytest.raises(ValueError, match="only 3 heads"):
        MedusaProposer(target, heads, tree=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="beyond the heads' vocabulary"):
        MedusaProposer(target, _heads(target, 3, token_map=torch.arange(5)), tree=[[0], [7]])
    with pytest.raises(ValueError, match="num_nodes"):
        MedusaProposer(target, heads, num_nodes=0)
    # max_draft bounds the depth of static trees (a prefix of the node order)
    prop = MedusaProposer(target, heads, tree="mc_sim_7b_63")
    eng = Engine(target, proposer=prop, max_draft=2, max_tree_nodes=64)
    eng.generate(_prompts(2), SamplingParams(max_new_tokens=10))
    assert len(eng.metrics.depth_hist) <= 3


def test_calibrated_tree_from_checkpoint(tmp_path):
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H)
    heads = _heads(target, 3)
    d = save_medusa_heads(heads, tmp_path / "h", "resblock",
                          {"medusa_rank_accuracy": [[0.5, 0.2, 0.1], [0.3, 0.1], [0.2]]})
    prop = MedusaProposer(target, str(d), tree="calibrated", num_nodes=6)
    assert prop.max_nodes == 6
    prompts = _prompts(3, seed=5)
    p = SamplingParams(max_new_tokens=16)
    ref = Engine(target).generate(prompts, p)
    outs = Engine(target, proposer=prop).generate(prompts, p)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


# ------------------------------------------------------------------------------ typical


def _reference_typical(logits_b, tree: DraftTree, temperature, thr, alpha):
    """The reference's evaluate_posterior on the tree's root-to-leaf candidates (cartesian
    form): accept length per candidate = leading run of tokens whose posterior exceeds the
    threshold; best = longest, ties by likelihood. Returns (accept_length, path nodes)."""
    t = tree.num_nodes
    kids = [tree.children(i) for i in range(t)]
    leaves = [i for i in range(t) if not kids[i]]
    cands = [tree.path_to(i) for i in leaves]
    p = torch.softmax(logits_b / temperature, dim=-1)
    ent = -(p * torch.log(p + 1e-5)).sum(-1)
    th = torch.minimum(torch.full_like(ent, thr), torch.exp(-ent) * alpha)
    best, best_len, best_ll = cands[0], 0, None
    for c in cands:
        n = 0
        while n + 1 < len(c) and p[c[n], tree.tokens[c[n + 1]]] > th[c[n]]:
            n += 1
        ll = sum(math.log(p[c[i], tree.tokens[c[i + 1]]]) for i in range(n))
        if n > best_len or (n == best_len and n > 0 and ll > best_ll + 1e-12):
            best, best_len, best_ll = c, n, ll
    return best_len, best[:best_len + 1], th


def test_typical_acceptance_matches_reference_rule():
    rng = random.Random(1)
    g = torch.Generator().manual_seed(2)
    acc = TypicalAcceptance(0.09, 0.3)
    for trial in range(40):
        vocab = rng.choice([6, 30])
        trees = []
        for b in range(3):
            paths = [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
                     for _ in range(rng.randint(1, 5))]
            trees.append(DraftTree.from_paths(rng.randrange(vocab), paths))
        tb = batch_trees(trees, [5, 5, 5])
        logits = torch.randn(tb.tokens.shape[0], vocab, generator=g) * rng.choice([1.0, 4.0])
        # make some drafts typical: put mass on the drafted child tokens
        for i in range(tb.tokens.shape[0]):
            if rng.random() < 0.6:
                logits[i, rng.choice(tb.tokens.tolist())] += 5.0
        b_, mt = len(trees), tb.max_t
        ver = VerifyOutput(torch.full((b_, mt), -1, dtype=torch.int32),
                           torch.full((b_, mt), -1, dtype=torch.int32),
                           torch.zeros(b_, dtype=torch.int32))
        temps = [1.0, 0.7, 1.3]
        acc.apply(ver, logits, tb.tokens, tb.parents, tb.num_nodes, temps, [1, 2, 3], [0, 0, 0])
        lo = 0
        for b, tr in enumerate(trees):
            n, path, th = _reference_typical(logits[lo:lo + tr.num_nodes], tr, temps[b], 0.09, 0.3)
            assert int(ver.num_accepted[b]) == n
            assert ver.path[b, :n + 1].tolist() == path
            emitted = ver.tokens[b, :n + 2].tolist()
            assert emitted[:n] == [int(tr.tokens[j]) for j in path[1:]]
            # the bonus token is one the reference could sample: at or above the threshold
            pb = torch.softmax(logits[lo + path[-1]] / temps[b], -1)
            assert pb[emitted[n]] >= th[path[-1]]
            lo += tr.num_nodes


def test_typical_acceptance_params():
    with pytest.raises(ValueError):
        TypicalAcceptance(0.0, 0.3)
    with pytest.raises(ValueError):
        Engine(tiny_model(seed=2, vocab=V, hidden=H), lossy_acceptance=object())
