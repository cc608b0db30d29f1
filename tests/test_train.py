"""specrt.train: Medusa head training on tiny random targets (CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import ByteTok, tiny_model, write_corpus as _corpus

from specrt.proposers.medusa import MedusaProposer, load_medusa_heads
from specrt.train import dist
from specrt.train.data import (DataError, PAD, iter_documents, split_of, stdlib_def_prompts,
                               tokenize_chunks)
from specrt.train.hidden import compute_hidden_cache, final_hidden, model_fingerprint
from specrt.train.medusa import build_token_map
from specrt.train.trainer import TrainConfig, run

VOCAB = 97


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data=[str(_corpus(tmp_path))], seq_len=32, steps=30, batch_size=8, lr=1e-2,
                warmup=3, num_heads=3, draft_vocab=0, out=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), log_every=1000, ckpt_every=0,
                heldout_pct=20.0, save_dtype="float32", hidden_batch_tokens=256)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=2, heads=2, kv_heads=1)


# --------------------------------------------------------------------------------------------


def test_loss_decreases_and_output_loads(tmp_path, target):
    cfg = _cfg(tmp_path, draft_vocab=40, steps=60, lr=3e-2)
    res = run(cfg, model=target, tokenizer=ByteTok())
    h = res["history"]
    assert len(h) == 60
    assert np.mean(h[-5:]) < 0.3 * np.mean(h[:3]), h
    out = Path(cfg.out)
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    heads, layout, info = load_medusa_heads(out, target.config)
    assert layout == "resblock" and heads.num_heads == 3
    # token map: the 40 most frequent ids of the training rows, most frequent first
    rows = tokenize_chunks(ByteTok(), cfg.data, cfg.seq_len, "train", None, cfg.heldout_pct, 96)
    counts = np.bincount(rows[rows != PAD], minlength=VOCAB)
    tm = heads.token_map.numpy()
    assert len(tm) == 40 and len(set(tm.tolist())) == 40
    assert all(counts[tm[i]] >= counts[tm[i + 1]] for i in range(39))
    assert counts[tm].sum() == np.sort(counts)[::-1][:40].sum()
    acc = info["medusa_rank_accuracy"]
    assert len(acc) == 3 and all(len(r) == 10 for r in acc)
    assert all(0 <= a <= 1 for r in acc for a in r)
    assert all(r[i] >= r[i + 1] for r in acc for i in range(9))
    ho = res["heldout"]["corpus"]
    assert ho["top1"][0] > 0.5, ho  # a deterministic pattern is learnable
    assert all(t1 <= t5 for t1, t5 in zip(ho["top1"], ho["top5"]))
    p = MedusaProposer(target, str(out), tree="calibrated", num_nodes=8)
    assert p.heads.num_heads == 3
    p2 = MedusaProposer(target, str(out))
    ids, _ = p2.head_candidates(torch.randn(2, 64), 4)
    assert ids.shape == (2, 3, 4) and set(ids.flatten().tolist()) <= set(tm.tolist())


def test_resume_is_exact(tmp_path, target):
    tok = ByteTok()
    full = _cfg(tmp_path, steps=8, stage2_steps=0, ckpt_every=4, out=str(tmp_path / "full"))
    run(full, model=target, tokenizer=tok)
    part = _cfg(tmp_path, steps=8, ckpt_every=4, out=str(tmp_path / "part"), stop_after=4)
    r = run(part, model=target, tokenizer=tok)
    assert r.get("stopped_at") == 4 and not (tmp_path / "part" / "config.json").exists()
    assert (tmp_path / "part" / "checkpoints" / "step_00000004.pt").is_file()
    again = _cfg(tmp_path, steps=8, ckpt_every=4, out=str(tmp_path / "part"), resume=True)
    run(again, model=target, tokenizer=tok)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "medusa_lm_head.safetensors"))
    b = load_file(str(tmp_path / "part" / "medusa_lm_head.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # a checkpoint of other settings is refused
    other = _cfg(tmp_path, steps=8, lr=5e-3, out=str(tmp_path / "part"), resume=True)
    with pytest.raises(ValueError, match="other settings"):
        run(other, model=target, tokenizer=tok)


def test_final_hidden_matches_model_forward(target):
    from specrt.kv_cache import PagedKVCache, build_metadata

    rows = [[1, 5, 9, 13, 2, 7], [3, 4, 5]]
    got = final_hidden(target, rows, "cpu")
    cfg = target.config
    for r, g in zip(rows, got):
        cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 4,
                             dtype=torch.float32)
        cache.add_sequence(0)
        meta = build_metadata(cache, [0], [len(r)])
        out = target(torch.tensor(r), torch.arange(len(r)), cache.kv, meta)
        torch.testing.assert_close(g, target.norm(out.hidden), rtol=1e-5, atol=1e-5)


def test_self_distillation_stage2(tmp_path, target):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"abc{i}", "chat": i % 2 == 0}) + "\n"
                               for i in range(12)))
    cfg = _cfg(tmp_path, steps=4, stage2_steps=4, self_distill=[str(prompts)],
               distill_max_new_tokens=8, distill_batch_size=4)
    res = run(cfg, model=target, tokenizer=ByteTok())
    assert len(res["history"]) == 8
    cached = list(Path(cfg.cache_dir).glob("distill-*.jsonl"))
    assert len(cached) == 1
    recs = [json.loads(x) for x in cached[0].read_text().splitlines()]
    assert len(recs) == 12
    for r in recs:  # prompt ids + the target's greedy continuation
        p = ByteTok().encode(ByteTok().apply_chat_template([{"content": r["prompt"]}])
                             if r["chat"] else r["prompt"])
        assert r["ids"][:len(p)] == p and len(r["ids"]) > len(p)


# --------------------------------------------------------------------------------------------
# data


def test_stdlib_source_split_and_prompts():
    docs = []
    for d in iter_documents("stdlib", "heldout"):
        docs.append(d.key)
        if len(docs) >= 3:
            break
    assert docs and all(split_of(k) == "heldout" for k in docs)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    first = next(iter(iter_documents("stdlib", "train")))
    assert split_of(first.key) == "train" and first.text
    ps = stdlib_def_prompts(3)
    assert len(ps) == 3 and all(p.lstrip().startswith(("def ", "async def ")) for p in ps)
    assert all('"""' in p or "'''" in p for p in ps)


def test_bad_inputs(tmp_path, target):
    tok = ByteTok()
    with pytest.raises(DataError, match="unknown data source"):
        run(_cfg(tmp_path, data=["no-such-source"]), model=target, tokenizer=tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no train text"):
        run(_cfg(tmp_path, data=[str(empty)]), model=target, tokenizer=tok)
    with pytest.raises(DataError, match="no such JSONL"):
        run(_cfg(tmp_path, data=[str(tmp_path / "missing.jsonl")]), model=target, tokenizer=tok)
    with pytest.raises(ValueError, match="seq-len 4 is too small"):
        run(_cfg(tmp_path, seq_len=4), model=target, tokenizer=tok)
    with pytest.raises(ValueError, match="give --self-distill"):
        run(_cfg(tmp_path, stage2_steps=3), model=target, tokenizer=tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="'text' or 'prompt'"):
        run(_cfg(tmp_path, data=[str(bad)]), model=target, tokenizer=tok)
    with pytest.raises(ValueError):
        build_token_map([np.arange(5)], VOCAB, -1)
    assert build_token_map([np.arange(5)], VOCAB, 0) is None
    assert build_token_map([np.arange(5)], VOCAB, VOCAB) is None


def test_cli_errors(tmp_path, capsys):
    from specrt.train.cli import main

    rc = main(["medusa", "--data", "nope-not-a-source", "--out", str(tmp_path / "o"),
               "--model", str(tmp_path / "missing-model")])
    assert rc == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# distributed


def _ddp_cfg(tmp, **kw):
    return _cfg(Path(tmp), steps=6, batch_size=4, lr=1e-2, warmup=2, draft_vocab=50, seed=1,
                out=str(Path(tmp) / kw.pop("name")), **kw)


def _ddp_worker(rank, world, tmp):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store",
                                         rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_model(seed=0, vocab=VOCAB, hidden=64, layers=2, heads=2, kv_heads=1)
        # --fsdp: the frozen target's decoder layers sharded with FSDP2 (gloo on CPU); the
        # ranks hold different numbers of rows but run the same number of forwards
        res = run(_ddp_cfg(tmp, name="ddp-out", fsdp=True), model=model, tokenizer=ByteTok())
        if rank == 0:
            torch.save(res["history"], f"{tmp}/ddp-history.pt")
        # both ranks done before either tears gloo down (a rank leaving while the other still
        # has gloo work in flight aborted once: "terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_fsdp_match_single_process(tmp_path, target):
    """Two gloo ranks (DDP heads, FSDP target) on a global batch = one process on it."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    _corpus(tmp_path)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ddp_hist = torch.load(tmp_path / "ddp-history.pt")
    assert dist.world_size() == 1
    # the hidden states the two ranks wrote = those of one process (separate cache)
    rows = tokenize_chunks(ByteTok(), [str(tmp_path / "corpus.jsonl")], 32, "train", None,
                           20.0, 96)
    fp = model_fingerprint(target)
    mine = compute_hidden_cache(target, rows, tmp_path / "single-cache", fingerprint=fp,
                                tokens_per_batch=256, log=lambda *a: None)
    theirs = compute_hidden_cache(target, rows, tmp_path / "cache", fingerprint=fp,
                                  log=lambda *a: None)  # cached by the ranks
    assert theirs.path != mine.path
    np.testing.assert_allclose(np.asarray(theirs.hidden, dtype=np.float32),
                               np.asarray(mine.hidden, dtype=np.float32), atol=2e-3)
    # training on the same cached hidden states: same loss trajectory and weights
    res = run(_ddp_cfg(tmp_path, name="single-out"), model=target, tokenizer=ByteTok())
    np.testing.assert_allclose(ddp_hist, res["history"], rtol=1e-4, atol=1e-5)
    a = load_file(str(tmp_path / "ddp-out" / "medusa_lm_head.safetensors"))
    b = load_file(str(tmp_path / "single-out" / "medusa_lm_head.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["resblock", "medusa1", "vllm"])
def test_save_layouts_roundtrip(tmp_path, target, layout):
    from specrt.train.medusa import MedusaMethod

    tm = build_token_map([np.arange(VOCAB) % 30], VOCAB, 20)
    method = MedusaMethod(64, VOCAB, target.lm_head, num_heads=2, token_map=tm)
    module = method.build()
    with torch.no_grad():
        module.block_weight.normal_(0, 0.05)
        module.block_bias.normal_(0, 0.05)
    method.save(module, tmp_path / layout, layout=layout, dtype=torch.float32,
                extra_config={"medusa_rank_accuracy": [[0.5] * 10] * 2})
    heads, got_layout, _ = load_medusa_heads(tmp_path / layout, target.config)
    assert got_layout == layout
    x = torch.randn(5, 64)
    want = module(x, target.lm_head)
    got = heads(x, None if heads.own_lm_head else target.lm_head)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(heads.token_map, tm)


def test_target_labels_are_the_targets_greedy_predictions(target):
    """labels="target": head k at t learns the target's argmax (draft columns) at t + 1 + k,
    computed here independently from the full logits."""
    from specrt.train.medusa import MedusaMethod

    tm = build_token_map([np.arange(VOCAB)], VOCAB, 60)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (2, 12), generator=g)
    tok[1, 9:] = PAD
    hid = torch.randn(2, 12, 64, generator=g)
    method = MedusaMethod(64, VOCAB, target.lm_head, num_heads=3, token_map=tm, labels="target")
    x, lab = method._inputs({"tokens": tok, "hidden": hid})
    cols = hid.float() @ target.lm_head[tm].float().t()  # [2, 12, 60]
    best = cols.argmax(-1)
    n = 0
    for b in range(2):
        for t in range(10):
            if tok[b, t + 2] == PAD:
                continue
            torch.testing.assert_close(x[n], hid[b, t])
            for k in range(3):
                want = int(best[b, t + 1 + k]) if t + 2 + k < 12 and tok[b, t + 2 + k] != PAD else -1
                assert int(lab[k, n]) == want, (b, t, k)
            n += 1
    assert n == x.shape[0]
    with pytest.raises(ValueError, match="labels"):
        MedusaMethod(64, VOCAB, target.lm_head, labels="soft")
