"""The public wrappers (specrt.ops) and the extension loader: argument validation, strict
mode, nothing written on bad input, agreement with the raw ops and the references."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

import specrt
from specrt import ops, reference
from specrt.ops import SpecrtInputError


def _attn_case(b=3, ps=16, hq=4, hkv=2, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 6, (b,), generator=g)
    ctx = torch.randint(0, 40, (b,), generator=g)
    seq_lens = (ctx + t).int()
    pages_per = (seq_lens + ps - 1) // ps
    num_pages = int(pages_per.sum()) + 2
    perm = torch.randperm(num_pages, generator=g).int()
    bt = torch.full((b, int(pages_per.max())), -1, dtype=torch.int32)
    k = 0
    for i in range(b):
        bt[i, : pages_per[i]] = perm[k: k + pages_per[i]]
        k += int(pages_per[i])
    qo = torch.zeros(b + 1, dtype=torch.int32)
    qo[1:] = t.cumsum(0)
    q = torch.randn(int(qo[-1]), hq, d, generator=g).to(dtype)
    kc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_pages, ps, hkv, d, generator=g).to(dtype)
    return q, kc, vc, bt, seq_lens, qo


def test_wrappers_match_reference():
    q, kc, vc, bt, sl, qo = _attn_case()
    out, lse = ops.tree_attention(q, kc, vc, bt, sl, qo, return_lse=True)
    ref, ref_lse = reference.tree_attention(q, kc, vc, bt, sl, qo, None, q.shape[-1] ** -0.5, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    logits = torch.randn(4, 50)
    toks = ops.sample(logits, temperature=torch.tensor([0.0, 1.0, 0.5, 1.0]), top_k=5, seed=3, offset=1)
    rt, _ = reference.sample(logits, torch.tensor([0.0, 1.0, 0.5, 1.0]), torch.full((4,), 5, dtype=torch.int32),
                             torch.ones(4), torch.full((4,), 3), torch.ones(4, dtype=torch.int64))
    assert torch.equal(toks, rt)
    assert int(toks[0]) == int(logits[0].argmax())


def test_rejection_sample_wrapper_and_single_node_equals_sample():
    logits = torch.randn(3, 40)
    ip = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    r = ops.rejection_sample(logits, torch.zeros(3, dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32), ip,
                             temperature=0.9, seed=torch.tensor([1, 2, 3]), offset=7)
    s = ops.sample(logits, temperature=0.9, seed=torch.tensor([1, 2, 3]), offset=7)
    assert torch.equal(r.tokens[:, 0], s) and torch.equal(r.num_accepted, torch.zeros(3, dtype=torch.int32))
    assert torch.equal(r.path[:, 0], torch.zeros(3, dtype=torch.int32))
    bad = logits.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"sequence\(s\) \[1\]"):
        ops.rejection_sample(bad, torch.zeros(3, dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32), ip)
    out = ops.rejection_sample(bad, torch.zeros(3, dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32), ip,
                               check=False)
    assert out.num_accepted.tolist() == [0, -1, 0] and out.tokens[1].tolist() == [-1]


@pytest.mark.parametrize("strict", [False, True])
def test_bad_indices_raise_and_write_nothing(strict, monkeypatch):
    monkeypatch.setattr(ops, "strict_checks", strict)
    expected = SpecrtInputError if strict else RuntimeError
    q, kc, vc, bt, sl, qo = _attn_case()
    out = torch.full_like(q, 7.0)
    bad_bt = bt.clone()
    bad_bt[0, 0] = kc.shape[0] + 5
    with pytest.raises(expected, match="page"):
        ops.tree_attention(q, kc, vc, bad_bt, sl, qo, out=out)
    assert bool((out == 7.0).all())
    # append_kv: a slot out of range
    k = torch.randn(2, kc.shape[2], kc.shape[3])
    before = kc.clone()
    with pytest.raises(expected):
        ops.append_kv(k, k, kc, vc, torch.tensor([0, kc.shape[0] * kc.shape[1]]))
    assert torch.equal(kc, before)
    # rejection_sample: parents that are not a tree, tokens out of range
    logits = torch.randn(3, 20)
    ip = torch.tensor([0, 3], dtype=torch.int32)
    res = ops.VerifyOutput(torch.full((1, 3), 9, dtype=torch.int32), torch.full((1, 3), 9, dtype=torch.int32),
                           torch.full((1,), 9, dtype=torch.int32))
    with pytest.raises(expected, match="tree|parent"):
        ops.rejection_sample(logits, torch.tensor([0, 1, 2], dtype=torch.int32),
                             torch.tensor([-1, 0, 2], dtype=torch.int32), ip, out=res)
    with pytest.raises(expected):
        ops.rejection_sample(logits, torch.tensor([0, 1, 20], dtype=torch.int32),
                             torch.tensor([-1, 0, 1], dtype=torch.int32), ip, out=res)
    assert res.tokens.eq(9).all() and res.num_accepted.eq(9).all()
    # kv_rollback: a path that is not increasing
    kv = torch.randn(2, 2, 4, 4, 1, 8)
    snap = kv.clone()
    lens = torch.tensor([2], dtype=torch.int32)
    with pytest.raises(expected):
        ops.kv_rollback(kv, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), lens,
                        torch.tensor([[0, 3, 2]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32))
    assert torch.equal(kv, snap) and lens.item() == 2


def test_shape_and_dtype_errors_are_input_errors():
    q, kc, vc, bt, sl, qo = _attn_case()
    with pytest.raises(SpecrtInputError, match="dtype"):
        ops.tree_attention(q.double(), kc, vc, bt, sl, qo)
    with pytest.raises(SpecrtInputError, match="multiple"):
        ops.tree_attention(q[:, :3], kc, vc, bt, sl, qo)
    with pytest.raises(SpecrtInputError, match="int32"):
        ops.tree_attention(q, kc, vc, bt.long(), sl, qo)
    with pytest.raises(SpecrtInputError, match="mask"):
        ops.tree_attention(q, kc, vc, bt, sl, qo, mask=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(SpecrtInputError, match="temperature"):
        ops.sample(torch.randn(2, 5), temperature=-1.0)
    with pytest.raises(SpecrtInputError, match="draft_probs"):
        ops.rejection_sample(torch.randn(2, 5), torch.zeros(2, dtype=torch.int32),
                             torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
                             draft_probs=torch.rand(2, 4))
    with pytest.raises(SpecrtInputError, match="max_t"):
        ops.rejection_sample(torch.randn(2, 5), torch.zeros(2, dtype=torch.int32),
                             torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32),
                             max_t=1)


def test_opcheck_through_the_registered_schema():
    q, kc, vc, bt, sl, qo = _attn_case(b=1)
    torch.library.opcheck(torch.ops.specrt.tree_attention.default,
                          (q, kc, vc, bt, sl, qo, None, torch.empty_like(q), None, 0.125))


def test_missing_extension_gives_one_clear_message(monkeypatch):
    import specrt._ext as ext

    monkeypatch.setattr(ext, "_ext", None)
    monkeypatch.setitem(sys.modules, "specrt._C", None)  # import of specrt._C fails
    monkeypatch.delattr(specrt, "_C", raising=False)
    with pytest.raises(specrt.ExtensionError, match="pip install --no-build-isolation"):
        ext.load_extension()


def test_stale_extension_detected(monkeypatch):
    import specrt._ext as ext
    from specrt import _C

    monkeypatch.setattr(ext, "_ext", None)
    monkeypatch.setattr(_C, "ABI_TAG", "not-the-schema-hash")
    with pytest.raises(specrt.ExtensionError, match="stale"):
        ext.load_extension()


def test_import_is_cheap_and_gpu_free():
    code = ("import sys, specrt; assert 'specrt._C' not in sys.modules; "
            "assert 'specrt.models.loader' not in sys.modules; print('ok')")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_draft_probs_with_greedy_branching_trees(monkeypatch):
    """A mixed batch (engine: greedy trees beside sampled chains with draft probabilities)
    passes the op and the wrapper's strict value checks; a sampled branching tree with
    probabilities is refused by both."""
    logits = torch.randn(7, 11)
    tokens = torch.randint(0, 11, (7,), dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 1, -1, 0, 1], dtype=torch.int32)  # tree (greedy), chain
    indptr = torch.tensor([0, 4, 7], dtype=torch.int32)
    q = torch.softmax(torch.randn(7, 11), -1)
    for strict in (False, True):
        monkeypatch.setattr(ops, "strict_checks", strict)
        out = ops.rejection_sample(logits, tokens, parents, indptr, draft_probs=q,
                                   temperature=torch.tensor([0.0, 0.8]), seed=1)
        assert int(out.num_accepted[0]) >= 0 and int(out.num_accepted[1]) >= 0
        with pytest.raises(SpecrtInputError if strict else RuntimeError, match="chains"):
            ops.rejection_sample(logits, tokens, parents, indptr, draft_probs=q,
                                 temperature=torch.tensor([0.7, 0.8]), seed=1)


def test_unvalidated_hot_path_equals_validated():
    """validate=False (the engine's hot path) calls the same ops: identical results."""
    q, kc, vc, bt, sl, qo = _attn_case()
    a = ops.tree_attention(q, kc, vc, bt, sl, qo, return_lse=True)
    b = ops.tree_attention(q, kc, vc, bt, sl, qo, return_lse=True, validate=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    logits = torch.randn(6, 13)
    tokens = torch.randint(0, 13, (6,), dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 1, -1, 0], dtype=torch.int32)
    indptr = torch.tensor([0, 4, 6], dtype=torch.int32)
    prm = dict(temperature=torch.tensor([0.0, 0.9]), top_k=torch.tensor([0, 3], dtype=torch.int32),
               top_p=torch.tensor([1.0, 0.8]), seed=torch.tensor([3, 4]),
               offset=torch.tensor([0, 9]))
    x = ops.rejection_sample(logits, tokens, parents, indptr, max_t=4, **prm)
    y = ops.rejection_sample(logits, tokens, parents, indptr, max_t=4, validate=False, **prm)
    for f in ("tokens", "path", "num_accepted"):
        assert torch.equal(getattr(x, f), getattr(y, f))


def test_untrusted_metadata_is_still_validated():
    """The model skips the ops' checks only for metadata specrt built itself."""
    from specrt.batch import AttentionMetadata
    q, kc, vc, bt, sl, qo = _attn_case()
    bad = AttentionMetadata(qo_indptr=qo, seq_lens=sl, block_table=bt.long(),
                            slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64))
    assert not bad.trusted
    with pytest.raises(SpecrtInputError):
        ops.tree_attention(q, kc, vc, bad.block_table, sl, qo, validate=not bad.trusted)
