"""MLP speculator (fms-extras architecture): public-layout loaders against a dense reference
written from the formula, candidate trees, greedy losslessness (tiny models of each
architecture, batched, page sizes 1 and 16; SmolLM2 with the shipped weights), and sampling
losslessness by chi-square (test_engine.py's machinery)."""
from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from specrt.engine import Engine, SamplingParams
from specrt.proposers.mlp_speculator import (MLPSpeculator, MLPSpeculatorProposer,
                                             load_mlp_speculator, merge_paths,
                                             save_mlp_speculator)

from _tiny import tiny_model

H, V = 64, 97


# ------------------------------------------------------------------------------ reference


def _rms(x, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _ref_logits(t, cfg, h, tokens):
    """Dense reference from raw public-layout tensors ``t``: the logits of every stage for
    target states ``h`` [N, E] and token chains ``tokens`` [N, n_predict] (stage i's input
    token). Tied checkpoints: stage i reads the first copy of each shared tensor."""
    n = cfg["n_predict"]
    inner = cfg.get("inner_dim") or cfg["emb_dim"]
    tied = cfg.get("tie_weights", False)
    sw = 0.5 ** (0.5 / n)
    ew = math.sqrt(1 - sw * sw) * math.sqrt(inner / 2)

    def w(kind, i, name="weight"):
        j = i
        if tied:
            j = min(i, 1) if kind == "proj" else 0
        return t[f"{kind}.{j}.{name}"].double()

    s = h.double()
    if cfg.get("scale_input", False):
        s = _rms(s) / math.sqrt(2)
    out = []
    for i in range(n):
        z = w("emb", i)[tokens[:, i]] * ew
        s = s @ w("proj", i).t() * sw + z
        s = _gelu(_rms(s) * w("ln", i) + w("ln", i, "bias"))
        out.append(s @ w("head", i).t())
    return torch.stack(out)


def _raw(n=3, inner=32, emb=H, vocab=V, tied=False, seed=0, all_copies=False):
    g = torch.Generator().manual_seed(seed)
    inner = inner or emb
    t = {}
    for i in range(n):
        first = not tied or i == 0 or all_copies
        if first:
            t[f"emb.{i}.weight"] = torch.randn(vocab, inner, generator=g) * 0.3
            t[f"head.{i}.weight"] = torch.randn(vocab, inner, generator=g) / inner ** 0.5
            t[f"ln.{i}.weight"] = 1 + 0.2 * torch.randn(inner, generator=g)
            t[f"ln.{i}.bias"] = 0.1 * torch.randn(inner, generator=g)
        if first or i == 1:
            t[f"proj.{i}.weight"] = torch.randn(inner, emb if i == 0 else inner,
                                                generator=g) / (emb if i == 0 else inner) ** 0.5
    if tied and all_copies:  # the copies equal the first
        for i in range(1, n):
            for k in ("emb", "head", "ln"):
                for nm in ("weight", "bias") if k == "ln" else ("weight",):
                    t[f"{k}.{i}.{nm}"] = t[f"{k}.0.{nm}"].clone()
            if i >= 2:
                t[f"proj.{i}.weight"] = t["proj.1.weight"].clone()
    return t


def _write(tmp, name, tensors, cfg, fmt="safetensors", prefix=""):
    d = tmp / name
    d.mkdir()
    tensors = {prefix + k: v.contiguous() for k, v in tensors.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(d / "model.safetensors"))
    else:
        torch.save(tensors, str(d / "pytorch_model.bin"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=1, scale=3.0, vocab=V, hidden=H)


# ------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("variant", ["plain", "tied", "tied-all-copies", "scale-input",
                                     "inner-0", "prefix-bin"])
def test_public_layout_loads_to_the_formula(tmp_path, target, variant):
    """Synthetic checkpoints in the public layout (untied, tie_weights with one or all copies
    of the shared tensors, scale_input, inner_dim 0 = emb_dim, a ``speculator.`` prefix in a
    PyTorch file) give the logits of the dense reference, stage by stage."""
    n = 4 if variant.startswith("tied") else 3
    inner = 0 if variant == "inner-0" else 32
    tied = variant.startswith("tied")
    t = _raw(n, inner, tied=tied, all_copies=variant == "tied-all-copies")
    cfg = {"architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator",
           "emb_dim": H, "inner_dim": inner, "vocab_size": V, "n_predict": n,
           "tie_weights": tied, "scale_input": variant == "scale-input",
           "top_k_tokens_per_head": [3, 2, 2, 1][:n], "n_candidates": 4}
    if variant == "plain":
        del cfg["tie_weights"], cfg["scale_input"]  # the defaults
    fmt, prefix = ("bin", "speculator.") if variant == "prefix-bin" else ("safetensors", "")
    d = _write(tmp_path, variant, t, cfg, fmt, prefix)
    spec, info = load_mlp_speculator(d, target)
    assert spec.n_predict == n and spec.tie_weights == tied
    assert spec.inner_dim == (inner or H) and info["n_candidates"] == 4
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(7, H, generator=g) * 2
    toks = torch.randint(0, V, (7, n), generator=g)
    want = _ref_logits(t, cfg, hs, toks)
    # stage by stage, as the proposer runs it
    s = spec.input_state(hs)
    for i in range(n):
        s = spec.stage(i, s, toks[:, i])
        torch.testing.assert_close(spec.logits(i, s).double(), want[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(spec.fast_logits(i, s).double(), want[i], rtol=1e-4, atol=1e-4)
    # the teacher-forced training forward: inds[:, t + i] is stage i's token at position t
    inds = torch.cat([toks[:1, :1].repeat(1, 7), toks[:1, 1:]], 1)  # one row, 7 positions
    got = spec(hs[None], inds)  # [n, 1, 7, V]
    chains = torch.stack([inds[0, p:p + n] for p in range(7)])
    torch.testing.assert_close(got[:, 0].double(), _ref_logits(t, cfg, hs, chains), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, target, tied):
    spec = MLPSpeculator(H, 24, V, 3, tie_weights=tied, scale_input=tied)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in spec.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    d = save_mlp_speculator(spec, tmp_path / "s", {"n_candidates": 3}, dtype=torch.float32)
    keys = set(json.loads((d / "config.json").read_text()))
    assert {"n_predict", "emb_dim", "inner_dim", "vocab_size", "tie_weights",
            "scale_input"} <= keys
    from safetensors.torch import load_file

    names = set(load_file(str(d / "model.safetensors")))
    if tied:  # each shared tensor once
        assert names == {"emb.0.weight", "head.0.weight", "ln.0.weight", "ln.0.bias",
                         "proj.0.weight", "proj.1.weight"}
    else:
        assert len(names) == 5 * 3
    back, info = load_mlp_speculator(d, target, dtype=torch.float32)
    assert info["n_candidates"] == 3
    h = torch.randn(5, H, generator=g)
    inds = torch.randint(0, V, (1, 5 + 3), generator=g)
    torch.testing.assert_close(back(h[None], inds), spec(h[None], inds))


def test_checkpoint_errors(tmp_path, target):
    t = _raw(2, 16)
    cfg = {"emb_dim": H, "inner_dim": 16, "vocab_size": V, "n_predict": 2}
    other = tiny_model(seed=0, vocab=V, hidden=32, heads=4)
    d = _write(tmp_path, "ok", t, cfg)
    load_mlp_speculator(d, target)
    with pytest.raises(ValueError, match="hidden size 64 cannot read a target of hidden size 32"):
        load_mlp_speculator(d, other)
    with pytest.raises(ValueError, match="another model"):
        MLPSpeculatorProposer(tiny_model(seed=0, vocab=50, hidden=H), d)
    with pytest.raises(ValueError, match="missing tensors head.1.weight"):
        load_mlp_speculator(_write(tmp_path, "miss", {k: v for k, v in t.items()
                                                      if k != "head.1.weight"}, cfg), target)
    with pytest.raises(ValueError, match="unexpected tensors emb.2.weight"):
        load_mlp_speculator(_write(tmp_path, "extra", dict(t, **{"emb.2.weight": t["emb.0.weight"].clone()}),
                                   cfg), target)
    with pytest.raises(ValueError, match=r"proj.1.weight has shape \(16, 8\)"):
        load_mlp_speculator(_write(tmp_path, "shape", dict(t, **{"proj.1.weight": torch.zeros(16, 8)}),
                                   cfg), target)
    with pytest.raises(ValueError, match="missing 'n_predict'"):
        load_mlp_speculator(_write(tmp_path, "cfg", t, {"emb_dim": H, "vocab_size": V}), target)
    tt = _raw(3, 16, tied=True, all_copies=True)
    tt["head.2.weight"] = tt["head.2.weight"] + 1
    with pytest.raises(ValueError, match="head.2.weight differs from head.0.weight"):
        load_mlp_speculator(_write(tmp_path, "tie", tt, dict(cfg, n_predict=3, tie_weights=True)),
                            target)
    with pytest.raises(FileNotFoundError):
        load_mlp_speculator(tmp_path / "nope", target)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load_mlp_speculator(tmp_path / "bad", target)
    with pytest.raises(ValueError, match="tie_weights needs n_predict >= 2"):
        MLPSpeculator(H, 16, V, 1, tie_weights=True)


# ------------------------------------------------------------------------------ trees


def test_merge_paths():
    paths = [[5, 6, 7], [5, 6, 8], [5, 9, 7], [4, 1, 1]]
    toks, par = merge_paths(1, paths, 100)
    assert toks == [1, 5, 6, 7, 8, 9, 7, 4, 1, 1]
    assert par == [-1, 0, 1, 2, 2, 1, 5, 0, 7, 8]
    # budget: the path that no longer fits adds the prefix that does
    toks, par = merge_paths(1, paths, 5)
    assert toks == [1, 5, 6, 7, 8, 9] and par == [-1, 0, 1, 2, 2, 1]
    toks, par = merge_paths(1, paths, 2)
    assert toks == [1, 5, 6] and par == [-1, 0, 1]
    assert merge_paths(3, paths, 0) == ([3], [-1])


def _spec(target, n=3, inner=32, tied=False, seed=0, scale=1.0, scale_input=False):
    c = target.config
    spec = MLPSpeculator(c.hidden_size, inner, c.vocab_size, n, tie_weights=tied,
                         scale_input=scale_input)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spec.named_parameters():
            if name.startswith("ln"):
                p.copy_((1.0 if name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) * scale * 3 / inner ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return spec


def test_candidates_are_the_best_products_of_stage_probabilities(target):
    """The proposer's candidate set at full depth = brute force over every rank path of the
    cartesian top-k expansion, scored by the product of the stages' probabilities computed by
    the dense reference; the tree merges the best n_candidates on shared prefixes."""
    spec = _spec(target, 3, tied=True, seed=4)
    t = spec.layout_state_dict()
    cfg = {"n_predict": 3, "emb_dim": H, "inner_dim": 32, "tie_weights": True}
    prop = MLPSpeculatorProposer(target, spec, top_k=[3, 2, 2], n_candidates=5, num_nodes=100)
    g = torch.Generator().manual_seed(2)
    hid = torch.randn(2, H, generator=g)
    roots = torch.tensor([4, 9])
    paths, score = prop.candidates(hid, roots, 3)[-1]
    x = target.norm(hid).double()
    for b in range(2):
        # brute force: every rank path; tokens from the reference's own top-k at each node
        best = {}
        for ranks in itertools.product(range(3), range(2), range(2)):
            toks, lp = [int(roots[b])], 0.0
            for i, r in enumerate(ranks):
                chain = torch.tensor([toks + [0] * (3 - len(toks))])
                lg = _ref_logits(t, cfg, x[b:b + 1], chain)[i, 0]
                lsm = torch.log_softmax(lg, -1)
                top = lsm.topk([3, 2, 2][i])
                toks.append(int(top.indices[r]))
                lp += float(top.values[r])
            best[tuple(toks[1:])] = lp
        got = {tuple(p): float(s) for p, s in zip(paths[b].tolist(), score[b].tolist())}
        assert got.keys() == best.keys()
        for k in got:
            assert got[k] == pytest.approx(best[k], abs=1e-4)
        top5 = sorted(best, key=lambda k: -best[k])[:5]
        from specrt.proposers.base import SeqView

        prop._hidden[b] = hid[b]
        tree = prop.propose([SeqView(b, [1, int(roots[b])], 1, 1, 0.0, 0, 1.0, 0, 0, 3)])[0]
        leaves = [i for i in range(tree.num_nodes) if not tree.children(i)]
        got_paths = {tuple(int(tree.tokens[j]) for j in tree.path_to(i)[1:]) for i in leaves}
        assert got_paths == set(top5)


def test_sparse_head_drafts_live_rows_with_dense_probabilities(target):
    """A head trained over a reduced vocabulary (most rows zero): the proposer computes only
    the live rows, drafts only live tokens, and their log-probabilities are the dense
    model's (the zero rows' mass stays in the normaliser)."""
    spec = _spec(target, 2, tied=True, seed=5)
    live = torch.tensor([2, 3, 5, 8, 13, 21, 34, 55, 89])
    with torch.no_grad():
        keep = torch.zeros(V, dtype=torch.bool)
        keep[live] = True
        spec.head[0].weight[~keep] = 0
    g = torch.Generator().manual_seed(1)
    state = spec.stage(0, spec.input_state(torch.randn(6, H, generator=g)),
                       torch.randint(0, V, (6,), generator=g))
    dense = torch.log_softmax(spec.logits(0, state).double(), -1)
    torch.testing.assert_close(spec.fast_logits(0, state).double(), spec.logits(0, state).double(),
                               rtol=1e-5, atol=1e-5)
    vals, ids = spec.top_candidates(0, state, 4)
    assert set(ids.flatten().tolist()) <= set(live.tolist())
    torch.testing.assert_close(vals.double(), dense.gather(1, ids), rtol=1e-5, atol=1e-5)
    want = dense[:, live].topk(4, -1)
    torch.testing.assert_close(vals.double(), want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, live[want.indices])


def _prompts(n, seed=0, vocab=V):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("variant", ["untied", "tied", "scale-input"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_equals_plain(arch, variant, page_size):
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H, arch=arch)
    spec = _spec(target, 4, tied=variant != "untied", scale_input=variant == "scale-input")
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=24)
    ref = Engine(target, page_size=page_size).generate(prompts, params)
    prop = MLPSpeculatorProposer(target, spec, top_k=[3, 2, 2, 1], n_candidates=4, num_nodes=9)
    for batch in (1, 8):
        eng = Engine(target, proposer=prop, page_size=page_size, max_batch_size=batch)
        outs = eng.generate(prompts, params)
        for a, b in zip(ref, outs):
            assert a.token_ids == b.token_ids
        assert eng.metrics.depth_hist and len(eng.metrics.depth_hist) > 1


def test_full_fan_out_holds_the_greedy_token():
    """One stage keeping all V tokens (a 98-node tree): the target's greedy token is always
    among the drafts, so one draft is accepted at every step and output equals plain."""
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H)
    spec = _spec(target, 1, seed=3)
    prop = MLPSpeculatorProposer(target, spec, top_k=[V], n_candidates=V, num_nodes=V + 1)
    prompts = _prompts(3, seed=1)
    params = SamplingParams(max_new_tokens=12)
    ref = Engine(target).generate(prompts, params)
    eng = Engine(target, proposer=prop, max_tree_nodes=V + 1, max_draft=1)
    outs = eng.generate(prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert eng.metrics.mean_accepted_length > 1.8, eng.metrics.summary()


def _full_hidden(target, ids):
    from specrt.kv_cache import PagedKVCache, build_metadata

    c = target.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 64, torch.float32, "cpu")
    cache.add_sequence(0)
    cache.reserve(0, len(ids))
    meta = build_metadata(cache, [0], [len(ids)], "cpu")
    return target(torch.tensor(ids), torch.arange(len(ids)), cache.kv, meta).hidden[-1]


class _Spy(MLPSpeculatorProposer):
    def propose(self, seqs):
        for s in seqs:
            self.seen.append((list(s.token_ids), self._hidden.get(s.seq_id)))
        return super().propose(seqs)


def test_reads_the_hidden_state_that_predicted_the_root():
    target = tiny_model(seed=2, scale=3.0, vocab=V, hidden=H)
    prop = _Spy(target, _spec(target, 3, tied=True), num_nodes=8)
    prop.seen = []
    Engine(target, proposer=prop, max_batch_size=3).generate(
        _prompts(4, seed=8) + [[3, 4]], SamplingParams(max_new_tokens=12))
    assert len(prop.seen) > 20
    for toks, h in prop.seen:
        if len(toks) < 2:
            assert h is None
            continue
        ref = _full_hidden(target, toks[:-1])
        assert float((h - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-5


def test_proposer_limits_and_errors(target):
    spec = _spec(target, 3)
    with pytest.raises(ValueError, match="one entry per stage"):
        MLPSpeculatorProposer(target, spec, top_k=[2, 2])
    with pytest.raises(ValueError, match=">= 1"):
        MLPSpeculatorProposer(target, spec, top_k=0)
    with pytest.raises(ValueError, match="num_nodes"):
        MLPSpeculatorProposer(target, spec, num_nodes=-1)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        Engine(target, proposer=MLPSpeculatorProposer(target, spec, num_nodes=80),
               max_tree_nodes=16)
    # max_draft bounds the depth; the node budget bounds the size
    prop = MLPSpeculatorProposer(target, spec, top_k=3, n_candidates=27, num_nodes=6)
    eng = Engine(target, proposer=prop, max_draft=2)
    eng.generate(_prompts(3), SamplingParams(max_new_tokens=10))
    assert len(eng.metrics.depth_hist) <= 3
    assert prop.max_depth == 3


# ------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 4, 0.9)])
def test_sampling_lossless_end_to_end(temperature, top_k, top_p):
    """Chi-square of the first k + 1 = 4 emitted tokens (jointly) over 3000 seeds against the
    target's exact distribution (test_engine.py's machinery: the first step drafts to the
    full depth, so sibling rejection at every level and the bonus token shape the tested
    distribution). alpha = 1e-4 per case."""
    pytest.importorskip("scipy.stats")
    import test_engine as te

    tgt = tiny_model(seed=3, scale=3.0, vocab=te._VOCAB, hidden=32, layers=3)
    spec = _spec(tgt, te._K, inner=16, tied=True, seed=21, scale=2.0)
    # wide trees (most of the 8-token vocabulary at each level), so drafts are accepted down
    # to the full depth and rejected siblings are common at every level
    prop = MLPSpeculatorProposer(tgt, spec, top_k=[4, 3, 3], n_candidates=36, num_nodes=40)
    table = te._exact_tables(tgt, te._PROMPT, te._K + 1, temperature, top_k, top_p)
    exact = te._exact_joint(table, te._VOCAB, te._K + 1)
    outs, m = te._sample_first_tokens(tgt, prop, te._N_STAT, temperature, top_k, top_p)
    # all k drafts accepted (then the bonus token) in a good share of the requests
    assert len(m.depth_hist) == te._K + 1 and m.depth_hist[te._K] > 200, m.depth_hist
    pval = te._chi_square_p(outs, exact, te._VOCAB, te._K + 1)
    assert pval > 1e-4, f"chi-square p = {pval:.2e}, depth histogram {m.depth_hist}"


# ------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_shipped_speculator_is_lossless_and_accepted():
    """The speculator shipped for SmolLM2-135M-Instruct (specrt/heads/smollm2-135m-mlp-
    speculator), target in fp32: greedy output equals plain decoding, batched and unbatched,
    page sizes 1 and 16, and its drafts are accepted on a code prompt."""
    from specrt import hub
    from specrt.models import load_model
    from specrt.proposers.mlp_speculator import default_mlp_speculator

    try:
        path = hub.fetch(hub.DEFAULT_MODEL, progress=False)
    except hub.FetchError as e:
        pytest.skip(f"cannot fetch {hub.DEFAULT_MODEL}: {e}")
    model, tok = load_model(path, dtype=torch.float32)
    default = MLPSpeculatorProposer(model, default_mlp_speculator(model))
    assert default.spec.n_predict >= 3 and default.max_nodes == 4  # the measured CPU tree
    prop = MLPSpeculatorProposer(model, default_mlp_speculator(model), top_k=[4, 3, 2, 2],
                                 n_candidates=5, num_nodes=16)
    prompts = ['def is_prime(n):\n    """Return True if n is a prime number."""\n',
               "Write a Python function that reverses a string."]
    params = SamplingParams(max_new_tokens=24)
    for page_size in (1, 16):
        ref = Engine(model, tok, page_size=page_size).generate(prompts, params)
        for batch in (1, 2):
            eng = Engine(model, tok, prop, page_size=page_size, max_batch_size=batch,
                         max_draft=prop.max_depth)
            outs = eng.generate(prompts, params)
            assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
            assert eng.metrics.mean_accepted_length > 1.15, eng.metrics.summary()
