"""Self-speculation by sublayer skipping (specrt.proposers.self_spec, specrt.tune).

- the model's ``skip`` forward: empty set == plain forward (exact); a skip set == a reference
  written by hand (dense causal attention, no paged cache), and skipped attention layers leave
  their cache untouched;
- greedy output == plain greedy decoding, per architecture, page size, batch;
- sampled output follows the target's exact distribution (chi-square, as in test_engine);
- the search: a valid set within its budget on a tiny model, and :func:`specrt.tune.choose`
  picks the known best on synthetic tables;
- the JSON file: round trip, another model's file, bad skip sets.
"""
from __future__ import annotations

import json
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

from specrt.engine import Engine, SamplingParams
from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.models.llama import SkipSet
from specrt.proposers import create
from specrt.proposers.self_spec import (SelfSpecConfig, SelfSpecProposer, load_self_spec,
                                        model_fingerprint, save_self_spec)
from specrt.tune import Finalist, accept_ge_from_hist, choose, expected_emitted, tune_self_spec

from _tiny import tiny_model
from test_engine import (_K, _PROMPT, _VOCAB, _chi_square_p, _exact_joint, _exact_tables,
                         _sample_first_tokens, stat_models)  # noqa: F401  (fixture)


def _prompts(n, vocab=97, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        out.append((base * 5)[: rng.randrange(1, 24)])
    return out


def _forward(model, toks, page_size=16, skip=None):
    c = model.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, page_size,
                         -(-len(toks) // page_size) + 1, torch.float32, "cpu")
    cache.kv.fill_(7.0)  # sentinel: a layer whose attention is skipped must leave it alone
    cache.add_sequence(0)
    meta = build_metadata(cache, [0], [len(toks)], "cpu")
    out = model(torch.tensor(toks), torch.arange(len(toks)), cache.kv, meta, skip=skip)
    return out.logits, cache


def _reference(model, toks, skip: SkipSet):
    """Dense, cache-free forward of one sequence with the given sublayers left out."""
    c = model.config
    n, hq, hkv, d = len(toks), c.num_heads, c.num_kv_heads, c.head_dim

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    pos = torch.arange(n)
    cos, sin = model.rope_cos[pos][:, None, :], model.rope_sin[pos][:, None, :]

    def rope(t):
        a, b = t[..., : d // 2], t[..., d // 2:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), -1)

    x = model.embed_tokens[torch.tensor(toks)]
    for i, layer in enumerate(model.layers):
        if i not in skip.attn:
            h = rms(x, layer.input_norm.weight)
            wq, wk, wv = layer.qkv_weight.split([c.q_size, c.kv_size, c.kv_size])
            bq, bk, bv = (layer.qkv_bias.split([c.q_size, c.kv_size, c.kv_size])
                          if layer.qkv_bias is not None else (None, None, None))
            q = rope(F.linear(h, wq, bq).view(n, hq, d))
            k = rope(F.linear(h, wk, bk).view(n, hkv, d)).repeat_interleave(hq // hkv, 1)
            v = F.linear(h, wv, bv).view(n, hkv, d).repeat_interleave(hq // hkv, 1)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
            att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, hq * d)
            x = x + F.linear(o, layer.o_weight, layer.o_bias)
        if i not in skip.mlp:
            g, u = F.linear(rms(x, layer.post_norm.weight), layer.gate_up_weight).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, layer.down_weight)
    return F.linear(rms(x, model.norm.weight), model.lm_head)


# ------------------------------------------------------------------------------ the forward
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_empty_skip_is_the_plain_forward(arch):
    m = tiny_model(seed=3, arch=arch)
    toks = _prompts(1, seed=3)[0] * 3
    plain, _ = _forward(m, toks)
    empty, _ = _forward(m, toks, skip=SkipSet())
    assert torch.equal(plain, empty)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("skip", [SkipSet((1,), (2,)), SkipSet((0, 2, 3), ()),
                                  SkipSet((), (0, 1, 3)), SkipSet((1, 2), (1, 2, 3))])
def test_skip_forward_matches_hand_reference(arch, page_size, skip):
    m = tiny_model(seed=4, arch=arch, layers=4)
    toks = [5, 17, 3, 88, 42, 42, 7, 1, 0, 96, 13, 64, 2, 9, 31, 30, 29, 28, 50]
    got, cache = _forward(m, toks, page_size, skip)
    want = _reference(m, toks, skip)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a skipped attention sublayer wrote no K/V; every other layer did
    for layer in range(m.config.num_layers):
        written = bool((cache.kv[layer] != 7.0).any())
        assert written == (layer not in skip.attn), layer
    # and the reference differs from the full model (the skip did something)
    assert not torch.allclose(want, _reference(m, toks, SkipSet()), atol=1e-3)


def test_skip_with_num_layers_and_hidden_layers():
    m = tiny_model(seed=5, layers=4)
    toks = [1, 2, 3, 4, 5, 6]
    c = m.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 2, torch.float32, "cpu")
    cache.add_sequence(0)
    meta = build_metadata(cache, [0], [len(toks)], "cpu")
    out = m(torch.tensor(toks), torch.arange(6), cache.kv, meta, num_layers=3,
            skip=SkipSet((1,), ()), hidden_layers=(0, 2))
    # early exit after layer 2 with layer 1's attention skipped == skipping layer 3 as well
    want = _reference(m, toks, SkipSet((1, 3), (3,)))
    torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-4)
    assert set(out.aux_hidden) == {0, 2}


# ------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_greedy_equals_plain(arch, page_size):
    target = tiny_model(seed=1, scale=3.0, arch=arch)
    prompts = _prompts(5, seed=7)  # lengths differ
    params = SamplingParams(max_new_tokens=16)
    plain = Engine(target, page_size=page_size, num_pages=256).generate(prompts, params)
    for skip, k, adaptive in ((SkipSet((2,), (1,)), 3, False), (SkipSet((1, 3), (3,)), 4, True)):
        eng = Engine(target, proposer=SelfSpecProposer(target, skip, k=k, adaptive=adaptive),
                     page_size=page_size, num_pages=256, max_draft=5)
        spec = eng.generate(prompts, params)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        assert eng.metrics.accepted > 0  # drafts were accepted, not only corrected
        one = Engine(target, proposer=SelfSpecProposer(target, skip, k=k, adaptive=adaptive),
                     page_size=page_size, num_pages=256).generate([prompts[1]], params)[0]
        assert one.error is None and one.token_ids == plain[1].token_ids


# ------------------------------------------------------------------------------ sampling
_N_STAT = 3000


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampling_lossless(stat_models, temperature, top_k, top_p):
    """Chi-square of the first k + 1 tokens over 3000 seeds against the exact target
    distribution, as test_engine.test_sampling_lossless_end_to_end (alpha = 1e-4), and the
    depth histogram shows full acceptance (the bonus token after k drafts) often."""
    pytest.importorskip("scipy.stats")
    tgt, _ = stat_models
    table = _exact_tables(tgt, _PROMPT, _K + 1, temperature, top_k, top_p)
    exact = _exact_joint(table, _VOCAB, _K + 1)
    prop = SelfSpecProposer(tgt, SkipSet((2,), (2,)), k=_K)  # the last layer left out
    outs, m = _sample_first_tokens(tgt, prop, _N_STAT, temperature, top_k, top_p)
    assert len(m.depth_hist) == _K + 1 and m.depth_hist[_K] >= 0.05 * _N_STAT, m.depth_hist
    pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
    assert pval > 1e-4, f"chi-square p = {pval:.2e}, depth histogram {m.depth_hist}"


# ------------------------------------------------------------------------------ the search
def test_choose_picks_the_best_of_synthetic_tables():
    t_verify = {n: 0.010 + 0.0005 * n for n in range(1, 8)}
    fin = [Finalist(SkipSet((1,), ()), 0.006, [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]),  # accurate
           Finalist(SkipSet((1, 2), (3,)), 0.002, [0.85, 0.7, 0.55, 0.4, 0.25, 0.1]),
           Finalist(SkipSet((1, 2, 3), (2, 3)), 0.0005, [0.3, 0.09, 0.03, 0.0, 0.0, 0.0])]
    ks = range(1, 7)

    def brute(tv):
        return max(((i, k) for i in range(3) for k in ks),
                   key=lambda ik: expected_emitted(fin[ik[0]].accept_ge, ik[1])
                   / (ik[1] * fin[ik[0]].t_draft + tv[ik[1] + 1]))

    i, k, speed = choose(fin, t_verify, ks)
    assert (i, k) == brute(t_verify) == (1, 3)
    assert speed == pytest.approx((1 + 0.85 + 0.7 + 0.55) / (3 * 0.002 + 0.012))
    # a nearly free verify favours the cheapest draft, one token at a time
    free = {n: 0.0001 for n in range(1, 8)}
    assert choose(fin, free, ks)[:2] == brute(free) == (2, 1)
    # a slow verify favours long chains of the accurate draft
    slow = {n: 0.5 for n in range(1, 8)}
    assert choose(fin, slow, ks)[:2] == brute(slow) == (0, 6)
    assert accept_ge_from_hist([2, 1, 1]) == [0.5, 0.25]
    assert expected_emitted([0.5, 0.25], 1) == 1.5
    with pytest.raises(ValueError):
        choose([], t_verify, ks)


def test_search_on_tiny_model_within_budget():
    m = tiny_model(seed=1, scale=3.0, layers=4)
    prompts = _prompts(3, seed=2)
    t = time.perf_counter()
    cfg = tune_self_spec(m, None, prompts, budget_s=6.0, k_max=3, new_tokens=12,
                         min_agreement=0.0, finalists=2, log=None)
    took = time.perf_counter() - t
    assert took < 6.0 + 5.0, took  # the last phase may overrun by about one engine run
    assert 1 <= len(cfg.skip) and 1 <= cfg.k <= 3
    cfg.skip.validate(4)
    s = cfg.search
    assert 0.0 <= s["acceptance"] <= 1.0 and s["t_draft_ms"] > 0 and s["dtype"] == "float32"
    assert cfg.model == model_fingerprint(m)
    # the chosen set drafts losslessly
    plain = Engine(m, num_pages=256).generate(prompts, SamplingParams(max_new_tokens=10))
    spec = Engine(m, proposer=SelfSpecProposer(m, cfg), num_pages=256).generate(
        prompts, SamplingParams(max_new_tokens=10))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]


# ------------------------------------------------------------------------------ the file
def test_json_round_trip(tmp_path):
    m = tiny_model(seed=1, layers=4)
    cfg = SelfSpecConfig(SkipSet((3, 1), (2,)), 5, model_fingerprint(m), {"acceptance": 0.6})
    p = tmp_path / "s.json"
    save_self_spec(cfg, p)
    d = json.loads(p.read_text())
    assert d["skip"] == {"attn": [1, 3], "mlp": [2]} and d["k"] == 5
    assert d["model"]["num_layers"] == 4 and len(d["model"]["weight_probe"]) == 5
    back = load_self_spec(p, m)
    assert back.skip == cfg.skip and back.k == 5 and back.search == {"acceptance": 0.6}
    prop = SelfSpecProposer(m, str(p))
    assert prop.skip == cfg.skip and prop.k_max == 5
    assert SelfSpecProposer(m, str(p), k=2).k_max == 2


def test_json_for_another_model_is_refused(tmp_path):
    m = tiny_model(seed=1, layers=4)
    p = tmp_path / "s.json"
    save_self_spec(SelfSpecConfig(SkipSet((1,), ()), 4, model_fingerprint(m)), p)
    with pytest.raises(ValueError, match="tuned for num_layers=4, this model has 6"):
        load_self_spec(p, tiny_model(seed=1, layers=6))
    with pytest.raises(ValueError, match="tuned for hidden_size=64, this model has 32"):
        SelfSpecProposer(tiny_model(seed=1, layers=4, hidden=32), str(p))
    with pytest.raises(ValueError, match="tuned for architecture=llama, this model has qwen2"):
        load_self_spec(p, tiny_model(seed=1, layers=4, arch="qwen2"))
    other = tiny_model(seed=1, layers=4)
    with torch.no_grad():
        other.norm.weight.mul_(1.5)  # same geometry, other weights
    with pytest.raises(ValueError, match="other weights"):
        load_self_spec(p, other)
    d = json.loads(p.read_text())
    d["format"] = "something-else"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a specrt self-spec file"):
        load_self_spec(p, m)


@pytest.mark.parametrize("skip,msg", [
    (SkipSet((4,), ()), "attn layer 4 out of range"),
    (SkipSet((), (-1,)), "mlp layer -1 out of range"),
    (SkipSet(range(4), range(4)), "skips every sublayer"),
])
def test_bad_skip_sets(skip, msg, tmp_path):
    m = tiny_model(seed=1, layers=4)
    with pytest.raises(ValueError, match=msg):
        SelfSpecProposer(m, skip)
    with pytest.raises(ValueError, match=msg):
        _forward(m, [1, 2, 3], skip=skip)
    d = SelfSpecConfig(SkipSet(), 4, model_fingerprint(m)).to_json()
    d["skip"] = skip.as_dict()
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=msg):
        load_self_spec(p, m)
    with pytest.raises(ValueError, match="layer indices"):
        SkipSet(("x",), ())


def test_create_needs_a_file_for_other_models(tmp_path):
    m = tiny_model(seed=1, layers=4)
    with pytest.raises(ValueError, match="specrt tune self-spec"):
        create("self-spec", m)
    p = tmp_path / "s.json"
    save_self_spec(SelfSpecConfig(SkipSet((2,), (1,)), 3, model_fingerprint(m)), p)

    class Args:
        self_spec_config = str(p)
        num_draft = None

    prop = create("self-spec", m, Args())
    assert isinstance(prop, SelfSpecProposer) and prop.k_max == 3


# ------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_shipped_skip_set_greedy_equals_plain():
    """fp32 SmolLM2-135M-Instruct with the shipped skip set: greedy ids == plain decoding."""
    pytest.importorskip("gguf")
    from specrt import hub
    from specrt.models import load_model
    from specrt.proposers import default_self_spec

    try:
        path = hub.fetch(hub.DEFAULT_MODEL, progress=False)
    except hub.FetchError as e:
        pytest.skip(f"cannot fetch {hub.DEFAULT_MODEL}: {e}")
    model, tok = load_model(path, dtype=torch.float32)
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])]
    params = SamplingParams(max_new_tokens=32)
    plain = Engine(model, tok).generate(prompts, params)
    eng = Engine(model, tok, SelfSpecProposer(model, default_self_spec(model)))
    spec = eng.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.metrics.acceptance_rate > 0.2, eng.metrics.summary()
