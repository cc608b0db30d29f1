"""CUDA ``append_kv`` / ``kv_rollback`` against the CPU op and ``specrt.reference``, bit-exact
over the whole cache, plus CUDA-graph capture/replay. Needs a GPU and a CUDA build; skipped
otherwise. Case builders come from ``test_cache_ops.py``.
"""
from __future__ import annotations

import random

import pytest
import torch

from specrt import reference as ref
from specrt._ext import has_cuda_kernels

from test_cache_ops import (APPEND_GRID, APPEND_WIDTHS, DTYPES, OPS, ROLLBACK_WIDTHS,
                            _bad_rollback, append_grid_case, assert_same_bits, bits,
                            make_append_case, make_rollback_case, random_parents,
                            rollback_big_offset_table_case, rollback_layout_case,
                            rollback_many_rounds_case, rollback_random_trees_case,
                            rollback_unit_split_case, walk_to_root)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _need_cuda_build():
    if not has_cuda_kernels():
        pytest.skip("specrt._C was built without the CUDA kernels")


def cuda_like(t: torch.Tensor) -> torch.Tensor:
    """Copy to the GPU keeping the exact strides (views of a padded / permuted base included)."""
    base = t._base if t._base is not None else t
    cb = base.cuda()
    assert cb.stride() == base.stride()
    return cb.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def run_rollback_three(case):
    """(cuda op, cpu op, reference) results for one case: (kv, lens) each, on the CPU."""
    kv, bt, lens, path, na = case
    kv_g, lens_g = cuda_like(kv.clone()), lens.cuda()
    OPS.kv_rollback(kv_g, bt.cuda(), lens_g, path.cuda(), na.cuda())
    kv_c, lens_c = kv.clone(), lens.clone()
    OPS.kv_rollback(kv_c, bt, lens_c, path, na)
    kv_r, lens_r = kv.clone(), lens.clone()
    ref.kv_rollback(kv_r, bt, lens_r, path, na)
    torch.cuda.synchronize()
    return (kv_g.cpu(), lens_g.cpu()), (kv_c, lens_c), (kv_r, lens_r)


def check_rollback_three(case):
    (kv_g, lens_g), (kv_c, lens_c), (kv_r, lens_r) = run_rollback_three(case)
    assert torch.equal(lens_c, lens_r)
    assert torch.equal(lens_g, lens_r), (lens_g, lens_r)
    assert_same_bits(kv_c, kv_r, "cpu op vs reference")
    assert_same_bits(kv_g, kv_r, "cuda op vs reference")
    return kv_g, lens_g


# --------------------------------------------------------------------------------------------
# append_kv
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", APPEND_GRID["page_size"])
@pytest.mark.parametrize("num_tokens", APPEND_GRID["num_tokens"])
@pytest.mark.parametrize("layout", APPEND_GRID["layout"])
def test_append_kv_cuda(dtype, page_size, num_tokens, layout):
    kv, layer, k, v, slots = append_grid_case(dtype, page_size, num_tokens, layout)
    kv_g = cuda_like(kv.clone())
    OPS.append_kv(cuda_like(k), cuda_like(v), kv_g[layer, 0], kv_g[layer, 1], slots.cuda())
    kv_c = kv.clone()
    OPS.append_kv(k, v, kv_c[layer, 0], kv_c[layer, 1], slots)
    kv_r = kv.clone()
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], slots)
    assert_same_bits(kv_c, kv_r, "cpu op")
    assert_same_bits(kv_g.cpu(), kv_r, "cuda op")


@pytest.mark.parametrize("head_dim,dtype", APPEND_WIDTHS)
def test_append_kv_cuda_sizes(head_dim, dtype):
    # Many tokens (grid-stride, several rows per block), odd head dims (narrow vectors).
    kv, layer, k, v, slots = make_append_case(head_dim, 700, 16, num_pages=64, num_kv_heads=4,
                                              head_dim=head_dim, dtype=dtype)
    kv_g = kv.cuda()
    OPS.append_kv(k.cuda(), v.cuda(), kv_g[layer, 0], kv_g[layer, 1], slots.cuda())
    kv_r = kv.clone()
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], slots)
    assert_same_bits(kv_g.cpu(), kv_r)


def test_append_kv_cuda_skips_out_of_range_slots():
    # The kernel cannot raise: an out-of-range slot skips its row like -1 does.
    kv, layer, k, v, slots = make_append_case(5, 9, 4, num_pages=5, pad_frac=0.0)
    bad = slots.clone()
    bad[2], bad[7] = 5 * 4, -7
    kv_g = kv.cuda()
    OPS.append_kv(k.cuda(), v.cuda(), kv_g[layer, 0], kv_g[layer, 1], bad.cuda())
    skipped = slots.clone()
    skipped[2], skipped[7] = -1, -1
    kv_r = kv.clone()
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], skipped)
    assert_same_bits(kv_g.cpu(), kv_r)


def test_append_kv_cuda_opcheck():
    kv, layer, k, v, slots = make_append_case(7, 6, 4, dtype=torch.float16)
    kv_g = kv.cuda()
    torch.library.opcheck(OPS.append_kv.default,
                          (k.cuda(), v.cuda(), kv_g[layer, 0], kv_g[layer, 1], slots.cuda()))


# --------------------------------------------------------------------------------------------
# kv_rollback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_rollback_cuda_random_trees(dtype, page_size, batch):
    check_rollback_three(rollback_random_trees_case(dtype, page_size, batch))


@pytest.mark.parametrize("layout", ["padded", "page_major"])
@pytest.mark.parametrize("head_dim,dtype", ROLLBACK_WIDTHS)
def test_rollback_cuda_layouts_and_widths(layout, head_dim, dtype):
    check_rollback_three(rollback_layout_case(layout, head_dim, dtype))


def test_rollback_cuda_many_rounds():
    check_rollback_three(rollback_many_rounds_case(num_layers=8))


@pytest.mark.parametrize("num_layers,num_kv_heads", [(1, 1), (1, 3), (2, 2), (32, 8)])
def test_rollback_cuda_unit_splits(num_layers, num_kv_heads):
    # Cluster sizes 2 .. 8 and uneven unit shares per block.
    check_rollback_three(rollback_unit_split_case(num_layers, num_kv_heads))


def test_rollback_cuda_chain_and_rejected_move_nothing():
    case = make_rollback_case(23, 6, 16, [1, 5, 64, 9, 2, 17], kind="chain", num_layers=4)
    kv, _, lens, _, na = case
    kv_g, lens_g = check_rollback_three(case)
    assert_same_bits(kv_g, kv)
    assert torch.equal(lens_g, lens + na + 1)
    case = make_rollback_case(29, 4, 16, [7, 7, 1, 64], kind="rejected")
    kv_g, lens_g = check_rollback_three(case)
    assert_same_bits(kv_g, case[0])
    assert torch.equal(lens_g, case[2])


def test_rollback_cuda_length_race_stress():
    # Every block of a moving sequence reads committed_lens while rank 0 updates it: a missing
    # ordering would show up as blocks using the new length. Big batch, many blocks, repeated.
    for rep in range(10):
        case = make_rollback_case(1000 + rep, 64, 16, [33] * 64, kind="tree", num_layers=16,
                                  num_kv_heads=8, head_dim=64, dtype=torch.float16,
                                  commit_max=40)
        check_rollback_three(case)


def test_rollback_cuda_skips_invalid_sequences():
    # Sequence 2 is invalid: the kernel must leave it (data and length) alone and still move
    # sequences 0 and 1 -- the same as the reference with sequence 2 marked rejected.
    for which in ["na_high", "na_low", "root", "not_increasing", "repeat", "past_max_t",
                  "negative_len", "past_capacity", "page_oob", "page_neg"]:
        kv, bt, lens, path, na = _bad_rollback(which)
        kv_g, lens_g = cuda_like(kv.clone()), lens.cuda()
        OPS.kv_rollback(kv_g, bt.cuda(), lens_g, path.cuda(), na.cuda())
        na_r = na.clone()
        na_r[2] = -1
        kv_r, lens_r = kv.clone(), lens.clone()
        ref.kv_rollback(kv_r, bt, lens_r, path, na_r)
        assert torch.equal(lens_g.cpu(), lens_r), which
        assert_same_bits(kv_g.cpu(), kv_r, which)


def test_rollback_cuda_opcheck():
    kv, bt, lens, path, na = make_rollback_case(43, 3, 4, [7, 12, 3], kind="tree",
                                                dtype=torch.bfloat16, spare_pages=8)
    torch.library.opcheck(OPS.kv_rollback.default,
                          (kv.cuda(), bt.cuda(), lens.cuda(), path.cuda(), na.cuda()))


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------


def test_graph_replay_equals_eager():
    """Capture append_kv + kv_rollback once on static buffers; replaying with new contents
    gives the same cache and lengths as eager calls."""
    page_size, batch, t = 16, 5, 7
    kv, bt, lens, path, na = make_rollback_case(61, batch, page_size, [t] * batch, kind="tree",
                                                num_layers=2, dtype=torch.float16,
                                                spare_pages=4)
    n_tok, hkv, d = batch * t, kv.shape[4], kv.shape[5]
    s_kv, s_bt, s_lens = kv.cuda(), bt.cuda(), lens.cuda()
    s_path, s_na = path.cuda(), na.cuda()
    s_k = torch.zeros(n_tok, hkv, d, dtype=kv.dtype, device="cuda")
    s_v = torch.zeros_like(s_k)
    s_slots = torch.full((n_tok,), -1, dtype=torch.int64, device="cuda")

    def step(kv_, k_, v_, slots_, bt_, lens_, path_, na_):
        for layer in range(kv_.shape[0]):
            OPS.append_kv(k_, v_, kv_[layer, 0], kv_[layer, 1], slots_)
        OPS.kv_rollback(kv_, bt_, lens_, path_, na_)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        step(s_kv.clone(), s_k, s_v, s_slots, s_bt, s_lens.clone(), s_path, s_na)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(s_kv, s_k, s_v, s_slots, s_bt, s_lens, s_path, s_na)

    rng = random.Random(7)
    for it in range(3):
        # New step: fresh K/V for the tree positions of each sequence, new accepted paths.
        k = torch.randn(n_tok, hkv, d).to(kv.dtype)
        v = torch.randn(n_tok, hkv, d).to(kv.dtype)
        slots = torch.empty(n_tok, dtype=torch.int64)
        new_path = torch.full_like(path, -1)
        new_na = torch.empty_like(na)
        for b in range(batch):
            for i in range(t):
                pos = int(lens[b]) + i
                slots[b * t + i] = int(bt[b, pos // page_size]) * page_size + pos % page_size
            p = walk_to_root(random_parents(rng, t), rng.randrange(t))
            new_path[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
            new_na[b] = len(p) - 1 if (it, b) != (1, 2) else -1
        base_kv = torch.randn(kv.shape).to(kv.dtype)
        eager_kv, eager_lens = base_kv.cuda(), lens.cuda()
        step(eager_kv, k.cuda(), v.cuda(), slots.cuda(), s_bt, eager_lens, new_path.cuda(),
             new_na.cuda())
        s_kv.copy_(base_kv)
        s_lens.copy_(lens)
        s_k.copy_(k)
        s_v.copy_(v)
        s_slots.copy_(slots)
        s_path.copy_(new_path)
        s_na.copy_(new_na)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s_lens.cpu(), eager_lens.cpu())
        assert_same_bits(s_kv.cpu(), eager_kv.cpu(), f"replay {it}")
        # And both equal the reference.
        ref_kv, ref_lens = base_kv.clone(), lens.clone()
        for layer in range(kv.shape[0]):
            ref.append_kv(k, v, ref_kv[layer, 0], ref_kv[layer, 1], slots)
        ref.kv_rollback(ref_kv, bt, ref_lens, new_path, new_na)
        assert torch.equal(ref_lens, eager_lens.cpu())
        assert_same_bits(ref_kv, eager_kv.cpu(), f"reference {it}")
        assert not torch.equal(bits(ref_kv), bits(base_kv))


def test_rollback_cuda_offset_table_above_48k_shared_memory():
    check_rollback_three(rollback_big_offset_table_case())
