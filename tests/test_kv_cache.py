"""specrt.kv_cache: page pool, block tables, slot mappings, build_metadata."""
import math
import random

import pytest
import torch

from specrt import reference
from specrt.batch import AttentionMetadata
from specrt.kv_cache import OutOfPagesError, PagedKVCache, build_metadata
from specrt.tree import DraftTree, batch_trees, unpack_mask


def make_cache(page_size=4, num_pages=16, layers=2, heads=2, dim=8, dtype=torch.float32):
    return PagedKVCache(layers, heads, dim, page_size, num_pages, dtype, "cpu")


def snapshot(cache):
    return (cache.num_free_pages, list(cache._free),
            {s: (cache.pages(s), cache.committed_len(s)) for s in cache.seq_ids()})


def slot_of(cache, seq_id, p):
    ps = cache.page_size
    return cache.pages(seq_id)[p // ps] * ps + p % ps


# ---- construction -----------------------------------------------------------------------------


def test_construction_and_sizes():
    c = PagedKVCache(3, 2, 16, 8, 5, torch.float16, "cpu")
    assert c.kv.shape == (3, 2, 5, 8, 2, 16) and c.kv.dtype == torch.float16
    assert c.num_pages == 5 and c.num_free_pages == 5
    assert c.bytes_per_page == 3 * 2 * 8 * 2 * 16 * 2
    assert c.pages_needed(0) == 0 and c.pages_needed(1) == 1
    assert c.pages_needed(8) == 1 and c.pages_needed(9) == 2
    k, v = c.layer(1)
    assert k.shape == (5, 8, 2, 16) and k.data_ptr() == c.kv[1, 0].data_ptr()
    assert v.data_ptr() == c.kv[1, 1].data_ptr()
    with pytest.raises(ValueError):
        c.pages_needed(-1)


@pytest.mark.parametrize("ps", [0, 3, 6, 256, -4, 2.0])
def test_bad_page_size(ps):
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(1, 1, 8, ps, 4, torch.float32, "cpu")


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="num_pages"):
        PagedKVCache(1, 1, 8, 4, 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="num_layers"):
        PagedKVCache(0, 1, 8, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(1, 1, 8, 4, 4, torch.int32, "cpu")


@pytest.mark.parametrize("ps", [1, 128])
def test_page_size_bounds_ok(ps):
    assert PagedKVCache(1, 1, 4, ps, 2, torch.float32, "cpu").page_size == ps


def test_from_budget_cpu():
    per_page = 2 * 2 * 16 * 4 * 64 * 2
    c = PagedKVCache.from_budget(2, 4, 64, 16, torch.float16, "cpu",
                                 memory_bytes=10 * per_page + per_page // 2)
    assert c.num_pages == 10 and c.bytes_per_page == per_page
    with pytest.raises(ValueError, match="CUDA"):
        PagedKVCache.from_budget(2, 4, 64, 16, torch.float16, "cpu", memory_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.from_budget(2, 4, 64, 16, torch.float16, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        PagedKVCache.from_budget(2, 4, 64, 16, torch.float16, "cpu", memory_bytes=1 << 20,
                                 memory_fraction=0.5)
    with pytest.raises(ValueError, match="no page"):
        PagedKVCache.from_budget(2, 4, 64, 16, torch.float16, "cpu", memory_bytes=per_page - 1)


# ---- allocation -------------------------------------------------------------------------------


def test_allocate_free_reuse():
    c = make_cache(page_size=4, num_pages=8)
    c.add_sequence("a")
    c.add_sequence(7)
    assert c.has("a") and 7 in c and not c.has("b") and len(c) == 2
    assert c.committed_len("a") == 0 and c.pages("a") == [] and c.capacity("a") == 0
    c.reserve("a", 5)
    c.reserve(7, 12)
    assert len(c.pages("a")) == 2 and len(c.pages(7)) == 3
    assert c.capacity("a") == 8 and c.num_free_pages == 3
    assert not set(c.pages("a")) & set(c.pages(7))
    c.reserve("a", 3)  # never shrinks
    assert len(c.pages("a")) == 2
    c.reserve("a", 8)  # still fits
    assert c.num_free_pages == 3
    freed = set(c.pages("a"))
    assert c.free("a") == 2
    assert not c.has("a") and c.num_free_pages == 5
    c.add_sequence("b")
    c.reserve("b", 8)
    assert set(c.pages("b")) == freed  # freed pages come back first
    c.add_sequence("a")  # an id can be reused after free
    assert c.pages("a") == [] and c.committed_len("a") == 0
    with pytest.raises(ValueError, match="already exists"):
        c.add_sequence("b")


def test_pages_never_shared_random_workload():
    rng = random.Random(0)
    c = make_cache(page_size=2, num_pages=40)
    live = {}
    for step in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            sid = step
            c.add_sequence(sid)
            live[sid] = 0
        elif op < 0.8:
            sid = rng.choice(list(live))
            want = live[sid] + rng.randrange(0, 9)
            try:
                c.reserve(sid, want)
                live[sid] = want
                c.commit(sid, rng.randrange(0, want + 1))
                c.trim(sid)
                live[sid] = c.committed_len(sid)
            except OutOfPagesError:
                pass
        else:
            sid = rng.choice(list(live))
            c.free(sid)
            del live[sid]
        owned = [p for s in live for p in c.pages(s)]
        assert len(owned) == len(set(owned))
        assert len(owned) + c.num_free_pages == c.num_pages
        assert set(owned).isdisjoint(c._free)


def test_out_of_pages_all_or_nothing():
    c = make_cache(page_size=4, num_pages=6)
    for s in "abc":
        c.add_sequence(s)
    c.reserve("a", 8)  # 2 pages
    before = snapshot(c)
    with pytest.raises(OutOfPagesError) as e:
        c.reserve("b", 4 * 5)  # 5 pages, 4 free
    msg = str(e.value)
    assert "5" in msg and "4" in msg and "6" in msg and "nothing" in msg
    assert snapshot(c) == before
    with pytest.raises(OutOfPagesError):
        # b alone would fit (2), c alone would fit (3), together they do not.
        c.reserve_batch({"b": 8, "c": 12})
    assert snapshot(c) == before
    with pytest.raises(KeyError, match="unknown sequence"):
        c.reserve_batch({"b": 4, "zzz": 4})
    assert snapshot(c) == before
    with pytest.raises(ValueError):
        c.reserve_batch({"b": 4, "c": -1})
    assert snapshot(c) == before
    c.reserve_batch({"b": 8, "c": 8})
    assert c.num_free_pages == 0
    assert isinstance(OutOfPagesError("x"), RuntimeError)


def test_unknown_and_bad_arguments():
    c = make_cache()
    c.add_sequence(0)
    for fn in (c.committed_len, c.trim, c.free, c.pages, c.capacity):
        with pytest.raises(KeyError, match="unknown sequence"):
            fn(1)
    with pytest.raises(KeyError):
        c.reserve(1, 4)
    with pytest.raises(KeyError):
        c.block_table([0, 1])
    with pytest.raises(KeyError):
        c.slot_mapping(1, 0, 1)
    with pytest.raises(KeyError):
        c.committed_len([1])  # unhashable
    with pytest.raises(ValueError):
        c.reserve(0, -1)
    c.reserve(0, 6)  # 2 pages of 4
    with pytest.raises(ValueError, match="only 8 are reserved"):
        c.commit(0, 9)
    with pytest.raises(ValueError):
        c.commit(0, -1)
    c.commit(0, 8)
    assert c.committed_len(0) == 8
    with pytest.raises(ValueError, match="not reserved"):
        c.slot_mapping(0, 6, 3)
    with pytest.raises(ValueError):
        c.slot_mapping(0, -1, 2)


# ---- slot mapping and block table ---------------------------------------------------------------


@pytest.mark.parametrize("ps", [1, 4, 16])
def test_slot_mapping_vs_brute_force(ps):
    rng = random.Random(ps)
    c = make_cache(page_size=ps, num_pages=200)
    # Interleave allocations so page lists are not contiguous.
    for s in range(3):
        c.add_sequence(s)
    for step in range(1, 6):
        for s in range(3):
            c.reserve(s, step * (7 + s * 5))
    for s in range(3):
        cap = c.capacity(s)
        assert cap == c.pages_needed(5 * (7 + s * 5)) * ps
        for _ in range(20):
            start = rng.randrange(0, cap)
            n = rng.randrange(0, cap - start + 1)
            got = c.slot_mapping(s, start, n)
            assert got.dtype == torch.int64 and got.shape == (n,)
            assert got.tolist() == [slot_of(c, s, p) for p in range(start, start + n)]
    assert c.slot_mapping(0, 3, 0).tolist() == []


def test_block_table_padding_and_width():
    c = make_cache(page_size=4, num_pages=10)
    for s in range(4):
        c.add_sequence(s)
    c.reserve(0, 9)   # 3 pages
    c.reserve(2, 1)   # 1 page
    c.reserve(3, 16)  # 4 pages
    bt = c.block_table([0, 1, 2, 3])
    assert bt.dtype == torch.int32 and bt.shape == (4, 4)
    assert bt[0].tolist() == c.pages(0) + [-1]
    assert bt[1].tolist() == [-1] * 4
    assert bt[2].tolist() == c.pages(2) + [-1] * 3
    assert bt[3].tolist() == c.pages(3)
    assert c.block_table([3, 0])[0].tolist() == c.pages(3)  # row order follows seq_ids
    wide = c.block_table([2, 0], width=8)
    assert wide.shape == (2, 8) and wide[1].tolist() == c.pages(0) + [-1] * 5
    with pytest.raises(ValueError, match="width"):
        c.block_table([3], width=3)
    assert c.block_table([1]).shape == (1, 1)  # never zero-width
    for s in range(4):
        c.commit(s, 0)
    assert c.committed_lens([3, 0]).tolist() == [0, 0]
    c.commit(3, 13)
    lens = c.committed_lens([0, 3])
    assert lens.dtype == torch.int32 and lens.tolist() == [0, 13]


@pytest.mark.parametrize("ps", [1, 16])
def test_trim_after_commit(ps):
    c = make_cache(page_size=ps, num_pages=64)
    c.add_sequence("s")
    c.reserve("s", 40)
    pages = c.pages("s")
    free_before = c.num_free_pages
    c.commit("s", 17)
    keep = math.ceil(17 / ps)
    assert c.trim("s") == len(pages) - keep
    assert c.pages("s") == pages[:keep]
    assert c.num_free_pages == free_before + len(pages) - keep
    assert set(pages[keep:]) <= set(c._free)
    assert c.trim("s") == 0  # idempotent
    c.commit("s", 0)
    assert c.trim("s") == keep and c.pages("s") == []
    assert c.num_free_pages == c.num_pages


# ---- build_metadata -----------------------------------------------------------------------------


def check_metadata(c, seq_ids, committed, counts, md, device="cpu"):
    b = len(seq_ids)
    ps = c.page_size
    assert isinstance(md, AttentionMetadata)
    assert md.qo_indptr.dtype == torch.int32 and md.seq_lens.dtype == torch.int32
    assert md.block_table.dtype == torch.int32 and md.slot_mapping.dtype == torch.int64
    assert md.qo_indptr.tolist() == [sum(counts[:i]) for i in range(b + 1)]
    assert md.seq_lens.tolist() == [committed[i] + counts[i] for i in range(b)]
    assert md.num_seqs == b
    bt = md.block_table.cpu()
    slots = md.slot_mapping.cpu().tolist()
    for i, s in enumerate(seq_ids):
        assert c.capacity(s) >= committed[i] + counts[i]
        assert c.committed_len(s) == committed[i]  # reserving does not commit
        row = bt[i].tolist()
        npages = len(c.pages(s))
        assert row[:npages] == c.pages(s) and all(v == -1 for v in row[npages:])
        for j in range(counts[i]):
            p = committed[i] + j
            assert slots[sum(counts[:i]) + j] == row[p // ps] * ps + p % ps


@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("b", [1, 3, 17])
def test_build_metadata_counts(ps, b):
    rng = random.Random(ps * 100 + b)
    c = make_cache(page_size=ps, num_pages=4000 // ps + 64)
    seq_ids = [f"r{i}" for i in range(b)]
    for s in seq_ids:
        c.add_sequence(s)
    counts = [rng.randrange(0, 40) for _ in range(b)]
    md = build_metadata(c, seq_ids, counts)
    assert md.mask is None
    check_metadata(c, seq_ids, [0] * b, counts, md)
    for s, t in zip(seq_ids, counts):
        c.commit(s, t)
    committed = counts
    counts = [1] * b
    md = build_metadata(c, seq_ids, counts, block_table_width=4000 // ps)
    assert md.block_table.shape == (b, 4000 // ps)
    check_metadata(c, seq_ids, committed, counts, md)


@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("b", [1, 3, 17])
def test_build_metadata_trees(ps, b):
    rng = random.Random(ps * 7 + b)
    c = make_cache(page_size=ps, num_pages=20000 // ps)
    seq_ids = list(range(b))
    committed = []
    for s in seq_ids:
        c.add_sequence(s)
        n = rng.randrange(0, 300)
        c.reserve(s, n)
        c.commit(s, n)
        committed.append(n)
    trees = []
    for i in range(b):
        t = rng.choice([1, 2, 7, 64])
        parents = [-1] + [rng.randrange(j) for j in range(1, t)]
        trees.append(DraftTree([rng.randrange(100) for _ in range(t)], parents))
    tb = batch_trees(trees, committed)
    md = build_metadata(c, seq_ids, tb)
    counts = [t.num_nodes for t in trees]
    check_metadata(c, seq_ids, committed, counts, md)
    if tb.mask is None:
        assert md.mask is None
    else:
        assert torch.equal(md.mask, tb.mask)
    # A stale TreeBatch (built for other committed lengths) is refused.
    stale = batch_trees(trees, [x + 1 for x in committed])
    with pytest.raises(ValueError, match="committed lengths"):
        build_metadata(c, seq_ids, stale)


def test_build_metadata_out_of_pages_changes_nothing():
    c = make_cache(page_size=4, num_pages=5)
    for s in range(3):
        c.add_sequence(s)
    c.reserve(0, 4)
    c.commit(0, 4)
    before = snapshot(c)
    with pytest.raises(OutOfPagesError):
        build_metadata(c, [0, 1, 2], [4, 8, 8])  # needs 1 + 2 + 2 > 4 free
    assert snapshot(c) == before
    with pytest.raises(ValueError, match="duplicate"):
        build_metadata(c, [0, 0], [1, 1])
    with pytest.raises(ValueError, match="counts"):
        build_metadata(c, [0, 1], [1])
    with pytest.raises(ValueError, match=">= 0"):
        build_metadata(c, [0], [-1])
    with pytest.raises(KeyError):
        build_metadata(c, [0, 9], [1, 1])
    assert snapshot(c) == before


def test_metadata_drives_reference_attention():
    """End to end on the oracle: K/V written through the slot mapping and read back through
    the block table give the same attention as a dense computation with the tree mask."""
    torch.manual_seed(0)
    ps, hkv, hq, d = 4, 2, 4, 8
    c = PagedKVCache(1, hkv, d, ps, 64, torch.float32, "cpu")
    c.kv.normal_()  # garbage in unused slots must never be read
    trees = [DraftTree([1, 2, 3, 4, 5], [-1, 0, 0, 1, 1]), DraftTree.chain(1, [2, 3]),
             DraftTree.single(7)]
    committed = [5, 0, 9]
    seqs = {}
    for s, n in enumerate(committed):
        c.add_sequence(s)
        c.reserve(s, n)
        c.commit(s, n)
        seqs[s] = (torch.randn(n, hkv, d), torch.randn(n, hkv, d))
        flat_k = c.kv[0, 0].view(-1, hkv, d)
        flat_v = c.kv[0, 1].view(-1, hkv, d)
        sl = c.slot_mapping(s, 0, n)
        flat_k[sl], flat_v[sl] = seqs[s]
    tb = batch_trees(trees, committed)
    md = build_metadata(c, [0, 1, 2], tb)
    n = tb.total_nodes
    k_new, v_new = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    c.kv[0, 0].view(-1, hkv, d)[md.slot_mapping] = k_new
    c.kv[0, 1].view(-1, hkv, d)[md.slot_mapping] = v_new
    q = torch.randn(n, hq, d)
    out = reference.tree_attention(q, c.kv[0, 0], c.kv[0, 1], md.block_table, md.seq_lens,
                                   md.qo_indptr, md.mask, sm_scale=d ** -0.5)
    for b, tree in enumerate(trees):
        s0, s1 = tb.node_indptr[b].item(), tb.node_indptr[b + 1].item()
        t = s1 - s0
        keys = torch.cat([seqs[b][0], k_new[s0:s1]]).repeat_interleave(hq // hkv, 1)
        vals = torch.cat([seqs[b][1], v_new[s0:s1]]).repeat_interleave(hq // hkv, 1)
        vis = torch.ones(t, committed[b] + t, dtype=torch.bool)
        vis[:, committed[b]:] = unpack_mask(tree.packed_mask(), t)
        scores = torch.einsum("thd,lhd->htl", q[s0:s1], keys) * d ** -0.5
        probs = scores.masked_fill(~vis, float("-inf")).softmax(-1)
        expect = torch.einsum("htl,lhd->thd", probs, vals)
        torch.testing.assert_close(out[s0:s1], expect, rtol=1e-5, atol=1e-5)


def test_build_metadata_with_planner():
    """A planner gives the metadata the split-KV plan of exactly this forward, in buffers that
    are reused from step to step (one plan tensor per batch size, one reserved workspace)."""
    from specrt.attention_plan import AttentionPlanner, plan_tree_attention

    hq, hkv, d, ps = 8, 2, 16, 4
    cache = PagedKVCache(1, hkv, d, ps, 600, torch.float32, "cpu")
    planner = AttentionPlanner(hq, hkv, d, ps, "cpu", max_batch=3, max_t=8, num_sms=132)
    for s, n in ((0, 900), (1, 20), (2, 3)):
        cache.add_sequence(s)
        cache.reserve(s, n)
        cache.commit(s, n)
    seen = {}
    for step in range(3):
        trees = [DraftTree([1, 2, 3, 4], [-1, 0, 0, 1]), DraftTree.chain(5, [6] * step),
                 DraftTree.single(7)]
        committed = [cache.committed_len(s) for s in (0, 1, 2)]
        tb = batch_trees(trees, committed)
        md = build_metadata(cache, [0, 1, 2], tb, planner=planner)
        plan, ws = plan_tree_attention(md.qo_indptr, md.seq_lens, hq, hkv, d, ps, 132, "cpu")
        assert torch.equal(md.plan, plan)
        assert md.workspace.numel() >= ws.numel() and md.workspace.dtype == torch.float32
        assert int(md.plan[0]) > 3  # the 900-token sequence is split (chunk 128)
        if step:
            assert md.plan.data_ptr() == seen["plan"] and md.workspace.data_ptr() == seen["ws"]
        seen = {"plan": md.plan.data_ptr(), "ws": md.workspace.data_ptr()}
        for s in (0, 1, 2):
            cache.commit(s, cache.committed_len(s) + 1)
    assert planner.num_plans == 3
    cache.add_sequence(9)
    assert build_metadata(cache, [9], [5]).plan is None  # no planner, no plan


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_and_metadata():
    c = PagedKVCache.from_budget(2, 2, 64, 16, torch.float16, "cuda", memory_fraction=0.01)
    assert c.kv.is_cuda and c.num_pages >= 1
    c2 = PagedKVCache(2, 2, 64, 16, 32, torch.bfloat16, "cuda")
    for s in range(3):
        c2.add_sequence(s)
    trees = [DraftTree([1, 2, 3], [-1, 0, 0]), DraftTree.single(4), DraftTree.chain(1, [5])]
    tb = batch_trees(trees, [0, 0, 0], device="cuda")
    md = build_metadata(c2, [0, 1, 2], tb)
    for name in ("qo_indptr", "seq_lens", "block_table", "slot_mapping", "mask"):
        assert getattr(md, name).is_cuda, name
    check_metadata(c2, [0, 1, 2], [0, 0, 0], [3, 1, 2], md)
    assert c2.slot_mapping(0, 0, 3, device="cuda").is_cuda
    assert c2.block_table([0, 1], device="cuda").is_cuda
    assert c2.committed_lens([0, 1], device="cuda").is_cuda


@pytest.mark.parametrize("page_size", [1, 16])
def test_small_step_metadata_equals_vectorised(monkeypatch, page_size):
    """build_metadata's list-based path for small steps gives the same tensors as the numpy
    path (ragged counts incl. 0, fixed and default block-table widths, tree masks)."""
    from specrt import kv_cache as K
    rng = random.Random(page_size)
    for trial in range(20):
        c = PagedKVCache(1, 2, 8, page_size, 400, dtype=torch.float32)
        b = rng.randint(1, 5)
        for i in range(b):
            c.add_sequence(i)
            n = rng.randint(0, 60)
            c.reserve_batch({i: n})
            c.commit(i, n)
        counts = [rng.randint(0, 9) for _ in range(b)]
        width = None if trial % 2 else 128
        out = []
        for thr in (0, 10**6):
            monkeypatch.setattr(K, "_SMALL_STEP_TOKENS", thr)
            c2 = PagedKVCache(1, 2, 8, page_size, 400, dtype=torch.float32)
            for i in range(b):  # same state in a fresh cache: reserve allocates identically
                c2.add_sequence(i)
                c2.reserve_batch({i: c.committed_len(i)})
                c2.commit(i, c.committed_len(i))
            out.append(build_metadata(c2, list(range(b)), counts, "cpu",
                                      block_table_width=width))
        for f in ("qo_indptr", "seq_lens", "block_table", "slot_mapping"):
            x, y = getattr(out[0], f), getattr(out[1], f)
            assert x.dtype == y.dtype and torch.equal(x, y), (trial, f)
        assert out[0].trusted and out[1].trusted
