"""specrt.train.mtp: MTP module training on tiny random targets (CPU, seconds).

The dense training forward must compute, at every row of every module, what the paged
inference path computes; the loss must fall for D = 1..3 with either label kind; runs resume
exactly and write modules that the proposer loads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny import ByteTok, tiny_model, write_corpus

from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.proposers.mtp import MTPProposer, load_mtp_modules
from specrt.train.hidden import target_states
from specrt.train.mtp import (MTPMethod, MTPTrainConfig, add_args, config_from_args,
                              run_config)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97



@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=3, heads=4, kv_heads=2, scale=4.0)


def _batch(target, b=2, s=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (b, s), generator=g)
    tok[1, s - 3:] = -1
    hid, _ = target_states(target, [r[r >= 0].tolist() for r in tok], "cpu")
    h = torch.zeros(b, s, target.config.hidden_size)
    for i, x in enumerate(hid):
        h[i, :x.shape[0]] = x
    return tok, h


def _randomize(mods, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mods.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else
                                                        0.3 / p.shape[1] ** 0.5))


@pytest.mark.parametrize("num_modules", [1, 3])
def test_training_forward_matches_paged_inference(target, num_modules):
    tok, hid = _batch(target)
    method = MTPMethod(target, torch.arange(0, VOCAB, 2), num_modules=num_modules)
    mod = method.build()
    _randomize(mod.mods)
    mods = mod.export().eval()
    b, s = tok.shape
    n = s - 1
    with torch.no_grad():
        logits, _ = mod(hid[:, :n], tok)
        for bi in range(b):
            real = int((tok[bi] >= 0).sum())
            h = hid[bi, :real - 1]
            for k, layer in enumerate(mods.layers):
                rows = real - 1 - k  # rows whose input token is real
                c = mods.cfg
                cache = PagedKVCache(1, c.num_kv_heads, c.head_dim, 4, 16, torch.float32, "cpu")
                cache.add_sequence(0)
                meta = build_metadata(cache, [0], [rows])
                pos = torch.arange(1, rows + 1)
                o = layer.paged_forward(
                    F.embedding(tok[bi, k + 1:k + 1 + rows], target.embed_tokens), h[:rows],
                    target.rope_cos[pos].unsqueeze(1), target.rope_sin[pos].unsqueeze(1),
                    cache.kv, meta)
                want = mods.logits(layer.normed(o), target.lm_head)
                torch.testing.assert_close(logits[k][bi, :rows], want, rtol=1e-4, atol=1e-5)
                h = layer.feed(o)


def _cfg(tmp_path: Path, **kw) -> MTPTrainConfig:
    base = dict(data=[str(write_corpus(tmp_path))], seq_len=32, steps=40, batch_size=8, lr=3e-2,
                warmup=3, draft_vocab=48, mtp_depth=3, out=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), log_every=1000, ckpt_every=0,
                heldout_pct=20.0, save_dtype="float32", hidden_batch_tokens=256)
    base.update(kw)
    return MTPTrainConfig(**base)


def test_trains_saves_and_loads(tmp_path, target):
    res0 = run_config(_cfg(tmp_path, steps=1, lr=1e-9, out=str(tmp_path / "out0")), model=target,
                      tokenizer=ByteTok())
    cfg = _cfg(tmp_path, steps=60)
    res = run_config(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert len(h) == 60 and np.mean(h[-5:]) < 0.5 * np.mean(h[:3]), h
    a0 = res0["heldout"]["corpus"]["top1"]
    a1 = res["heldout"]["corpus"]["top1"]
    assert len(a1) == 3 and all(y > x + 0.1 for x, y in zip(a0, a1)), (a0, a1)
    assert res["heldout"]["corpus"]["expected_accepted"] > 0
    out = Path(cfg.out)
    assert (out / "README.md").is_file() and "depth 1 top-1" in (out / "README.md").read_text()
    jc = json.loads((out / "config.json").read_text())
    assert jc["num_nextn_predict_layers"] == 3 and jc["specrt"]["mtp_feed"] == "normed"
    assert jc["specrt"]["heldout_depth_accuracy"]["corpus"]["top1"] == a1
    mods = load_mtp_modules(out, target)
    assert mods.layout == "mimo" and mods.num_modules == 3 and mods.draft_vocab_size == 48
    assert MTPProposer(target, out).depth == 3


@pytest.mark.parametrize("depth,labels", [(1, "target"), (2, "text"), (3, "text")])
def test_loss_decreases_for_each_depth(tmp_path, target, depth, labels):
    cfg = _cfg(tmp_path, steps=30, mtp_depth=depth, mtp_labels=labels,
               mtp_lambda=[1.0] + [0.5] * (depth - 1))
    res = run_config(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert np.mean(h[-5:]) < 0.7 * np.mean(h[:3]), h
    assert len(res["heldout"]["corpus"]["top1"]) == depth


def test_resume_reproduces(tmp_path, target):
    from safetensors.torch import load_file

    kw = dict(steps=8, ckpt_every=3, mtp_depth=2)
    run_config(_cfg(tmp_path, out=str(tmp_path / "full"), **kw), model=target,
               tokenizer=ByteTok())
    part = _cfg(tmp_path, out=str(tmp_path / "part"), stop_after=4, **kw)
    assert run_config(part, model=target, tokenizer=ByteTok())["stopped_at"] == 4
    part.stop_after, part.resume = None, True
    run_config(part, model=target, tokenizer=ByteTok())
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a changed MTP setting is a different run
    other = _cfg(tmp_path, out=str(tmp_path / "part"), resume=True, steps=8, ckpt_every=3,
                 mtp_depth=2, mtp_lambda=[1.0, 0.3])
    with pytest.raises(ValueError, match="other settings"):
        run_config(other, model=target, tokenizer=ByteTok())


def test_cli_arguments_and_validation(tmp_path, target):
    ap = argparse.ArgumentParser()
    add_args(ap)
    cfg = config_from_args(ap.parse_args(["--out", "x", "--mtp-depth", "2", "--mtp-lambda",
                                          "1", "0.3", "--mtp-labels", "text"]))
    assert (cfg.method, cfg.mtp_depth, cfg.mtp_lambda, cfg.mtp_labels, cfg.data) == (
        "mtp", 2, [1.0, 0.3], "text", ["stdlib"])
    assert cfg.lambdas() == [1.0, 0.3]
    with pytest.raises(ValueError, match="mtp-lambda"):
        run_config(_cfg(tmp_path, mtp_lambda=[1.0, 0.5]), model=target, tokenizer=ByteTok())
    with pytest.raises(ValueError, match="seq-len"):
        run_config(_cfg(tmp_path, seq_len=4), model=target, tokenizer=ByteTok())
