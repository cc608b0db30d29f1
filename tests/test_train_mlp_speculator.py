"""specrt.train.mlp_speculator: the two-stage MLP speculator recipe on tiny random targets
(CPU, seconds)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny import ByteTok, tiny_model, write_corpus

from specrt.proposers.mlp_speculator import MLPSpeculatorProposer, load_mlp_speculator
from specrt.train.data import PAD
from specrt.train.mlp_speculator import (MLPSpecConfig, MLPSpeculatorMethod, Stage2Cache,
                                         add_args, config_from_args, corpus_prompts,
                                         generate_continuations, run_config)

VOCAB = 97


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=2, heads=2, kv_heads=1)


def _cfg(tmp_path: Path, **kw) -> MLPSpecConfig:
    base = dict(data=[str(write_corpus(tmp_path))], seq_len=48, steps=40, stage2_steps=16,
                batch_size=4, lr=1e-2, warmup=3, n_predict=3, inner_dim=32, train_vocab=40,
                stage2_prompt_len=8, stage2_new_tokens=12, stage2_prompts=12, stage2_group=2,
                out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), log_every=1000,
                ckpt_every=0, heldout_pct=20.0, save_dtype="float32", hidden_batch_tokens=256,
                distill_batch_size=4)
    base.update(kw)
    return MLPSpecConfig(**base)


def _greedy(model, prompt, n):
    """Independent greedy continuation: full recompute of the prefix for every token."""
    from specrt.kv_cache import PagedKVCache, build_metadata

    c = model.config
    ids = list(prompt)
    for _ in range(n):
        cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, 16, torch.float32)
        cache.add_sequence(0)
        meta = build_metadata(cache, [0], [len(ids)])
        out = model(torch.tensor(ids), torch.arange(len(ids)), cache.kv, meta)
        ids.append(int(out.logits[-1].argmax()))
    return ids


# --------------------------------------------------------------------------------------------


def test_two_stage_training_loss_decreases_and_output_loads(tmp_path, target):
    cfg = _cfg(tmp_path)
    res = run_config(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert len(h) == 56
    assert np.mean(h[30:40]) < 0.5 * np.mean(h[:3]), h  # stage 1 learns the pattern
    curves = np.asarray(res["curves"])
    assert curves.shape == (56, 3)
    assert all(curves[30:40, i].mean() < curves[:3, i].mean() for i in range(3))
    out = Path(cfg.out)
    for f in ("config.json", "model.safetensors", "README.md", "loss_curves.png",
              "loss_curves.json", "train_summary.json"):
        assert (out / f).is_file(), f
    spec, info = load_mlp_speculator(out, target)
    assert spec.n_predict == 3 and spec.tie_weights and spec.inner_dim == 32
    assert info["model_type"] == "mlp_speculator" and info["n_candidates"] == 5
    # head rows outside the 40-token training vocabulary are exactly zero
    live = (spec.head[0].weight.abs().sum(-1) != 0).sum()
    assert int(live) <= 40
    ho = res["heldout"]
    assert set(ho) == {"corpus", "target-written"}
    assert ho["corpus"]["top1"][0] > 0.5, ho  # a deterministic pattern is learnable
    assert all(c <= t for c, t in zip(ho["corpus"]["chain"], ho["corpus"]["top1"]))
    card = (out / "README.md").read_text()
    assert "stage 2 (16 steps)" in card and "Reproduce" in card
    prop = MLPSpeculatorProposer(target, str(out))
    from specrt.engine import Engine, SamplingParams

    ids = ByteTok().encode("abcdefghij")
    p = SamplingParams(max_new_tokens=16)
    ref = Engine(target).generate([ids], p)
    eng = Engine(target, proposer=prop, max_draft=3)
    assert eng.generate([ids], p)[0].token_ids == ref[0].token_ids


def test_stage2_sequences_are_the_targets_greedy_outputs(tmp_path, target, monkeypatch):
    """Stage-2 data: corpus prompts continued by the target; every continuation is the
    target's greedy output (independent full-recompute decoding), and the pipeline trains
    only on the generated tokens (loss_from = the prompt length)."""
    from specrt.train.data import tokenize_chunks

    rows = tokenize_chunks(ByteTok(), [str(write_corpus(tmp_path))], 48, "train", None, 20.0, 96)
    prompts = corpus_prompts(rows, 8, 6)
    assert len(prompts) == 6 and all(len(p) == 8 for p in prompts)
    assert prompts[0] == rows[0, :8].tolist() and prompts[1] == rows[1, :8].tolist()
    seqs = generate_continuations(target, prompts, max_new_tokens=10, cache_dir=tmp_path / "c",
                                  fingerprint="t", batch_size=4)
    for p, s in zip(prompts, seqs):
        assert s[:8] == p
        assert s == _greedy(target, p, len(s) - 8)
        assert len(s) == 18  # the tiny target never hits eos here (no tokenizer given)
    # cached: the same call reads the file back
    again = generate_continuations(target, prompts, max_new_tokens=10,
                                   cache_dir=tmp_path / "c", fingerprint="t", batch_size=4)
    assert again == seqs
    # the training run's stage-2 cache holds exactly these sequences (with eos stops, as the
    # pipeline passes the tokenizer)
    cfg = _cfg(tmp_path, steps=2, stage2_steps=2, stage2_prompts=6, stage2_new_tokens=10,
               out=str(tmp_path / "o2"))
    seen = {}
    import specrt.train.trainer as tr

    real = tr.train_on_rows

    def spy(cfg_, method, caches, **kw):
        seen["caches"] = caches
        return real(cfg_, method, caches, **kw)

    monkeypatch.setattr(tr, "train_on_rows", spy)
    run_config(cfg, model=target, tokenizer=ByteTok())
    s2 = seen["caches"][1]
    assert isinstance(s2, Stage2Cache) and len(s2) == 3  # 6 sequences in groups of 2
    want = [_greedy(target, p, 10) for p in prompts]
    got = []
    for j in range(len(s2)):
        b = s2.batch([j])
        assert b["tokens"].shape[0] == 2 and (b["loss_from"] == 8).all()
        got += [[t for t in r if t != PAD] for r in b["tokens"].tolist()]
    # every row is one prompt's greedy continuation, stopped at eos (96) or after 10 tokens
    assert sorted(len(g) > 8 for g in got) == [True] * 6
    for g in got:
        w = next(w for w in want if w[:8] == g[:8])
        assert g == w[:len(g)] and (len(g) == 18 or g[-1] == 96)


def test_reduced_vocabulary_loss_is_the_full_models_loss(target):
    """With a training vocabulary, the method's loss equals the dense full-vocabulary
    cross-entropy of the module (whose other head rows are zero), and stage i's label at t
    is token t + 2 + i; labels before loss_from are left out."""
    tm = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 1, 2], dtype=torch.long)
    method = MLPSpeculatorMethod(target, n_predict=3, inner_dim=16, token_map=tm,
                                 init="target")
    m = method.build()
    assert int((m.head[0].weight.abs().sum(-1) != 0).sum()) == tm.numel()
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 40, (2, 10), generator=g)
    tok[1, 7:] = PAD
    hid = torch.randn(2, 10, 64, generator=g)
    batch = {"tokens": tok, "hidden": hid, "loss_from": torch.tensor([0, 4])}
    sums, counts, _ = method.loss_terms(m, batch)
    # dense: the full-vocabulary logits of the teacher-forced forward
    n = 8
    inds = torch.cat([tok[:, 1:], torch.full((2, 3), PAD)], 1).clamp(min=0)
    with torch.no_grad():
        logits = m(hid[:, :n], inds)  # [3, 2, 8, V]
    for i in range(3):
        ce, cnt = 0.0, 0
        for b in range(2):
            for t in range(n):
                lab = t + 2 + i
                if lab >= 10 or tok[b, lab] == PAD or lab < int(batch["loss_from"][b]):
                    continue
                ce += float(F.cross_entropy(logits[i, b, t][None], tok[b, lab][None]))
                cnt += 1
        assert int(counts[i]) == cnt
        assert float(sums[i].detach()) == pytest.approx(ce, rel=1e-4)


def test_cli_arguments(tmp_path):
    ap = argparse.ArgumentParser()
    add_args(ap)
    args = ap.parse_args(["--out", str(tmp_path / "o"), "--steps", "50",
                          "--top-k-tokens-per-head", "3,2,1,1", "--no-tie-weights"])
    cfg = config_from_args(args)
    assert cfg.stage2_steps == 20  # 5:2 by default
    assert cfg.top_k_tokens_per_head == [3, 2, 1, 1] and not cfg.tie_weights
    assert cfg.data == ["stdlib"] and cfg.method == "mlp-speculator"
    args = ap.parse_args(["--out", "o", "--steps", "50", "--stage2-steps", "0"])
    assert config_from_args(args).stage2_steps == 0


def test_bad_inputs(tmp_path, target):
    tok = ByteTok()
    with pytest.raises(ValueError, match="n-predict"):
        run_config(_cfg(tmp_path, n_predict=0), model=target, tokenizer=tok)
    with pytest.raises(ValueError, match="tie-weights"):
        run_config(_cfg(tmp_path, n_predict=1), model=target, tokenizer=tok)
    with pytest.raises(ValueError, match="target-written data"):
        run_config(_cfg(tmp_path, stage2_prompts=0), model=target, tokenizer=tok)
    with pytest.raises(ValueError, match="init"):
        MLPSpeculatorMethod(target, init="zeros")
