"""append_kv and kv_rollback CUDA kernels (csrc/kernels/append_kv.cuh, kv_rollback.cuh) run by
the SIMT emulation: the cases of test_cache_ops_gpu.py at emulation-sized shapes, bit-exact
against specrt.reference and the CPU op over the whole cache, under two schedules (and the
seeded random one for the rollback's cluster exchange). Rollback cluster widths 1..8 are reached
through the batch, the unit count and the SM count the emulation reports; overlapping moves,
invalid sequences, and a max_T whose offset table needs more than 48 KB of shared memory.
"""
from __future__ import annotations


import pytest
import torch

import simt_backend as sb
from specrt import reference as ref
from test_cache_ops import (APPEND_GRID, APPEND_WIDTHS, DTYPES, OPS, ROLLBACK_WIDTHS,
                            _bad_rollback, append_grid_case, assert_same_bits, make_append_case,
                            make_rollback_case, rollback_big_offset_table_case,
                            rollback_layout_case, rollback_many_rounds_case,
                            rollback_random_trees_case, rollback_unit_split_case)

pytestmark = pytest.mark.emulated


def strided_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy with exactly the same strides (views of a padded / permuted base included)."""
    base = t._base if t._base is not None else t
    cb = base.clone()
    return cb.as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())


def emu_rollback(case, schedule, num_sms=132):
    kv, bt, lens, path, na = case
    kv_e, lens_e = strided_clone(kv), lens.clone()
    with sb.configured(schedule=schedule, num_sms=num_sms, seed=11):
        sb.kv_rollback(kv_e, bt, lens_e, path, na)
    return kv_e, lens_e, sb.last_launch()


def check_rollback(case, *, schedules=("in_order", "reversed"), num_sms=132, na_ref=None):
    kv, bt, lens, path, na = case
    kv_r, lens_r = kv.clone(), lens.clone()
    ref.kv_rollback(kv_r, bt, lens_r, path, na if na_ref is None else na_ref)
    if na_ref is None:
        kv_c, lens_c = kv.clone(), lens.clone()
        OPS.kv_rollback(kv_c, bt, lens_c, path, na)
        assert torch.equal(lens_c, lens_r)
        assert_same_bits(kv_c, kv_r, "cpu op vs reference")
    launch = None
    for s in schedules:
        kv_e, lens_e, launch = emu_rollback(case, s, num_sms)
        assert torch.equal(lens_e, lens_r), (s, lens_e, lens_r)
        assert_same_bits(kv_e, kv_r, f"emulated kernel ({s}) vs reference")
    return kv_e, lens_e, launch


# ---- append_kv ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", APPEND_GRID["page_size"])
@pytest.mark.parametrize("num_tokens", APPEND_GRID["num_tokens"])
@pytest.mark.parametrize("layout", APPEND_GRID["layout"])
def test_append_kv(dtype, page_size, num_tokens, layout):
    kv, layer, k, v, slots = append_grid_case(dtype, page_size, num_tokens, layout)
    kv_r = kv.clone()
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], slots)
    for s in ("in_order", "reversed"):
        kv_e = strided_clone(kv)
        with sb.configured(schedule=s):
            sb.append_kv(k, v, kv_e[layer, 0], kv_e[layer, 1], slots)
        assert_same_bits(kv_e, kv_r, f"emulated append_kv ({s})")


@pytest.mark.parametrize("head_dim,dtype", APPEND_WIDTHS)
def test_append_kv_sizes(head_dim, dtype):
    """Many tokens (several rows per block, every vector width 16/8/4/2/1 bytes)."""
    kv, layer, k, v, slots = make_append_case(head_dim, 300, 16, num_pages=32, num_kv_heads=4,
                                              head_dim=head_dim, dtype=dtype)
    kv_e, kv_r = kv.clone(), kv.clone()
    sb.append_kv(k, v, kv_e[layer, 0], kv_e[layer, 1], slots)
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], slots)
    assert_same_bits(kv_e, kv_r)


def test_append_kv_skips_out_of_range_slots():
    kv, layer, k, v, slots = make_append_case(5, 9, 4, num_pages=5, pad_frac=0.0)
    bad = slots.clone()
    bad[2], bad[7] = 5 * 4, -7
    kv_e = kv.clone()
    sb.append_kv(k, v, kv_e[layer, 0], kv_e[layer, 1], bad)
    skipped = slots.clone()
    skipped[2], skipped[7] = -1, -1
    kv_r = kv.clone()
    ref.append_kv(k, v, kv_r[layer, 0], kv_r[layer, 1], skipped)
    assert_same_bits(kv_e, kv_r)


# ---- kv_rollback ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_rollback_random_trees(dtype, page_size, batch):
    check_rollback(rollback_random_trees_case(dtype, page_size, batch))


@pytest.mark.parametrize("layout", ["padded", "page_major"])
@pytest.mark.parametrize("head_dim,dtype", ROLLBACK_WIDTHS)
def test_rollback_layouts_and_widths(layout, head_dim, dtype):
    check_rollback(rollback_layout_case(layout, head_dim, dtype))


def test_rollback_many_rounds_overlapping():
    check_rollback(rollback_many_rounds_case(num_layers=4),
                   schedules=("in_order", "reversed", "random"))


@pytest.mark.parametrize("num_layers,num_kv_heads,num_sms,cluster",
                         [(1, 1, 132, 2), (1, 3, 132, 6), (2, 2, 132, 8), (8, 8, 132, 8),
                          (2, 2, 2, 1), (2, 2, 4, 2), (2, 2, 8, 4)])
def test_rollback_cluster_widths(num_layers, num_kv_heads, num_sms, cluster):
    """Cluster sizes 1..8 with uneven unit shares per block; cluster.sync orders every
    block's read of the committed length before rank 0 updates it."""
    case = rollback_unit_split_case(num_layers, num_kv_heads)
    _, _, launch = check_rollback(case, schedules=("in_order", "reversed", "random"),
                                  num_sms=num_sms)
    assert launch["cluster"][0] == cluster


def test_rollback_chain_and_rejected_move_nothing():
    case = make_rollback_case(23, 6, 16, [1, 5, 64, 9, 2, 17], kind="chain", num_layers=4)
    kv, _, lens, _, na = case
    kv_e, lens_e, _ = check_rollback(case)
    assert_same_bits(kv_e, kv)
    assert torch.equal(lens_e, lens + na + 1)
    case = make_rollback_case(29, 4, 16, [7, 7, 1, 64], kind="rejected")
    kv_e, lens_e, _ = check_rollback(case)
    assert_same_bits(kv_e, case[0])
    assert torch.equal(lens_e, case[2])


def test_rollback_skips_invalid_sequences():
    for which in ["na_high", "na_low", "root", "not_increasing", "repeat", "past_max_t",
                  "negative_len", "past_capacity", "page_oob", "page_neg"]:
        kv, bt, lens, path, na = _bad_rollback(which)
        na_r = na.clone()
        na_r[2] = -1
        check_rollback((kv, bt, lens, path, na), na_ref=na_r)


def test_rollback_offset_table_above_48k_shared_memory():
    """max_T = 4000: the (src, dst) offset table takes 64 KB of dynamic shared memory."""
    _, _, launch = check_rollback(rollback_big_offset_table_case(), schedules=("in_order",))
    assert launch["smem"] > 48 * 1024
