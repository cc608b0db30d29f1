"""MTP modules and the MTP proposer: the MiMo and DeepSeek-V3 layouts (synthetic checkpoints
written from the public tensor names) load into the same modules, unsupported blocks are clear
errors, chain drafts equal a dense re-computation of the modules, greedy decoding is identical
to plain decoding (Llama and Qwen2 targets, batched, chains, trees, recursion, page sizes 1 and
16), sampling is lossless (chi-square), and the module caches after rollback equal caches
rebuilt from the accepted tokens."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specrt.engine import Engine, SamplingParams
from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.proposers import NoProposer
from specrt.proposers.base import SeqView
from specrt.proposers.mtp import (MTPCheckpointError, MTPConfig, MTPModules, MTPProposer,
                                  load_mtp_modules, save_mtp_modules)

from _tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, scale=3.0, layers=4)


@pytest.fixture(scope="module")
def qwen_target():
    return tiny_model(seed=5, scale=3.0, layers=3, arch="qwen2")


def random_modules(target, num_modules=2, seed=0, token_map=None, feed_normed=True,
                   scale=2.0) -> MTPModules:
    cfg = MTPConfig.for_target(target.config, num_modules, feed_normed=feed_normed)
    m = MTPModules(cfg, token_map=token_map)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return m.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# public layouts, written from the tensor names (independently of the loader's tables)
# --------------------------------------------------------------------------------------------


def _block_tensors(layer, pre: str) -> dict:
    c = layer.cfg
    q, kv, it = c.q_size, c.kv_size, c.intermediate_size
    w = layer.qkv_weight.detach()
    sd = {pre + "input_layernorm.weight": layer.input_norm.detach(),
          pre + "post_attention_layernorm.weight": layer.post_norm.detach(),
          pre + "self_attn.q_proj.weight": w[:q], pre + "self_attn.k_proj.weight": w[q:q + kv],
          pre + "self_attn.v_proj.weight": w[q + kv:],
          pre + "self_attn.o_proj.weight": layer.o_weight.detach(),
          pre + "mlp.gate_proj.weight": layer.gate_up_weight.detach()[:it],
          pre + "mlp.up_proj.weight": layer.gate_up_weight.detach()[it:],
          pre + "mlp.down_proj.weight": layer.down_weight.detach()}
    if layer.qkv_bias is not None:
        b = layer.qkv_bias.detach()
        sd[pre + "self_attn.q_proj.bias"] = b[:q]
        sd[pre + "self_attn.k_proj.bias"] = b[q:q + kv]
        sd[pre + "self_attn.v_proj.bias"] = b[q + kv:]
    return sd


def mimo_state(mods: MTPModules) -> dict:
    sd = {}
    for k, layer in enumerate(mods.layers):
        pre = f"model.mtp_layers.{k}."
        sd[pre + "token_layernorm.weight"] = layer.token_norm.detach()
        sd[pre + "hidden_layernorm.weight"] = layer.hidden_norm.detach()
        sd[pre + "input_proj.weight"] = layer.proj.detach()  # cat(hidden, token)
        sd[pre + "final_layernorm.weight"] = layer.final_norm.detach()
        sd.update(_block_tensors(layer, pre))
    return {k: v.clone().contiguous() for k, v in sd.items()}


def deepseek_state(mods: MTPModules, target, first_layer: int) -> dict:
    h = target.config.hidden_size
    sd = {}
    for k, layer in enumerate(mods.layers):
        pre = f"model.layers.{first_layer + k}."
        sd[pre + "enorm.weight"] = layer.token_norm.detach()
        sd[pre + "hnorm.weight"] = layer.hidden_norm.detach()
        p = layer.proj.detach()
        sd[pre + "eh_proj.weight"] = torch.cat((p[:, h:], p[:, :h]), 1)  # cat(token, hidden)
        sd[pre + "shared_head.norm.weight"] = layer.final_norm.detach()
        sd[pre + "shared_head.head.weight"] = target.lm_head.detach()
        sd[pre + "embed_tokens.weight"] = target.embed_tokens.detach()
        sd.update(_block_tensors(layer, pre))
    return {k: v.clone().contiguous() for k, v in sd.items()}


def _paged_logits(mods, target, tokens, hidden):
    """Every module over one causal sequence through the paged path: logits per module."""
    c = mods.cfg
    n = len(tokens) - mods.num_modules
    out = []
    h = hidden[:n]
    for k, layer in enumerate(mods.layers):
        cache = PagedKVCache(1, c.num_kv_heads, c.head_dim, 4, 32, torch.float32, "cpu")
        cache.add_sequence(0)
        meta = build_metadata(cache, [0], [n])
        pos = torch.arange(1, n + 1)
        o = layer.paged_forward(F.embedding(torch.tensor(tokens[k + 1:k + 1 + n]),
                                            target.embed_tokens), h,
                                target.rope_cos[pos].unsqueeze(1),
                                target.rope_sin[pos].unsqueeze(1), cache.kv, meta)
        out.append(mods.logits(layer.normed(o), target.lm_head))
        h = layer.feed(o)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layouts_load_into_the_same_modules(tmp_path, target, qwen_target, arch):
    """MiMo and DeepSeek-V3 namings of the same modules (sharded with unrelated target tensors
    for DeepSeek) load into identical modules and give identical logits; specrt's own writer
    round-trips."""
    from safetensors.torch import save_file

    tgt = target if arch == "llama" else qwen_target
    mods = random_modules(tgt, 2, seed=1)
    assert (mods.layers[0].qkv_bias is not None) == (arch == "qwen2")
    (tmp_path / "mimo").mkdir()
    save_file(mimo_state(mods), str(tmp_path / "mimo" / "model.safetensors"))
    ds = deepseek_state(mods, tgt, first_layer=tgt.config.num_layers)
    # a whole-model checkpoint: the target's own layers and embedding sit beside the MTP layers
    ds_a = {k: v for i, (k, v) in enumerate(sorted(ds.items())) if i % 2}
    ds_b = {k: v for i, (k, v) in enumerate(sorted(ds.items())) if not i % 2}
    ds_a["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    ds_b["model.embed_tokens.weight"] = torch.zeros(2, 2)
    (tmp_path / "ds").mkdir()
    save_file(ds_a, str(tmp_path / "ds" / "model-00001-of-00002.safetensors"))
    save_file(ds_b, str(tmp_path / "ds" / "model-00002-of-00002.safetensors"))
    a = load_mtp_modules(tmp_path / "mimo", tgt)
    b = load_mtp_modules(tmp_path / "ds", tgt)
    assert a.layout == "mimo" and b.layout == "deepseek"
    assert a.cfg.feed_normed and not b.cfg.feed_normed  # the layouts' conventions
    for (n1, p1), (n2, p2), (n3, p3) in zip(mods.state_dict().items(), a.state_dict().items(),
                                            b.state_dict().items()):
        assert n1 == n2 == n3 and torch.equal(p1, p2) and torch.equal(p1, p3), n1
    rng = random.Random(2)
    toks = [rng.randrange(97) for _ in range(11)]
    g = torch.Generator().manual_seed(3)
    hid = tgt.norm(torch.randn(11, tgt.config.hidden_size, generator=g))
    b.cfg.feed_normed = True  # same feed: identical logits at every depth
    for x, y in zip(_paged_logits(a, tgt, toks, hid), _paged_logits(b, tgt, toks, hid)):
        assert torch.equal(x, y)
    save_mtp_modules(a, tmp_path / "own", tgt.config, extra_config={"note": 1},
                     dtype=torch.float32)
    c = load_mtp_modules(tmp_path / "own", tgt)
    assert c.info["specrt"]["note"] == 1 and c.cfg.feed_normed
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(p1, p2), n1


def test_token_map_round_trip_and_draft_vocabulary(tmp_path, target):
    tm = torch.randperm(97, generator=torch.Generator().manual_seed(0))[:30]
    mods = random_modules(target, 1, token_map=tm)
    save_mtp_modules(mods, tmp_path, target.config, dtype=torch.float32)
    m = load_mtp_modules(tmp_path, target)
    assert torch.equal(m.token_map, tm) and m.draft_vocab_size == 30
    lg = m.logits(torch.randn(2, target.config.hidden_size), target.lm_head)
    assert lg.shape == (2, 30)
    assert set(m.to_target(lg.argmax(-1)).tolist()) <= set(tm.tolist())


def test_loader_errors(tmp_path, target):
    from safetensors.torch import save_file

    def write(sd):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        return d

    mods = random_modules(target, 1)
    ds = deepseek_state(mods, target, 4)
    mla = {k: v for k, v in ds.items() if "q_proj" not in k}
    mla["model.layers.4.self_attn.kv_a_proj_with_mqa.weight"] = torch.zeros(8, 64)
    with pytest.raises(MTPCheckpointError, match="MLA attention.*not supported"):
        load_mtp_modules(write(mla), target)
    moe = {k: v for k, v in ds.items() if "mlp." not in k}
    moe["model.layers.4.mlp.experts.0.gate_proj.weight"] = torch.zeros(8, 64)
    moe["model.layers.4.mlp.gate.weight"] = torch.zeros(4, 64)
    with pytest.raises(MTPCheckpointError, match="mixture-of-experts.*not supported"):
        load_mtp_modules(write(moe), target)
    with pytest.raises(MTPCheckpointError, match="not an MTP checkpoint"):
        load_mtp_modules(write({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}),
                         target)
    mimo = mimo_state(mods)
    with pytest.raises(MTPCheckpointError, match="ambiguous"):
        load_mtp_modules(write({**mimo, **ds}), target)
    with pytest.raises(MTPCheckpointError, match="misses"):
        load_mtp_modules(write({k: v for k, v in mimo.items() if "final_layernorm" not in k}),
                         target)
    with pytest.raises(MTPCheckpointError, match="unexpected tensor"):
        load_mtp_modules(write({**mimo, "model.mtp_layers.0.foo.weight": torch.zeros(2)}), target)
    small = tiny_model(seed=1, layers=2, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(MTPCheckpointError, match="hidden size"):
        load_mtp_modules(write(mimo), small)
    bad = dict(ds)
    bad["model.layers.4.shared_head.head.weight"] = torch.zeros(50, 64)
    with pytest.raises(MTPCheckpointError, match="shared_head.head"):
        load_mtp_modules(write(bad), target)
    with pytest.raises(FileNotFoundError):
        load_mtp_modules(tmp_path / "nope", target)


# --------------------------------------------------------------------------------------------
# drafting against a dense re-computation
# --------------------------------------------------------------------------------------------


def _prefill_hidden(target, tokens):
    """The target's pre-norm hidden states at every position of ``tokens``."""
    c = target.config
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 64, torch.float32, "cpu")
    cache.add_sequence(0)
    n = len(tokens)
    meta = build_metadata(cache, [0], [n], "cpu")
    return target(torch.tensor(tokens), torch.arange(n), cache.kv, meta,
                  hidden_rows=torch.arange(n)).hidden


def _view(sid, tokens, max_draft=8):
    return SeqView(seq_id=sid, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                   committed_len=len(tokens) - 1, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                   step=0, max_draft=max_draft)


def _dense_module(layer, target, toks, hs, pos, visible):
    """One module over explicit rows (token, hidden input, position) with a visibility matrix,
    in float64 with plain attention: block outputs [n, H]."""
    c = layer.cfg
    g = lambda t: t.double()  # noqa: E731
    eps = c.rms_norm_eps

    def rms(x, w):
        return g(w) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    emb = target.embed_tokens.double()[torch.tensor(toks)]
    x = torch.cat((rms(torch.stack(hs).double(), layer.hidden_norm), rms(emb, layer.token_norm)),
                  -1) @ g(layer.proj).T
    a = rms(x, layer.input_norm)
    qkv = a @ g(layer.qkv_weight).T + (g(layer.qkv_bias) if layer.qkv_bias is not None else 0)
    n, d = len(toks), c.head_dim
    q = qkv[:, :c.q_size].view(n, -1, d)
    k = qkv[:, c.q_size:c.q_size + c.kv_size].view(n, -1, d)
    v = qkv[:, c.q_size + c.kv_size:].view(n, -1, d)
    p = torch.tensor(pos)
    cos, sin = target.rope_cos.double()[p][:, None], target.rope_sin.double()[p][:, None]

    def rot(t):
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), -1)

    q, k = rot(q), rot(k)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    s = s.masked_fill(~torch.as_tensor(visible)[None], float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, -1)
    x = x + o @ g(layer.o_weight).T
    y = rms(x, layer.post_norm)
    gu = y @ g(layer.gate_up_weight).T
    gate, up = gu.chunk(2, -1)
    return x + (F.silu(gate) * up) @ g(layer.down_weight).T


def _dense_norm(layer, out):
    w = layer.final_norm.double()
    return w * (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + layer.cfg.rms_norm_eps))


def _dense_feed(layer, out):
    return _dense_norm(layer, out) if layer.cfg.feed_normed else out


def reference_chain(target, mods, tokens, depth):
    """Greedy MTP chain for one sequence, every module recomputed from scratch over explicit
    rows: module k row i = (h^{k-1}_i, t_{i+k+1}) at position i + 1, causal; levels past the
    module count re-apply the last module to (its own output at the previous row, the last
    draft) at the next position."""
    c = len(tokens) - 1
    h0 = [r.double() for r in target.norm(_prefill_hidden(target, tokens[:-1]))]
    seq = list(tokens)
    draft = []
    prev = h0  # per row i: the hidden input of the current module
    d = mods.num_modules
    for level in range(1, depth + 1):
        k = min(level, d) - 1
        layer = mods.layers[k]
        if level <= d:
            rows = list(range(c))
            toks = [seq[i + k + 1] for i in rows]
            hs = prev[:c]
            pos = [i + 1 for i in rows]
            vis = np.tril(np.ones((c, c), dtype=bool))
            out = _dense_module(layer, target, toks, hs, pos, vis)
            outs = list(out)
            last = outs[c - 1]
            rec_toks, rec_hs, rec_pos = toks, list(hs), pos
        else:
            # recursive row: (own output at the previous row, the newest draft)
            rec_toks = rec_toks + [seq[-1]]
            rec_hs = rec_hs + [_dense_feed(layer, last)]
            rec_pos = rec_pos + [rec_pos[-1] + 1]
            m = len(rec_toks)
            out = _dense_module(layer, target, rec_toks, rec_hs, rec_pos,
                                np.tril(np.ones((m, m), dtype=bool)))
            last = out[-1]
        lg = _dense_norm(layer, last) @ mods.head_rows(target.lm_head).double().T
        tok = int(mods.to_target(lg.argmax().reshape(1))[0])
        draft.append(tok)
        seq.append(tok)
        if level < d:
            prev = [_dense_feed(layer, o) for o in outs]
    return draft


@pytest.mark.parametrize("num_modules,depth,feed", [(3, 3, True), (3, 3, False), (1, 4, True),
                                                     (2, 4, False)])
def test_chain_matches_dense_reference(target, num_modules, depth, feed):
    """Batched chain drafting (sequences of several lengths, page sizes 1 and 16) equals the
    dense re-computation, chained modules and recursion past them alike."""
    mods = random_modules(target, num_modules, seed=4, feed_normed=feed)
    rng = random.Random(6)
    seqs = [[rng.randrange(97) for _ in range(n)] for n in (9, 4, 13)]
    for page in (1, 16):
        prop = MTPProposer(target, mods, depth=depth, page_size=page, num_pages=256)
        views = [_view(i, s) for i, s in enumerate(seqs)]
        for v in views:
            prop.add(v, hidden=_prefill_hidden(target, v.token_ids[:-1]))
        trees = prop.propose(views)
        for s, tr in zip(seqs, trees):
            assert tr.parents.tolist() == list(range(-1, depth))
            assert tr.tokens.tolist()[1:] == reference_chain(target, mods, s, depth)


def test_short_prompts_and_max_draft(target):
    """A one-token prompt drafts nothing; chained levels need c >= level - 1; max_draft caps."""
    mods = random_modules(target, 3, seed=5)
    prop = MTPProposer(target, mods, num_pages=64)
    views = [_view(0, [5]), _view(1, [5, 6]), _view(2, [1, 2, 3, 4, 5, 6]),
             _view(3, [1, 2, 3, 4, 5], max_draft=1)]
    for v in views:
        h = _prefill_hidden(target, v.token_ids[:-1]) if v.committed_len else None
        prop.add(v, hidden=h)
    trees = prop.propose(views)
    assert [t.max_depth for t in trees] == [0, 2, 3, 1]


def test_top_k_tree_shape(target):
    mods = random_modules(target, 2, seed=6)
    prop = MTPProposer(target, mods, depth=3, top_k=2, num_pages=64)
    assert prop.max_nodes == 1 + 2 + 2 * 4
    v = _view(0, [3, 1, 4, 1, 5, 9])
    prop.add(v, hidden=_prefill_hidden(target, v.token_ids[:-1]))
    tr = prop.propose([v])[0]
    par = tr.parents.tolist()
    assert tr.num_nodes == prop.max_nodes and tr.max_depth == 3
    assert all(0 <= par[i] < i for i in range(1, len(par)))
    kids = {}
    for i, p in enumerate(par[1:], 1):
        kids.setdefault(p, []).append(i)
    assert len(kids[0]) == 2 and all(len(x) == 2 for x in kids.values())
    # the best root child continues like the chain
    chain = MTPProposer(target, mods, depth=3, num_pages=64)
    chain.add(v, hidden=_prefill_hidden(target, v.token_ids[:-1]))
    ct = chain.propose([v])[0].tokens.tolist()
    assert tr.tokens.tolist()[1] == ct[1]


# --------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(97) for _ in range(rng.randrange(1, 14))] for _ in range(n)]


@pytest.mark.parametrize("arch,num_modules,depth,top_k,page", [
    ("llama", 3, None, 1, 16), ("llama", 3, None, 1, 1), ("llama", 1, 3, 1, 16),
    ("llama", 2, 4, 2, 1), ("qwen2", 3, None, 2, 16), ("qwen2", 1, 2, 3, 1)])
def test_greedy_identical_to_plain(target, qwen_target, arch, num_modules, depth, top_k, page):
    tgt = target if arch == "llama" else qwen_target
    mods = random_modules(tgt, num_modules, seed=7)
    prompts = _prompts(6, seed=1)
    sp = SamplingParams(max_new_tokens=24, temperature=0.0)
    ref = Engine(tgt, proposer=NoProposer(), page_size=page).generate(prompts, sp)
    prop = MTPProposer(tgt, mods, depth=depth, top_k=top_k, page_size=page)
    out = Engine(tgt, proposer=prop, page_size=page, max_batch_size=4).generate(prompts, sp)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]


def _distilled_modules(tgt, num_modules, steps=60):
    """Modules trained for a few steps on the target's own greedy text (they accept often)."""
    from specrt.train.mtp import MTPMethod

    rows = Engine(tgt, proposer=NoProposer()).generate(
        _prompts(24, seed=9), SamplingParams(max_new_tokens=30, temperature=0.0))
    seqs = [list(p) + o.token_ids for p, o in zip(_prompts(24, seed=9), rows)]
    s = max(map(len, seqs))
    tok = torch.full((len(seqs), s), -1, dtype=torch.long)
    hid = torch.zeros(len(seqs), s, tgt.config.hidden_size)
    for i, q in enumerate(seqs):
        tok[i, :len(q)] = torch.tensor(q)
        hid[i, :len(q)] = tgt.norm(_prefill_hidden(tgt, q))
    method = MTPMethod(tgt, None, num_modules=num_modules)
    torch.manual_seed(0)
    mod = method.build()
    opt = torch.optim.AdamW(mod.parameters(), lr=1e-2)
    for _ in range(steps):
        sums, counts, _ = method.loss_terms(mod, {"tokens": tok, "hidden": hid})
        loss = (sums / counts.clamp(min=1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mod.export().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trained(target):
    return _distilled_modules(target, 3)


class _CheckedMTP(MTPProposer):
    """After every propose (the step's catch-up done), each module cache's committed rows equal
    those of a proposer rebuilt from scratch on the accepted tokens."""

    checked = 0

    def propose(self, seqs):
        trees = super().propose(seqs)
        for s in seqs:
            if self._limit(s) < self.num_used:
                continue
            fresh = MTPProposer(self.target, self.modules, depth=self.depth, page_size=4,
                                num_pages=128)
            v = _view(s.seq_id, s.token_ids)
            fresh.add(v, hidden=_prefill_hidden(self.target, v.token_ids[:-1]))
            MTPProposer.propose(fresh, [v])
            for k in range(self.num_used):
                n = self.caches[k].committed_len(s.seq_id)
                assert n == fresh.caches[k].committed_len(s.seq_id) == s.committed_len - k
                a = _gather(self.caches[k], s.seq_id, n)
                b = _gather(fresh.caches[k], s.seq_id, n)
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            _CheckedMTP.checked += 1
        return trees


def _gather(cache, sid, n):
    slots = torch.as_tensor(cache.slot_mapping(sid, 0, n))
    kv = cache.kv[0]
    return kv.reshape(2, -1, *kv.shape[-2:])[:, slots]


def test_module_caches_after_rollback_equal_rebuild(target, trained):
    prop = _CheckedMTP(target, trained, depth=3, top_k=2, page_size=16)
    prompts = _prompts(3, seed=4)
    sp = SamplingParams(max_new_tokens=16, temperature=0.0)
    ref = Engine(target, proposer=NoProposer()).generate(prompts, sp)
    eng = Engine(target, proposer=prop)
    out = eng.generate(prompts, sp)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert _CheckedMTP.checked >= 10
    assert eng.metrics.accepted > 0  # partial acceptance exercises the rollback


def test_trained_modules_accept_and_stay_lossless(target, trained):
    """Modules distilled from the target for a few steps get drafts accepted, full chains
    included; batched, page size 1, greedy ids equal plain decoding; sampled requests in the
    same batch finish."""
    prompts = _prompts(6, seed=9)[:6]
    params = [SamplingParams(max_new_tokens=20, temperature=0.0 if i % 2 else 0.8, seed=i)
              for i in range(6)]
    ref = Engine(target, proposer=NoProposer(), page_size=1).generate(prompts, params)
    eng = Engine(target, proposer=MTPProposer(target, trained, page_size=1), page_size=1,
                 max_batch_size=4)
    out = eng.generate(prompts, params)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.error is None and len(o.token_ids) == 20
        if i % 2:
            assert o.token_ids == r.token_ids
    m = eng.metrics
    assert m.acceptance_rate > 0.15 and len(m.depth_hist) == 4 and m.depth_hist[3] > 0, \
        m.summary()


def test_sampling_lossless_chi_square():
    """The machinery of test_engine.test_sampling_lossless_end_to_end (3000 seeds, chi-square
    of the first k + 1 = 4 tokens jointly, alpha 1e-4): an MTP-2 chain past its modules
    (depth 3, recursion) and a top-3 tree."""
    pytest.importorskip("scipy.stats")
    from test_engine import (_K, _N_STAT, _PROMPT, _VOCAB, _chi_square_p, _exact_joint,
                             _exact_tables, _sample_first_tokens)

    tgt = tiny_model(seed=3, scale=3.0, vocab=_VOCAB, hidden=32, layers=3)
    for top_k, temperature in ((1, 1.0), (3, 0.8)):
        mods = random_modules(tgt, 2, seed=21, scale=1.0)
        table = _exact_tables(tgt, _PROMPT, _K + 1, temperature)
        exact = _exact_joint(table, _VOCAB, _K + 1)
        prop = MTPProposer(tgt, mods, depth=_K, top_k=top_k)
        outs, m = _sample_first_tokens(tgt, prop, _N_STAT, temperature)
        pval = _chi_square_p(outs, exact, _VOCAB, _K + 1)
        assert pval > 1e-4, f"top_k {top_k}: chi-square p = {pval:.2e}, {m.depth_hist}"
        assert m.accepted > 0


def test_bad_arguments(target):
    mods = random_modules(target, 2)
    with pytest.raises(ValueError, match="depth"):
        MTPProposer(target, mods, depth=0)
    with pytest.raises(ValueError, match="top_k"):
        MTPProposer(target, mods, top_k=0)
    with pytest.raises(ValueError, match="total_tokens"):
        MTPProposer(target, mods, total_tokens=0)
    small = tiny_model(seed=1, layers=2, hidden=32, heads=2, kv_heads=1)
    with pytest.raises(MTPCheckpointError, match="hidden"):
        MTPProposer(small, mods)
    big = MTPProposer(target, mods, depth=6, top_k=8)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        Engine(target, proposer=big, max_tree_nodes=32)
    prop = MTPProposer(target, mods, depth=3, top_k=2, total_tokens=5)
    assert prop.max_nodes == 5


# --------------------------------------------------------------------------------------------
# the shipped modules on the real model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_shipped_modules_greedy_equals_plain():
    """fp32 SmolLM2-135M-Instruct with the shipped MTP-3 modules: greedy ids == plain decoding
    (batch of 2, pages of 16 and 1), and some drafts are accepted (the shipped modules are
    weak: docs/mtp.md)."""
    pytest.importorskip("gguf")
    from specrt import hub
    from specrt.models import load_model
    from specrt.proposers.mtp import default_mtp_modules

    try:
        path = hub.fetch(hub.DEFAULT_MODEL, progress=False)
    except hub.FetchError as e:
        pytest.skip(f"cannot fetch {hub.DEFAULT_MODEL}: {e}")
    model, tok = load_model(path, dtype=torch.float32)
    ask = "Write a Python function that reverses a string."
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               tok.apply_chat_template([{"role": "user", "content": ask}])]
    params = SamplingParams(max_new_tokens=32)
    plain = Engine(model, tok).generate(prompts, params)
    for page in (16, 1):
        eng = Engine(model, tok, MTPProposer(model, default_mtp_modules(model), page_size=page),
                     page_size=page)
        spec = eng.generate(prompts, params)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        assert eng.metrics.accepted > 0, eng.metrics.summary()


def test_from_args_and_default_modules(tmp_path, target):
    """``--proposer mtp`` options (what ``proposers.create("mtp", ...)`` hands over)."""
    from specrt.proposers.mtp import default_mtp_modules, from_args

    save_mtp_modules(random_modules(target, 2), tmp_path, target.config, dtype=torch.float32)

    class Args:
        mtp_modules = str(tmp_path)
        mtp_depth = None
        num_draft = 4
        mtp_top_k = 2
        total_tokens = "6"

    p = from_args(target, Args())
    assert (p.depth, p.top_k, p.max_nodes, p.modules.num_modules) == (4, 2, 6, 2)
    Args.num_draft, Args.mtp_top_k, Args.total_tokens = None, None, None
    p = from_args(target, Args())
    assert (p.depth, p.top_k) == (2, 1)
    with pytest.raises(ValueError, match="smollm2-135m"):
        default_mtp_modules(target)
