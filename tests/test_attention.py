"""tree_attention: the CPU op (torch.ops.specrt.tree_attention) against specrt.reference.

Tolerances (op output vs the fp32 reference, both rounded to the output dtype):
fp32 atol 2e-5 / rtol 1e-5; bf16 atol 1e-2 / rtol 1.6e-2 (one bf16 ulp at |x| < 2);
fp16 atol 2e-3 / rtol 2e-3. LSE is fp32 in every case: atol 1e-4 / rtol 1e-5 (its inputs are the
same rounded q/k, only the summation order differs).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import specrt._C  # noqa: F401  (registers torch.ops.specrt)
from specrt import reference

OUT_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
LSE_TOL = dict(atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# case construction (shared with test_attention_gpu.py)
# --------------------------------------------------------------------------------------------


def random_parents(t: int, rng: random.Random) -> list[int]:
    """A random tree in topological order: parent[i] uniform in [0, i)."""
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def chain_parents(t: int) -> list[int]:
    return [-1] + list(range(t - 1))


def ancestors(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return sorted(path)


def to_int32_word(x: int) -> int:
    return x - (1 << 32) if x >= (1 << 31) else x


def pack_rows(rows: list[list[int]], words: int) -> list[list[int]]:
    """Each row is the list of visible local node indices; returns int32 words per row."""
    packed = []
    for visible in rows:
        w = [0] * words
        for k in visible:
            w[k // 32] |= 1 << (k % 32)
        packed.append([to_int32_word(x) for x in w])
    return packed


def tree_mask(parent_lists: list[list[int]], words: int | None = None) -> torch.Tensor:
    """Packed visibility mask of a batch of trees: a row holds the node and its ancestors."""
    max_t = max(len(p) for p in parent_lists)
    words = words or max(1, math.ceil(max_t / 32))
    rows = []
    for parents in parent_lists:
        rows += pack_rows([ancestors(parents, i) for i in range(len(parents))], words)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, words)


def make_case(prefix_lens, parent_lists, hq, hkv, d, page_size, dtype, *, seed=0,
              mask_mode="tree", spare_pages=3, device="cpu"):
    """Build a ragged batch: sequence b has prefix_lens[b] committed tokens and the tree
    parent_lists[b] of new tokens. mask_mode: 'tree' (packed mask from the parents), 'none'
    (mask=None, causal; the trees must be chains). Pages are shuffled; unused block-table
    entries are -1."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ts = [len(p) for p in parent_lists]
    lens = [p + t for p, t in zip(prefix_lens, ts)]
    pages_per_seq = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(pages_per_seq) + spare_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)
    max_pages = max(pages_per_seq) + 1
    block_table = torch.full((len(lens), max_pages), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages_per_seq):
        block_table[b, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    k_cache = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_pages, page_size, hkv, d, generator=g).to(dtype)
    total_q = sum(ts)
    q = torch.randn(total_q, hq, d, generator=g).to(dtype)
    qo_indptr = torch.tensor([0] + list(torch.tensor(ts).cumsum(0).tolist()), dtype=torch.int32)
    mask = tree_mask(parent_lists) if mask_mode == "tree" else None
    case = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                seq_lens=torch.tensor(lens, dtype=torch.int32), qo_indptr=qo_indptr, mask=mask,
                sm_scale=1.0 / math.sqrt(d))
    if device != "cpu":
        case = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["parents"] = parent_lists
    return case


def run_op(case, with_lse=True, out=None, lse=None, plan=None, workspace=None):
    q = case["q"]
    if out is None:
        out = torch.full_like(q, 7.0)
    if with_lse and lse is None:
        lse = torch.full(q.shape[:2], 7.0, dtype=torch.float32, device=q.device)
    torch.ops.specrt.tree_attention(q, case["k_cache"], case["v_cache"], case["block_table"],
                                    case["seq_lens"], case["qo_indptr"], case["mask"], out,
                                    lse if with_lse else None, case["sm_scale"], plan, workspace)
    return out, (lse if with_lse else None)


def run_ref(case):
    return reference.tree_attention(case["q"], case["k_cache"], case["v_cache"],
                                    case["block_table"], case["seq_lens"], case["qo_indptr"],
                                    case["mask"], case["sm_scale"], return_lse=True)


def check_against_reference(case, with_lse=True):
    out, lse = run_op(case, with_lse)
    ref_out, ref_lse = run_ref(case)
    torch.testing.assert_close(out.cpu(), ref_out.cpu(), **OUT_TOL[case["q"].dtype])
    if with_lse:
        torch.testing.assert_close(lse.cpu(), ref_lse.cpu(), **LSE_TOL)


def random_batch(batch, rng, sizes=(1, 2, 7, 64), max_prefix=300, kind="random"):
    parent_lists, prefixes = [], []
    for _ in range(batch):
        t = rng.choice(sizes)
        parent_lists.append(random_parents(t, rng) if kind == "random" else chain_parents(t))
        prefixes.append(rng.randrange(0, max_prefix + 1))
    return prefixes, parent_lists


# --------------------------------------------------------------------------------------------
# op vs reference
# --------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
# 16, 64, 80, 128: the CPU kernel's AVX-512 paths (head_dim a multiple of 16 up to 128); 256:
# transposed keys in registers, buffered values; 40: the portable loops throughout.
@pytest.mark.parametrize("d", [16, 64, 128, 256, 80, 40])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_head_dims_and_gqa(dtype, d, group):
    rng = random.Random(d * 10 + group)
    prefixes, parents = random_batch(3, rng, max_prefix=200)
    hkv = 2
    case = make_case(prefixes, parents, hkv * group, hkv, d, 16, dtype, seed=d + group)
    check_against_reference(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("mode", ["random", "chain_mask", "causal"])
def test_layouts(dtype, page_size, batch, mode):
    rng = random.Random(batch * 100 + page_size)
    kind = "random" if mode == "random" else "chain"
    prefixes, parents = random_batch(batch, rng, kind=kind, max_prefix=150)
    case = make_case(prefixes, parents, 4, 2, 64, page_size, dtype, seed=batch + page_size,
                     mask_mode="none" if mode == "causal" else "tree")
    check_against_reference(case, with_lse=(batch != 3))


@pytest.mark.parametrize("tree_size", [1, 2, 7, 64])
def test_tree_sizes_exact(tree_size):
    rng = random.Random(tree_size)
    parents = [random_parents(tree_size, rng), random_parents(tree_size, rng)]
    case = make_case([0, 37], parents, 8, 2, 128, 16, torch.bfloat16, seed=tree_size)
    check_against_reference(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_contexts(dtype):
    # contexts 1 .. a few thousand in one ragged batch; the first sequence has no prefix at all
    rng = random.Random(5)
    parents = [chain_parents(1), random_parents(7, rng), chain_parents(1), random_parents(64, rng)]
    case = make_case([0, 1, 3000, 2500], parents, 8, 2, 128, 16, dtype, seed=9)
    check_against_reference(case)


def test_decode_t1():
    # plain decode: one new token per sequence, mask=None
    rng = random.Random(1)
    prefixes = [rng.randrange(0, 500) for _ in range(17)]
    case = make_case(prefixes, [chain_parents(1)] * 17, 12, 4, 128, 16, torch.float16, seed=3,
                     mask_mode="none")
    check_against_reference(case)


def test_causal_equals_chain_mask():
    rng = random.Random(2)
    prefixes, parents = random_batch(5, rng, kind="chain")
    a = make_case(prefixes, parents, 4, 4, 64, 16, torch.float32, seed=4, mask_mode="none")
    b = make_case(prefixes, parents, 4, 4, 64, 16, torch.float32, seed=4, mask_mode="tree")
    out_a, lse_a = run_op(a)
    out_b, lse_b = run_op(b)
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    torch.testing.assert_close(lse_a, lse_b, atol=0, rtol=0)


def test_arbitrary_mask_and_ignored_high_bits():
    # Lookahead-style masks (any pattern with the diagonal), extra words and bits k >= T_b set
    rng = random.Random(11)
    ts = [5, 40, 1]
    parents = [chain_parents(t) for t in ts]
    case = make_case([10, 0, 33], parents, 6, 3, 64, 16, torch.float32, seed=12)
    rows = []
    for t in ts:
        for i in range(t):
            rows.append(sorted({i} | {k for k in range(t) if rng.random() < 0.4}))
    clean = torch.tensor(pack_rows(rows, 3), dtype=torch.int32)
    case["mask"] = clean
    ref_out, ref_lse = run_ref(case)
    dirty = clean.clone()
    start = 0
    for t in ts:
        for r in range(start, start + t):
            for k in range(t, 96):  # bits at or past T_b must be ignored
                w, bit = divmod(k, 32)
                dirty[r, w] = to_int32_word((int(dirty[r, w]) & 0xFFFFFFFF) | (1 << bit))
        start += t
    case["mask"] = dirty
    out, lse = run_op(case)
    torch.testing.assert_close(out, ref_out, **OUT_TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


def test_strided_views():
    # the real cache layout: per-layer views of one [L, 2, P, S, H, D] tensor, q sliced from a
    # fused qkv projection, out and lse with padded rows
    rng = random.Random(3)
    prefixes, parents = random_batch(3, rng)
    base = make_case(prefixes, parents, 8, 2, 64, 16, torch.bfloat16, seed=6)
    kv = torch.randn(3, 2, *base["k_cache"].shape).to(torch.bfloat16)
    kv[1, 0] = base["k_cache"]
    kv[1, 1] = base["v_cache"]
    qkv = torch.randn(base["q"].shape[0], 12, 64).to(torch.bfloat16)
    qkv[:, :8] = base["q"]
    case = dict(base, k_cache=kv[1, 0], v_cache=kv[1, 1], q=qkv[:, :8])
    out_big = torch.full((base["q"].shape[0], 10, 64), 5.0, dtype=torch.bfloat16)
    lse_big = torch.full((base["q"].shape[0], 9), 5.0)
    out, lse = run_op(case, out=out_big[:, 1:9], lse=lse_big[:, :8])
    ref_out, ref_lse = run_ref(base)
    torch.testing.assert_close(out, ref_out, **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
    assert (out_big[:, 0] == 5).all() and (out_big[:, 9] == 5).all() and (lse_big[:, 8] == 5).all()


# --------------------------------------------------------------------------------------------
# the tree property, checked independently of the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_property(dtype):
    """Each node's output equals plain attention over prefix + its root-to-node path."""
    rng = random.Random(21)
    parents = [random_parents(64, rng), random_parents(7, rng), random_parents(2, rng)]
    prefixes = [100, 0, 31]
    hq, hkv, d, ps = 6, 2, 64, 16
    case = make_case(prefixes, parents, hq, hkv, d, ps, dtype, seed=22)
    out, _ = run_op(case)
    flat_k = case["k_cache"].reshape(-1, hkv, d).float()
    flat_v = case["v_cache"].reshape(-1, hkv, d).float()
    row = 0
    for b, par in enumerate(parents):
        def slot(pos):
            return int(case["block_table"][b, pos // ps]) * ps + pos % ps
        for i in range(len(par)):
            positions = list(range(prefixes[b])) + [prefixes[b] + a for a in ancestors(par, i)]
            slots = torch.tensor([slot(p) for p in positions])
            k = flat_k[slots].transpose(0, 1)[None]  # [1, Hkv, n, D]
            v = flat_v[slots].transpose(0, 1)[None]
            qi = case["q"][row].float()[None, :, None, :]  # [1, Hq, 1, D]
            expect = torch.nn.functional.scaled_dot_product_attention(
                qi, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1),
                scale=case["sm_scale"])[0, :, 0]
            torch.testing.assert_close(out[row].float(), expect.to(dtype).float(),
                                       **OUT_TOL[dtype])
            row += 1


# --------------------------------------------------------------------------------------------
# opcheck and bad input
# --------------------------------------------------------------------------------------------


def test_opcheck():
    rng = random.Random(7)
    prefixes, parents = random_batch(2, rng, sizes=(3, 7), max_prefix=40)
    case = make_case(prefixes, parents, 4, 2, 64, 16, torch.float32, seed=8)
    out = torch.empty_like(case["q"])
    lse = torch.empty(case["q"].shape[:2])
    torch.library.opcheck(
        torch.ops.specrt.tree_attention.default,
        (case["q"], case["k_cache"], case["v_cache"], case["block_table"], case["seq_lens"],
         case["qo_indptr"], case["mask"], out, lse, case["sm_scale"]))


def _bad_cases():
    rng = random.Random(13)
    prefixes, parents = random_batch(3, rng, sizes=(2, 7), max_prefix=50)

    def base(**kw):
        return make_case(prefixes, parents, 4, 2, 64, 16, torch.float32, seed=14, **kw)

    def edit(fn):
        c = base()
        fn(c)
        return c

    yield "q dtype", edit(lambda c: c.update(q=c["q"].to(torch.float64)))
    yield "cache dtype", edit(lambda c: c.update(k_cache=c["k_cache"].half()))
    yield "page id too large", edit(lambda c: c["block_table"].__setitem__((1, 0), 10**6))
    yield "page id negative", edit(lambda c: c["block_table"].__setitem__((2, 0), -1))
    yield "Hq % Hkv", edit(lambda c: c.update(q=torch.randn(c["q"].shape[0], 3, 64)))
    yield "seq_lens < T", edit(lambda c: c["seq_lens"].__setitem__(0, 1))
    yield "seq_lens > capacity", edit(lambda c: c["seq_lens"].__setitem__(0, 10**6))
    yield "qo_indptr decreasing", edit(lambda c: c["qo_indptr"].__setitem__(1, 100))
    yield "qo_indptr[0] != 0", edit(lambda c: c["qo_indptr"].__setitem__(0, 1))
    yield "mask too narrow", edit(lambda c: c.update(
        mask=torch.zeros(c["q"].shape[0], 0, dtype=torch.int32)))
    yield "mask int64", edit(lambda c: c.update(mask=c["mask"].long()))
    yield "block_table int64", edit(lambda c: c.update(block_table=c["block_table"].long()))
    yield "head_dim mismatch", edit(lambda c: c.update(q=torch.randn(c["q"].shape[0], 4, 32)))


@pytest.mark.parametrize("name,case", list(_bad_cases()), ids=lambda x: x if isinstance(x, str)
                         else "")
def test_bad_input_raises_and_writes_nothing(name, case):
    q = case["q"]
    out = torch.full((q.shape[0], 4, 64), 123.0, dtype=torch.float32)
    if q.shape[1:] != (4, 64) or q.dtype != torch.float32:
        out = torch.full(q.shape, 123.0, dtype=q.dtype)
    lse = torch.full((q.shape[0], q.shape[1]), 123.0)
    with pytest.raises(RuntimeError):
        run_op(case, out=out, lse=lse)
    assert (out == 123).all() and (lse == 123).all()


def test_bad_out_shape_and_dtype():
    rng = random.Random(15)
    prefixes, parents = random_batch(2, rng, sizes=(3,), max_prefix=10)
    case = make_case(prefixes, parents, 4, 2, 64, 16, torch.float32, seed=16)
    for out in (torch.full((case["q"].shape[0], 4, 32), 1.0),
                torch.full_like(case["q"], 1.0, dtype=torch.float16)):
        with pytest.raises(RuntimeError):
            run_op(case, out=out)
        assert (out == 1).all()
    lse = torch.full((case["q"].shape[0], 4), 1.0, dtype=torch.float64)
    out = torch.full_like(case["q"], 1.0)
    with pytest.raises(RuntimeError):
        run_op(case, out=out, lse=lse)
    assert (out == 1).all()


# --------------------------------------------------------------------------------------------
# the CUDA split-KV plan (pure Python, checked here so CPU-only CI covers it)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lens,ts,hkv", [
    ([32768], [1], 8),  # batch 1, long context: must split to fill the GPU
    ([32768], [64], 1),
    ([5, 300, 4000, 70, 9000], [1, 7, 2, 64, 1], 4),
    ([100] * 64, [1] * 64, 8),  # large batch of short contexts: no split
])
def test_plan_invariants(lens, ts, hkv):
    from specrt.attention_plan import HEADER, plan_sizes, plan_tree_attention

    num_sms, hq, d = 132, 4 * hkv, 128
    qo = torch.tensor([0] + list(torch.tensor(ts).cumsum(0).tolist()), dtype=torch.int32)
    plan, ws = plan_tree_attention(qo, torch.tensor(lens, dtype=torch.int32), hq, hkv, d, 16,
                                   num_sms, "cpu")
    cap, rows = plan_sizes(len(lens), sum(ts), max(ts), hkv, num_sms)
    assert plan.numel() == HEADER + 4 * cap + len(lens) + 1
    assert ws.numel() == rows * hq * (d + 1)
    n_items = int(plan[0])
    assert int(plan[1]) == cap and n_items <= cap
    items = plan[HEADER:HEADER + 4 * n_items].reshape(-1, 4).tolist()
    seq_ptr = plan[HEADER + 4 * cap:].tolist()
    used_rows = set()
    for b, length in enumerate(lens):
        mine = items[seq_ptr[b]:seq_ptr[b + 1]]
        assert all(it[0] == b for it in mine)
        # the ranges tile [0, L_b) in order
        assert mine[0][1] == 0 and mine[-1][2] == length
        assert all(x[2] == y[1] for x, y in zip(mine, mine[1:]))
        assert all(it[1] < it[2] for it in mine)
        if len(mine) == 1:
            assert mine[0][3] == -1
        for it in mine if len(mine) > 1 else []:
            span = set(range(it[3], it[3] + ts[b]))
            assert not span & used_rows and max(span) < rows
            used_rows |= span
    if lens == [32768] and ts == [1]:
        assert n_items * hkv >= num_sms  # batch 1 decode at 32k fills every SM
    if len(lens) == 64:
        assert n_items == 64  # no split when the batch already fills the GPU
