"""CPU ops ``append_kv`` / ``kv_rollback`` (docs/ops.md, ops 2 and 4) against
``specrt.reference``.

Every comparison is bit-exact over the *whole* cache (every layer, K and V, and the slots the
op must not touch), so there is no tolerance: both sides only move bytes. The case builders
here are reused by ``test_cache_ops_gpu.py``.
"""
from __future__ import annotations

import random

import pytest
import torch

from specrt import reference as ref
from specrt._ext import load_extension

load_extension()
OPS = torch.ops.specrt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a float tensor as integers of the same width (bit-exact comparisons)."""
    return t.view(_SAME_SIZE_INT[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    diff = (bits(a) != bits(b)).nonzero()
    assert diff.numel() == 0, \
        f"{what}: {diff.shape[0]} elements differ, first at {diff[0].tolist()}"


# --------------------------------------------------------------------------------------------
# case builders
# --------------------------------------------------------------------------------------------


def random_parents(rng: random.Random, t: int) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def walk_to_root(parents: list[int], node: int) -> list[int]:
    """Root-to-node path of a tree given by a parent array (strictly increasing indices)."""
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def alloc_cache(shape, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A random cache of logical shape ``shape`` (last two dims Hkv, D) in one of three layouts:
    contiguous; head-padded (row stride D + 8); or page-major (K and V interleaved per page,
    the ``2`` dim moved inwards) -- all with a unit last stride."""
    data = lambda s: torch.randn(s, generator=gen).to(dtype)  # noqa: E731
    if layout == "contiguous":
        return data(shape)
    if layout == "padded":
        *lead, d = shape
        return data((*lead, d + 8))[..., :d]
    if layout == "page_major":
        assert len(shape) == 6  # [L, 2, P, S, H, D] stored as [L, P, S, 2, H, D]
        lyr, two, pages, ps, h, d = shape
        return data((lyr, pages, ps, two, h, d)).permute(0, 3, 1, 2, 4, 5)
    raise ValueError(layout)


def make_rollback_case(seed, batch, page_size, tree_sizes, kind="tree", num_layers=2,
                       num_kv_heads=2, head_dim=8, dtype=torch.float32, layout="contiguous",
                       commit_max=None, spare_pages=3, max_t=None):
    """A batch of sequences, each with a committed prefix and a draft tree of ``T_b`` nodes whose
    K/V sit at positions ``c_b .. c_b + T_b - 1``, plus an accepted path per sequence.

    kind: "tree" (root-to-random-node walk of a random tree), "chain" (path 0..n-1: nothing
    moves), "rejected" (num_accepted = -1), "mixed" (a per-sequence mix of the three).
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if commit_max is None:
        commit_max = 3 * page_size + 5
    max_t = max_t or max(tree_sizes)
    commit = [rng.randint(0, commit_max) for _ in range(batch)]
    pages_needed = [-(-(c + t) // page_size) for c, t in zip(commit, tree_sizes)]
    max_pages = max(pages_needed) + 1
    num_pages = sum(pages_needed) + spare_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)  # sequences get scattered, non-monotone pages
    block_table = torch.full((batch, max_pages), -1, dtype=torch.int32)
    nxt = 0
    for b, np_ in enumerate(pages_needed):
        block_table[b, :np_] = torch.tensor(perm[nxt:nxt + np_], dtype=torch.int32)
        nxt += np_
    path = torch.full((batch, max_t), -1, dtype=torch.int32)
    num_accepted = torch.empty(batch, dtype=torch.int32)
    for b, t in enumerate(tree_sizes):
        k = kind if kind != "mixed" else rng.choice(["tree", "tree", "chain", "rejected"])
        if k == "tree":
            parents = random_parents(rng, t)
            # Favour deep nodes so that paths jump far (and across pages).
            node = max(rng.randrange(t), rng.randrange(t))
            p = walk_to_root(parents, node)
        elif k == "chain":
            p = list(range(rng.randint(1, t)))
        elif k == "rejected":
            p = []
        else:
            raise ValueError(kind)
        path[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
        num_accepted[b] = len(p) - 1
    kv = alloc_cache((num_layers, 2, num_pages, page_size, num_kv_heads, head_dim), dtype,
                     layout, gen)
    lens = torch.tensor(commit, dtype=torch.int32)
    return kv, block_table, lens, path, num_accepted


def run_rollback_both(case, op=None):
    """Run the op and the reference on copies of ``case``; return both results."""
    op = op or OPS.kv_rollback
    kv, bt, lens, path, na = case
    kv_op, lens_op = kv.clone(), lens.clone()
    kv_ref, lens_ref = kv.clone(), lens.clone()
    op(kv_op, bt, lens_op, path, na)
    ref.kv_rollback(kv_ref, bt, lens_ref, path, na)
    return (kv_op, lens_op), (kv_ref, lens_ref)


def check_rollback(case):
    (kv_op, lens_op), (kv_ref, lens_ref) = run_rollback_both(case)
    assert torch.equal(lens_op, lens_ref), (lens_op, lens_ref)
    assert_same_bits(kv_op, kv_ref, "kv_cache vs reference")
    return kv_op, lens_op


def make_append_case(seed, num_tokens, page_size, num_pages=9, num_kv_heads=3, head_dim=16,
                     dtype=torch.float32, layout="contiguous", pad_frac=0.25, num_layers=2):
    """Per-layer views of a 6-D cache (k_cache = kv[l, 0], v_cache = kv[l, 1]: strided), k/v
    sliced out of a fused qkv tensor (strided rows), distinct random slots with -1 padding."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kv = alloc_cache((num_layers, 2, num_pages, page_size, num_kv_heads, head_dim), dtype,
                     layout, gen)
    layer = rng.randrange(num_layers)
    qkv = torch.randn(num_tokens, 4 + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    k = qkv[:, 4:4 + num_kv_heads]
    v = qkv[:, 4 + num_kv_heads:]
    slots = rng.sample(range(num_pages * page_size), num_tokens)
    slots = [-1 if rng.random() < pad_frac else s for s in slots]
    return kv, layer, k, v, torch.tensor(slots, dtype=torch.int64)


# ---- case tables shared by the CUDA tests (test_cache_ops_gpu.py) and the emulated CUDA
# kernels (test_simt_cache.py) ----

APPEND_GRID = dict(page_size=[1, 16, 128], num_tokens=[1, 3, 17],
                   layout=["contiguous", "padded", "page_major"])
APPEND_WIDTHS = [(128, torch.float16), (256, torch.float32), (3, torch.float16),
                 (5, torch.float32), (64, torch.bfloat16)]
ROLLBACK_WIDTHS = [(128, torch.float16), (256, torch.float32), (64, torch.bfloat16),
                   (3, torch.float16)]


def append_grid_case(dtype, page_size, num_tokens, layout):
    seed = DTYPES.index(dtype) * 1000 + page_size * 10 + num_tokens + len(layout)
    return make_append_case(seed, num_tokens, page_size, num_pages=max(2, 40 // page_size),
                            dtype=dtype, layout=layout)


def rollback_random_trees_case(dtype, page_size, batch):
    rng = random.Random(batch * 31 + page_size)
    sizes = [rng.choice([1, 2, 7, 64, rng.randint(1, 64)]) for _ in range(batch)]
    return make_rollback_case(batch * 7 + page_size, batch, page_size, sizes, kind="mixed",
                              dtype=dtype, num_layers=3, num_kv_heads=5, head_dim=16)


def rollback_layout_case(layout, head_dim, dtype):
    return make_rollback_case(head_dim, 5, 16, [64, 7, 33, 2, 20], kind="tree", dtype=dtype,
                              layout=layout, num_layers=2, num_kv_heads=2, head_dim=head_dim)


def rollback_many_rounds_case(num_layers=8):
    """Long jumping paths (sources and destinations of one sequence overlap): several stage
    rounds per block, round boundaries inside entries."""
    kv, bt, lens, path, na = make_rollback_case(3, 2, 16, [64, 64], kind="chain",
                                                num_layers=num_layers, num_kv_heads=4,
                                                head_dim=128, dtype=torch.float16)
    path.fill_(-1)
    for b, p in enumerate([[0] + list(range(2, 64)), list(range(0, 64, 2))]):
        path[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
        na[b] = len(p) - 1
    return kv, bt, lens, path, na


def rollback_unit_split_case(num_layers, num_kv_heads):
    return make_rollback_case(num_layers * 10 + num_kv_heads, 4, 16, [7, 64, 12, 30],
                              kind="tree", num_layers=num_layers, num_kv_heads=num_kv_heads,
                              head_dim=64, dtype=torch.bfloat16)


def rollback_big_offset_table_case():
    """max_T = 4000: the kernel's (src, dst) offset table needs 64 KB of shared memory."""
    return make_rollback_case(77, 2, 16, [300, 9], kind="tree", num_layers=1, num_kv_heads=1,
                              head_dim=8, dtype=torch.float16, max_t=4000)


def run_append_both(kv, layer, k, v, slots, op=None):
    op = op or OPS.append_kv
    kv_op, kv_ref = kv.clone(), kv.clone()
    op(k, v, kv_op[layer, 0], kv_op[layer, 1], slots)
    ref.append_kv(k, v, kv_ref[layer, 0], kv_ref[layer, 1], slots)
    return kv_op, kv_ref


# --------------------------------------------------------------------------------------------
# reference sanity (so that a wrong oracle cannot hide a wrong op)
# --------------------------------------------------------------------------------------------


def test_reference_rollback_semantics():
    case = make_rollback_case(5, batch=3, page_size=4, tree_sizes=[9, 13, 7])
    kv, bt, lens, path, na = case
    kv_ref, lens_ref = kv.clone(), lens.clone()
    ref.kv_rollback(kv_ref, bt, lens_ref, path, na)
    ps = kv.shape[3]
    for b in range(3):
        c, n = int(lens[b]), int(na[b]) + 1
        assert int(lens_ref[b]) == c + n
        for j in range(n):
            s, d = c + int(path[b, j]), c + j
            src = kv[:, :, int(bt[b, s // ps]), s % ps]
            dst = kv_ref[:, :, int(bt[b, d // ps]), d % ps]
            assert_same_bits(dst, src, f"seq {b} entry {j}")


def test_reference_append_semantics():
    kv, layer, k, v, slots = make_append_case(1, 11, page_size=4)
    _, kv_ref = run_append_both(kv, layer, k, v, slots, op=lambda *a: None)
    ps = kv.shape[3]
    written = torch.zeros(kv.shape[2], ps, dtype=torch.bool)
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            assert_same_bits(kv_ref[layer, 0, s // ps, s % ps], k[n])
            assert_same_bits(kv_ref[layer, 1, s // ps, s % ps], v[n])
            written[s // ps, s % ps] = True
    assert_same_bits(kv_ref[:, :, ~written], kv[:, :, ~written], "untouched slots")
    others = [l for l in range(kv.shape[0]) if l != layer]
    assert_same_bits(kv_ref[others], kv[others], "other layers")


# --------------------------------------------------------------------------------------------
# append_kv
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "page_major"])
def test_append_kv_matches_reference(dtype, page_size, num_tokens, layout):
    seed = DTYPES.index(dtype) * 1000 + page_size * 10 + num_tokens + len(layout)
    case = make_append_case(seed, num_tokens, page_size, num_pages=max(2, 40 // page_size),
                            dtype=dtype, layout=layout)
    kv_op, kv_ref = run_append_both(*case)
    assert_same_bits(kv_op, kv_ref, "kv cache")
    assert not torch.equal(bits(kv_op), bits(case[0])) or (case[4] == -1).all()


def test_append_kv_all_padding_and_empty():
    kv, layer, k, v, slots = make_append_case(3, 5, page_size=16)
    before = kv.clone()
    OPS.append_kv(k, v, kv[layer, 0], kv[layer, 1], torch.full((5,), -1, dtype=torch.int64))
    assert_same_bits(kv, before)
    OPS.append_kv(k[:0], v[:0], kv[layer, 0], kv[layer, 1], slots[:0])
    assert_same_bits(kv, before)


def test_append_kv_last_slot_and_head_dims():
    # The last slot of the last page, odd head dims, a single head.
    for d in (1, 3, 64, 256):
        kv, layer, k, v, slots = make_append_case(d, 4, page_size=16, num_pages=3,
                                                  num_kv_heads=1, head_dim=d, pad_frac=0.0)
        slots[0] = 3 * 16 - 1
        slots[1] = 0
        kv_op, kv_ref = run_append_both(kv, layer, k, v, slots)
        assert_same_bits(kv_op, kv_ref, f"head_dim {d}")


def test_append_kv_opcheck():
    kv, layer, k, v, slots = make_append_case(7, 6, page_size=4, dtype=torch.float16)
    torch.library.opcheck(OPS.append_kv.default, (k, v, kv[layer, 0], kv[layer, 1], slots))


@pytest.mark.parametrize("bad", ["slot_low", "slot_high", "dtype", "shape", "slot_dtype",
                                 "slot_len", "cache_shape"])
def test_append_kv_bad_input_writes_nothing(bad):
    kv, layer, k, v, slots = make_append_case(11, 7, page_size=4, num_pages=5, pad_frac=0.0)
    kc, vc = kv[layer, 0], kv[layer, 1]
    if bad == "slot_low":
        slots[5] = -2
    elif bad == "slot_high":
        slots[6] = 5 * 4  # one past the last slot; the rows before it are valid
    elif bad == "dtype":
        k = k.to(torch.float16)
    elif bad == "shape":
        v = v[:, :2]
    elif bad == "slot_dtype":
        slots = slots.to(torch.int32)
    elif bad == "slot_len":
        slots = slots[:-1]
    elif bad == "cache_shape":
        vc = kv[layer, 1, :4]
    before = kv.clone()
    with pytest.raises(RuntimeError):
        OPS.append_kv(k, v, kc, vc, slots)
    assert_same_bits(kv, before, "cache after a rejected call")


# --------------------------------------------------------------------------------------------
# kv_rollback
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_rollback_random_trees(dtype, page_size, batch):
    rng = random.Random(batch * 31 + page_size)
    sizes = [rng.choice([1, 2, 7, 64, rng.randint(1, 64)]) for _ in range(batch)]
    case = make_rollback_case(batch * 7 + page_size, batch, page_size, sizes, kind="mixed",
                              dtype=dtype)
    kv_op, _ = check_rollback(case)
    if any(int(case[4][b]) > 0 and bool((case[3][b, :int(case[4][b]) + 1]
                                          != torch.arange(int(case[4][b]) + 1)).any())
           for b in range(batch)):
        assert not torch.equal(bits(kv_op), bits(case[0])), "something should have moved"


@pytest.mark.parametrize("tree_size", [1, 2, 7, 64])
@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_rollback_tree_sizes(tree_size, page_size):
    for seed in range(3):
        case = make_rollback_case(seed * 100 + tree_size, 3, page_size, [tree_size] * 3,
                                  kind="tree", dtype=torch.float16)
        check_rollback(case)


@pytest.mark.parametrize("layout", ["padded", "page_major"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rollback_strided_cache(layout, dtype):
    case = make_rollback_case(17, 5, 4, [64, 7, 33, 2, 20], kind="tree", dtype=dtype,
                              layout=layout, num_layers=3, num_kv_heads=3, head_dim=16)
    assert not case[0].is_contiguous()
    check_rollback(case)


@pytest.mark.parametrize("page_size", [1, 16])
def test_rollback_chain_moves_nothing(page_size):
    case = make_rollback_case(23, 6, page_size, [1, 5, 64, 9, 2, 17], kind="chain")
    kv, _, lens, _, na = case
    kv_op, lens_op = check_rollback(case)
    assert_same_bits(kv_op, kv, "a chain must leave the cache untouched")
    assert torch.equal(lens_op, lens + na + 1)


def test_rollback_rejected_changes_nothing():
    case = make_rollback_case(29, 4, 16, [7, 7, 1, 64], kind="rejected")
    kv, _, lens, _, _ = case
    kv_op, lens_op = check_rollback(case)
    assert_same_bits(kv_op, kv)
    assert torch.equal(lens_op, lens)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_rollback_far_jumps_across_pages(page_size):
    # Hand-made paths with long jumps: sources in far pages, destinations straddling a page
    # boundary (commit lengths just below a multiple of the page size), a leaf-only jump.
    paths = [[0, 17, 40, 63], [0, 1, 2, 50, 51, 63], [0, 63], list(range(0, 64, 2))]
    kv, bt, lens, path, na = make_rollback_case(31, 4, page_size, [64] * 4, kind="chain",
                                                commit_max=0, num_layers=3)
    path.fill_(-1)
    for b, p in enumerate(paths):
        path[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
        na[b] = len(p) - 1
    lens[:] = torch.tensor([page_size - 1, 2 * page_size - 2, 0, 1], dtype=torch.int32)
    # Re-derive the block tables for the new commit lengths (distinct pages, shuffled).
    need = [-(-(int(c) + 64) // page_size) for c in lens]
    n_pages = sum(need) + 1
    kv = torch.randn(3, 2, n_pages, page_size, 2, 8)
    ids = torch.randperm(n_pages, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    bt = torch.full((4, max(need)), -1, dtype=torch.int32)
    o = 0
    for b, k in enumerate(need):
        bt[b, :k] = ids[o:o + k]
        o += k
    kv_op, lens_op = check_rollback((kv, bt, lens, path, na))
    ps = page_size
    for b, p in enumerate(paths):
        c = int(lens[b])
        for j, pj in enumerate(p):
            s, d = c + pj, c + j
            assert_same_bits(kv_op[:, :, int(bt[b, d // ps]), d % ps],
                             kv[:, :, int(bt[b, s // ps]), s % ps], f"seq {b} entry {j}")


def test_rollback_repeated_steps():
    # Several decode steps in a row on the same cache: lengths accumulate, earlier commits stay.
    kv, bt, lens, path, na = make_rollback_case(37, 3, 4, [7, 7, 7], kind="tree",
                                                commit_max=2, spare_pages=0)
    bt = torch.cat([bt, torch.full((3, 16), -1, dtype=torch.int32)], dim=1)
    extra = torch.arange(kv.shape[2], kv.shape[2] + 48, dtype=torch.int32).view(3, 16)
    kv = torch.cat([kv, torch.randn(2, 2, 48, 4, 2, 8)], dim=2)
    for b in range(3):  # extend each row with fresh pages after its last used one
        used = int((bt[b] >= 0).sum())
        bt[b, used:used + 16] = extra[b]
    kv_op, lens_op, kv_r, lens_r = kv.clone(), lens.clone(), kv.clone(), lens.clone()
    rng = random.Random(0)
    for step in range(4):
        path.fill_(-1)
        for b in range(3):
            p = walk_to_root(random_parents(rng, 7), rng.randrange(7))
            path[b, :len(p)] = torch.tensor(p, dtype=torch.int32)
            na[b] = len(p) - 1 if step != 2 or b != 1 else -1
        OPS.kv_rollback(kv_op, bt, lens_op, path, na)
        ref.kv_rollback(kv_r, bt, lens_r, path, na)
        assert torch.equal(lens_op, lens_r)
        assert_same_bits(kv_op, kv_r, f"step {step}")


def test_rollback_strided_index_tensors():
    # Index tensors may be non-contiguous views (e.g. columns of a bigger buffer).
    kv, bt, lens, path, na = make_rollback_case(41, 5, 4, [9, 64, 3, 20, 1], kind="mixed")
    bt_s = torch.full((5, bt.shape[1] * 2), -7, dtype=torch.int32)[:, ::2]
    bt_s.copy_(bt)
    path_s = torch.full((path.shape[1], 5), -9, dtype=torch.int32).t()
    path_s.copy_(path)
    lens_buf = torch.zeros(10, dtype=torch.int32)
    lens_s = lens_buf[::2]
    lens_s.copy_(lens)
    na_s = torch.stack([na, na], 1)[:, 1]
    kv_op = kv.clone()
    OPS.kv_rollback(kv_op, bt_s, lens_s, path_s, na_s)
    kv_ref, lens_ref = kv.clone(), lens.clone()
    ref.kv_rollback(kv_ref, bt, lens_ref, path, na)
    assert torch.equal(lens_s, lens_ref)
    assert (lens_buf[1::2] == 0).all()
    assert_same_bits(kv_op, kv_ref)


def test_rollback_opcheck():
    case = make_rollback_case(43, 3, 4, [7, 12, 3], kind="tree", dtype=torch.bfloat16,
                              spare_pages=8)
    torch.library.opcheck(OPS.kv_rollback.default, case)


def _bad_rollback(which):
    """A valid 3-sequence case (sequence 0 moves) made invalid in sequence 2 only, so that a
    kernel which wrote sequence 0 before noticing would be caught."""
    kv, bt, lens, path, na = make_rollback_case(47, 3, 4, [9, 9, 9], kind="chain",
                                                commit_max=5)
    path.fill_(-1)
    path[0, :3] = torch.tensor([0, 4, 8], dtype=torch.int32)
    na[0] = 2
    path[1, :2] = torch.tensor([0, 1], dtype=torch.int32)
    na[1] = 1
    path[2, :3] = torch.tensor([0, 2, 5], dtype=torch.int32)
    na[2] = 2
    if which == "na_high":
        na[2] = path.shape[1]
    elif which == "na_low":
        na[2] = -2
    elif which == "root":
        path[2, 0] = 1
    elif which == "not_increasing":
        path[2, :3] = torch.tensor([0, 5, 2], dtype=torch.int32)
    elif which == "repeat":
        path[2, :3] = torch.tensor([0, 5, 5], dtype=torch.int32)
    elif which == "past_max_t":
        path[2, :3] = torch.tensor([0, 5, 9], dtype=torch.int32)
    elif which == "negative_len":
        lens[2] = -1
    elif which == "past_capacity":
        lens[2] = bt.shape[1] * 4 - 3  # c + 5 is past the row's pages
    elif which == "page_oob":
        c = int(lens[2])
        bt[2, (c + 5) // 4] = kv.shape[2]
    elif which == "page_neg":
        c = int(lens[2])
        bt[2, (c + 2) // 4] = -1
    elif which == "shared_page":
        c0, c2 = int(lens[0]), int(lens[2])
        bt[2, (c2 + 5) // 4] = bt[0, (c0 + 8) // 4]
    elif which == "path_dtype":
        path = path.to(torch.int64)
    elif which == "batch_mismatch":
        na = na[:2]
    elif which == "kv_dim":
        kv = kv[:, :1]
    else:
        raise ValueError(which)
    return kv, bt, lens, path, na


BAD_ROLLBACK = ["na_high", "na_low", "root", "not_increasing", "repeat", "past_max_t",
                "negative_len", "past_capacity", "page_oob", "page_neg", "shared_page",
                "path_dtype", "batch_mismatch", "kv_dim"]


def test_bad_rollback_base_case_is_valid():
    # The unmodified base case of _bad_rollback must succeed and move sequence 0, so that the
    # bad-input tests below fail for the reason they name.
    kv, bt, lens, path, na = _bad_rollback("na_high")
    na[2] = 2
    (kv_op, lens_op), (kv_ref, lens_ref) = run_rollback_both((kv, bt, lens, path, na))
    assert torch.equal(lens_op, lens_ref) and torch.equal(lens_op, lens + na + 1)
    assert_same_bits(kv_op, kv_ref)
    assert not torch.equal(bits(kv_op), bits(kv))


@pytest.mark.parametrize("which", BAD_ROLLBACK)
def test_rollback_bad_input_writes_nothing(which):
    kv, bt, lens, path, na = _bad_rollback(which)
    kv0, lens0 = kv.clone(), lens.clone()
    with pytest.raises(RuntimeError):
        OPS.kv_rollback(kv, bt, lens, path, na)
    assert_same_bits(kv, kv0, "cache after a rejected call")
    assert torch.equal(lens, lens0), "committed_lens after a rejected call"


def test_rollback_empty_batch_and_no_layers():
    kv = torch.randn(2, 2, 3, 4, 2, 8)
    e = torch.zeros(0, dtype=torch.int32)
    OPS.kv_rollback(kv, e.view(0, 2), e, e.view(0, 3), e)
    # A zero-layer cache still updates the lengths.
    case = make_rollback_case(53, 2, 4, [5, 5], kind="tree", num_layers=0)
    check_rollback(case)
