"""specrt.train.eagle: EAGLE-3 / EAGLE-1 head training on tiny random targets (CPU, seconds).

The key property is training/inference consistency: the dense training forward (training-time
test) must compute, at every position and unroll step, exactly what the paged inference path
of :class:`specrt.proposers.eagle.EagleHead` computes for the corresponding draft node.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny import ByteTok, tiny_model, write_corpus as _corpus

from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.proposers.eagle import (EagleProposer, eagle3_feature_layers, load_eagle_head,
                                   save_eagle_head)
from specrt.train.eagle import (Eagle1Method, Eagle3Method, draft_vocab_maps, ttt_attention,
                                ttt_forward)
from specrt.train.hidden import compute_hidden_cache, model_fingerprint, target_states
from specrt.train.medusa import build_token_map
from specrt.train.trainer import TrainConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97



@pytest.fixture(scope="module")
def target():
    # 5 layers: EAGLE-3 features = inputs of layers (2, 2, 2)
    return tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=5, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def sharp_target():
    """Peaky next-token distributions (soft-label training has a lower entropy floor)."""
    return tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=5, heads=4, kv_heads=2, scale=4.0)


def _rand_batch(target, b=2, s=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (b, s), generator=g)
    tok[1, s - 3:] = -1  # a padded row end
    rows = [r[r >= 0].tolist() for r in tok]
    layers = eagle3_feature_layers(target.config.num_layers)
    hid, aux = target_states(target, rows, "cpu", tuple(l - 1 for l in layers))
    h = torch.zeros(b, s, target.config.hidden_size)
    f = torch.zeros(b, s, 3 * target.config.hidden_size)
    for i, (x, y) in enumerate(zip(hid, aux)):
        h[i, :x.shape[0]] = x
        f[i, :y.shape[0]] = y
    return {"tokens": tok, "hidden": h, "features": f}


def _randomize(head, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name != "lm_head":
                p.add_(torch.randn(p.shape, generator=g) * 0.1 / p.shape[1] ** 0.5)


# --------------------------------------------------------------------------------------------


def test_ttt_attention_matches_naive():
    g = torch.Generator().manual_seed(0)
    b, n, hq, hkv, d, steps = 2, 7, 4, 2, 8, 3
    q = [torch.randn(b, n, hq, d, generator=g) for _ in range(steps)]
    k = [torch.randn(b, n, hkv, d, generator=g) for _ in range(steps)]
    v = [torch.randn(b, n, hkv, d, generator=g) for _ in range(steps)]
    scale = d ** -0.5
    for s in range(steps):
        got = ttt_attention(q[s], k[0], v[0], k[1:s + 1], v[1:s + 1], scale)
        want = torch.zeros_like(got)
        for bi in range(b):
            for i in range(n):
                for h in range(hq):
                    kh = h // (hq // hkv)
                    keys = [k[0][bi, j, kh] for j in range(i + 1)] + \
                        [k[r][bi, i, kh] for r in range(1, s + 1)]
                    vals = [v[0][bi, j, kh] for j in range(i + 1)] + \
                        [v[r][bi, i, kh] for r in range(1, s + 1)]
                    sc = torch.stack([q[s][bi, i, h] @ kk for kk in keys]) * scale
                    p = torch.softmax(sc, 0)
                    want[bi, i, h] = (p[:, None] * torch.stack(vals)).sum(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _paged_chain(head, target, feats, tok, i, depth):
    """Logits of the head run through the paged inference path: a prefill of positions 0..i
    (target features), then a causal chain of ``depth`` draft nodes below position i fed the
    true tokens. Returns (prefill logits [i+1, Vd], [chain logits per depth])."""
    c = head.cfg
    cache = PagedKVCache(1, c.num_kv_heads, c.head_dim, 4, 16, torch.float32, "cpu")
    cache.add_sequence(0)
    emb = target.embed_tokens
    cos, sin = target.rope_cos, target.rope_sin
    lm = target.lm_head if c.variant == "eagle1" else None
    meta = build_metadata(cache, [0], [i + 1])
    pos = torch.arange(i + 1)
    out = head.paged_forward(F.embedding(tok[1:i + 2], emb), feats[:i + 1],
                             cos[pos].unsqueeze(1), sin[pos].unsqueeze(1), cache.kv, meta)
    cache.commit(0, i + 1)
    pre = head.logits(out, lm)
    h = out[-1:]
    chain = []
    for d in range(1, depth + 1):
        meta = build_metadata(cache, [0], [1])
        p = torch.tensor([i + d])
        h = head.paged_forward(F.embedding(tok[i + 1 + d:i + 2 + d], emb), h,
                               cos[p].unsqueeze(1), sin[p].unsqueeze(1), cache.kv, meta)
        cache.commit(0, i + 1 + d)
        chain.append(head.logits(h, lm))
    return pre, chain


@pytest.mark.parametrize("variant", ["eagle3", "eagle1"])
def test_training_forward_matches_paged_inference(target, variant):
    batch = _rand_batch(target)
    tok = batch["tokens"]
    if variant == "eagle3":
        tm = build_token_map([tok.numpy()], VOCAB, 50)
        method = Eagle3Method(target, tm, length=4)
        feats = batch["features"]
    else:
        method = Eagle1Method(target)
        feats = batch["hidden"]
    torch.manual_seed(0)
    mod = method.build()
    _randomize(mod.head)
    head = mod.export_head().eval()
    b, s = tok.shape
    n = s - 1
    steps = 4
    with torch.no_grad():
        logits, _ = mod(feats[:, :n], tok, steps)
        for bi in range(b):
            real = int((tok[bi] >= 0).sum())
            # step 0 at every real position: one prefill
            pre, _ = _paged_chain(head, target, feats[bi], tok[bi], real - 2, 0)
            torch.testing.assert_close(logits[0][bi, :real - 1], pre, rtol=1e-4, atol=1e-5)
            # step s at position i = depth-s chain below i
            for i in range(0, real - 1):
                depth = min(steps - 1, real - 2 - i)
                if depth < 1:
                    continue
                _, chain = _paged_chain(head, target, feats[bi], tok[bi], i, depth)
                for d in range(1, depth + 1):
                    torch.testing.assert_close(logits[d][bi, i], chain[d - 1][0],
                                               rtol=1e-4, atol=1e-5)


def test_draft_vocab_maps():
    tm = torch.tensor([7, 3, 50, 11])
    ids, d2t, t2d = draft_vocab_maps(tm, 60)
    assert ids.tolist() == [3, 7, 11, 50]
    assert (torch.arange(4) + d2t).tolist() == [3, 7, 11, 50]
    assert t2d.sum() == 4 and bool(t2d[50]) and not bool(t2d[4])


def test_eagle3_cache_kind(tmp_path, target):
    rows = np.full((3, 10), -1, dtype=np.int32)
    rows[0] = np.arange(10)
    rows[1, :6] = np.arange(20, 26)
    rows[2, :3] = [5, 6, 7]
    fp = model_fingerprint(target)
    layers = eagle3_feature_layers(target.config.num_layers)
    c = compute_hidden_cache(target, rows, tmp_path, fingerprint=fp, kind="eagle3",
                             feature_layers=layers, log=lambda *a: None)
    plain = compute_hidden_cache(target, rows, tmp_path, fingerprint=fp, log=lambda *a: None)
    assert c.path != plain.path and plain.features is None
    bt = c.batch([1, 0], "cpu")
    assert bt["features"].shape == (2, 10, 3 * 64) and bt["argmax"].shape == (2, 10)
    hid, aux = target_states(target, [list(range(20, 26))], "cpu",
                             tuple(l - 1 for l in layers))
    torch.testing.assert_close(bt["features"][0, :6], aux[0], rtol=2e-3, atol=2e-3)
    assert bt["argmax"][0, 6:].eq(-1).all()
    full = (hid[0] @ target.lm_head.t()).argmax(-1)
    assert bt["argmax"][0, :6].tolist() == full.tolist()
    torch.testing.assert_close(bt["hidden"], plain.batch([1, 0])["hidden"])


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(method="eagle3", data=[str(_corpus(tmp_path))], seq_len=32, steps=40,
                batch_size=8, lr=1e-2, warmup=3, draft_vocab=48, length=3,
                out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), log_every=1000,
                ckpt_every=0, heldout_pct=20.0, save_dtype="float32", hidden_batch_tokens=256)
    base.update(kw)
    return TrainConfig(**base)


def test_eagle3_trains_saves_and_loads(tmp_path, sharp_target):
    target = sharp_target
    cfg = _cfg(tmp_path, steps=50, lr=3e-2)
    # accuracy before training (the same held-out evaluation; 0 steps is not allowed: 1 step
    # at a negligible learning rate)
    res0 = run(_cfg(tmp_path, steps=1, lr=1e-9, out=str(tmp_path / "out0")), model=target,
               tokenizer=ByteTok())
    res = run(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert len(h) == 50
    assert np.mean(h[-5:]) < 0.5 * np.mean(h[:3]), h
    a0 = res0["heldout"]["corpus"]["top1"][0]
    a1 = res["heldout"]["corpus"]["top1"][0]
    assert a1 > a0 + 0.1, (a0, a1)
    assert len(res["heldout"]["corpus"]["top1"]) == 5
    out = Path(cfg.out)
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    jc = json.loads((out / "config.json").read_text())
    assert jc["specrt"]["variant"] == "eagle3"
    assert jc["specrt"]["heldout_step_accuracy"]["corpus"]["top1"][0] == a1
    assert "step 0 top-1" in (out / "README.md").read_text()
    head, info = load_eagle_head(out, target)
    assert head.cfg.draft_vocab_size == 48 and "specrt" in info
    prop = EagleProposer(target, out)
    assert prop.head.cfg.variant == "eagle3"


@pytest.mark.parametrize("variant", ["eagle3", "eagle1"])
def test_save_load_round_trip(tmp_path, target, variant):
    batch = _rand_batch(target)
    tok = batch["tokens"]
    if variant == "eagle3":
        method = Eagle3Method(target, build_token_map([tok.numpy()], VOCAB, 50), length=3)
        feats = batch["features"]
    else:
        method = Eagle1Method(target)
        feats = batch["hidden"]
    mod = method.build()
    _randomize(mod.head)
    method.save(mod, tmp_path / "h", extra_config={"note": 1}, dtype=torch.float32)
    head, info = load_eagle_head(tmp_path / "h", target)
    assert info["specrt"]["note"] == 1
    n = tok.shape[1] - 1
    lm = target.lm_head if variant == "eagle1" else None
    with torch.no_grad():
        want, _ = mod(feats[:, :n], tok, 3)
        got, _ = ttt_forward(head, feats[:, :n], tok, target.embed_tokens, target.rope_cos,
                             target.rope_sin, 3, lm)
    for x, y in zip(want, got):
        assert torch.equal(x, y)
    # and a second round trip of the loaded head
    save_eagle_head(head, tmp_path / "h2", target.config, dtype=torch.float32)
    head2, _ = load_eagle_head(tmp_path / "h2", target)
    with torch.no_grad():
        got2, _ = ttt_forward(head2, feats[:, :n], tok, target.embed_tokens, target.rope_cos,
                              target.rope_sin, 3, lm)
    for x, y in zip(got, got2):
        assert torch.equal(x, y)
    if variant == "eagle3":
        assert torch.equal(head.d2t, mod.head.d2t) and torch.equal(head.t2d, mod.head.t2d)


def test_eagle1_trains_saves_and_loads(tmp_path, target):
    cfg = _cfg(tmp_path, method="eagle", draft_vocab=0, steps=30, lr=1e-2, eval_length=3)
    res = run(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert np.mean(h[-5:]) < 0.7 * np.mean(h[:3]), h
    assert res["heldout"]["corpus"]["top1"][0] > 0.3, res["heldout"]
    head, info = load_eagle_head(cfg.out, target)
    assert head.cfg.variant == "eagle1" and head.fc_bias is not None
    EagleProposer(target, cfg.out)


def test_cli_config_and_medusa_fingerprint():
    import dataclasses
    import hashlib

    from specrt.train.cli import build_parser, config_from_args
    from specrt.train.trainer import _fingerprint

    cfg = config_from_args(build_parser().parse_args(["eagle3", "--out", "x", "--length", "3"]))
    assert cfg.method == "eagle3" and cfg.length == 3 and cfg.draft_vocab == 8192
    cfg = config_from_args(build_parser().parse_args(["eagle1", "--out", "x", "--noise", "0"]))
    assert cfg.method == "eagle" and cfg.noise == 0 and cfg.draft_vocab == 0
    # Medusa checkpoints written before the EAGLE fields existed still resume
    m = TrainConfig(method="medusa")
    old = {k: v for k, v in dataclasses.asdict(m).items()
           if k not in ("resume", "out", "cache_dir", "stop_after", "command", "ckpt_every",
                        "keep_checkpoints", "log_every", "device", "hidden_batch_tokens",
                        "layout", "save_dtype", "fsdp", "distill_time_budget", "length",
                        "eval_length", "noise")}
    assert _fingerprint(m) == hashlib.sha256(
        json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize("method", ["eagle3", "eagle"])
def test_resume_reproduces(tmp_path, target, method):
    from safetensors.torch import load_file

    kw = dict(method=method, steps=8, ckpt_every=3, draft_vocab=48 if method == "eagle3" else 0,
              length=2, eval_length=2)
    full = _cfg(tmp_path, out=str(tmp_path / "full"), **kw)
    run(full, model=target, tokenizer=ByteTok())
    part = _cfg(tmp_path, out=str(tmp_path / "part"), stop_after=4, **kw)
    assert run(part, model=target, tokenizer=ByteTok())["stopped_at"] == 4
    part.stop_after, part.resume = None, True
    run(part, model=target, tokenizer=ByteTok())
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ddp_cfg(tmp, **kw):
    return _cfg(Path(tmp), steps=5, batch_size=4, lr=1e-2, warmup=2, length=2, eval_length=2,
                seed=1, out=str(Path(tmp) / kw.pop("name")), **kw)


def _ddp_worker(rank, world, tmp):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store",
                                         rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=5, heads=4, kv_heads=2)
        res = run(_ddp_cfg(tmp, name="ddp-out", fsdp=True), model=model, tokenizer=ByteTok())
        if rank == 0:
            torch.save(res["history"], f"{tmp}/ddp-history.pt")
        torch.distributed.barrier()  # see tests/test_train.py::_ddp_worker
    finally:
        torch.distributed.destroy_process_group()


def test_eagle3_ddp_fsdp_match_single_process(tmp_path, target):
    """Two gloo ranks (DDP head, FSDP target; the ranks write the EAGLE-3 cache together) on
    a global batch = one process on it."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    _corpus(tmp_path)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ddp_hist = torch.load(tmp_path / "ddp-history.pt")
    res = run(_ddp_cfg(tmp_path, name="single-out", cache_dir=str(tmp_path / "cache1")),
              model=target, tokenizer=ByteTok())
    np.testing.assert_allclose(ddp_hist, res["history"], rtol=1e-4, atol=1e-5)
    a = load_file(str(tmp_path / "ddp-out" / "model.safetensors"))
    b = load_file(str(tmp_path / "single-out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
