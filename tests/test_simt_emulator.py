"""The SIMT emulation itself (csrc/simt): each emulated instruction against a scalar model of
its documented semantics, and the machine's barriers, warp collectives, clusters, shared
memory and error reports on small kernels written for the test (csrc/simt/selftest.cu).
"""
from __future__ import annotations

import ctypes as C
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import simt_backend as sb

pytestmark = pytest.mark.emulated


@pytest.fixture(scope="module")
def L():
    lib = sb.lib()
    for name in ("simt_test_mma", "simt_test_ldmatrix", "simt_test_ex2", "simt_test_reverse",
                 "simt_test_warp", "simt_test_shfl_double", "simt_test_sync_reduce",
                 "simt_test_cluster", "simt_test_dsmem_after_exit", "simt_test_deadlock",
                 "simt_test_exited_lane", "simt_test_cp_async", "simt_test_garbage",
                 "simt_test_smem_overflow", "simt_test_big_smem"):
        getattr(lib, name).restype = C.c_int
    lib.simt_test_warp.argtypes = [C.c_void_p, C.c_void_p, C.c_uint, C.c_int, C.c_int, C.c_int]
    yield lib
    sb.configure()


def P(t: torch.Tensor):
    return C.c_void_p(t.data_ptr())


def check(rc, L):
    assert rc == 0, L.simt_last_error().decode()


def expect_error(rc, L, *words):
    assert rc != 0, "the launch should have failed"
    msg = L.simt_last_error().decode()
    for w in words:
        assert w in msg, msg
    return msg


SCHEDULES = ["in_order", "reversed", "random"]


# ---- tensor-core instructions vs a scalar model ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_mma_m16n8k16_matches_scalar_product(L, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(16, 16, generator=g).to(dtype)
    B = torch.randn(16, 8, generator=g).to(dtype)
    Cm = torch.randn(16, 8, generator=g)
    if seed == 3:  # extremes: exact cancellation, large magnitudes, zeros
        A[0] = 0
        A[1, :8], A[1, 8:] = 1000, -1000
        B[:, 0] = 1
    D = torch.full((16, 8), float("nan"))
    check(L.simt_test_mma(P(A.view(torch.int16)), P(B.view(torch.int16)), P(Cm), P(D),
                          int(dtype == torch.bfloat16)), L)
    ref = (A.double() @ B.double() + Cm.double()).float()
    torch.testing.assert_close(D, ref, rtol=1e-6, atol=1e-6)
    # A wrong fragment layout (a1 <-> a2 swapped: rows g+8 vs columns 2t+8) is not equivalent.
    Aswap = A.clone()
    Aswap[8:, :8], Aswap[:8, 8:] = A[:8, 8:].clone(), A[8:, :8].clone()
    if seed != 3:
        assert not torch.allclose((Aswap.double() @ B.double() + Cm.double()).float(), D)


def ldmatrix_model(src: np.ndarray, trans: bool) -> np.ndarray:
    """PTX ISA ldmatrix .x4: lane l, register j holds matrix j's (row l/4, cols 2(l%4), +1);
    with .trans (rows 2(l%4), +1 of column l/4). Low half = first element."""
    M = src.reshape(4, 8, 8).astype(np.uint32)
    out = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        for j in range(4):
            lo, hi = (M[j, c, r], M[j, c + 1, r]) if trans else (M[j, r, c], M[j, r, c + 1])
            out[lane, j] = lo | (hi << 16)
    return out


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("pitch", [8, 24, 64])
def test_ldmatrix_x4_layout(L, trans, pitch):
    src = torch.arange(256, dtype=torch.int32).to(torch.int16) * 7 + 3
    out = torch.zeros(32, 4, dtype=torch.int32)
    check(L.simt_test_ldmatrix(P(src), P(out), int(trans), pitch), L)
    got = out.numpy().view(np.uint32)
    want = ldmatrix_model(src.numpy().view(np.uint16), trans)
    np.testing.assert_array_equal(got, want)


def test_ldmatrix_misaligned_row_is_an_error(L):
    src = torch.zeros(256, dtype=torch.int16)
    out = torch.zeros(32, 4, dtype=torch.int32)
    expect_error(L.simt_test_ldmatrix(P(src), P(out), 0, 12), L, "ldmatrix", "aligned")


def test_ex2_approx_ftz(L):
    x = torch.tensor([0.0, 1.0, -1.0, 10.5, -126.5, -149.0, -200.0, 127.9, 128.0,
                      float("-inf"), float("inf"), 1e-42, -1e-42, 3.3], dtype=torch.float32)
    y = torch.full_like(x, 7.0)
    check(L.simt_test_ex2(P(x), P(y), x.numel()), L)
    want = torch.exp2(x.double())
    want[(want < 2.0 ** -126) & (want > 0)] = 0.0  # subnormal results flush to zero
    want[want > torch.finfo(torch.float32).max] = float("inf")
    torch.testing.assert_close(y.double(), want, rtol=2 ** -22, atol=0)
    assert y[1].item() == 2.0 and y[9].item() == 0.0 and y[10].item() == float("inf")


# ---- barriers and schedules ----

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_barrier_and_schedules(L, schedule):
    """With the barrier every schedule gives the right answer; without it at least one of
    them exposes the race (the in-order one: thread 0 reads slot n-1 before thread n-1 ran)."""
    inp = torch.arange(3 * 96, dtype=torch.int32)
    want = inp.view(3, 96).flip(1).reshape(-1)
    with sb.configured(schedule=schedule, seed=7):
        out = torch.zeros_like(inp)
        check(L.simt_test_reverse(P(inp), P(out), 3, 96, 1), L)
        assert torch.equal(out, want)


def test_missing_barrier_is_visible_under_two_schedules(L):
    inp = torch.arange(96, dtype=torch.int32)
    want = inp.flip(0)
    wrong = 0
    for schedule in ("in_order", "reversed"):
        with sb.configured(schedule=schedule):
            out = torch.zeros_like(inp)
            check(L.simt_test_reverse(P(inp), P(out), 1, 96, 0), L)
            wrong += int(not torch.equal(out, want))
    assert wrong == 2, "each schedule alone must expose the missing barrier"


def test_syncthreads_or_and_count(L):
    for threads, preds in [(64, [0] * 64), (64, [1] * 64), (100, [i % 3 == 0 for i in range(100)])]:
        pred = torch.tensor(preds, dtype=torch.int32)
        out = torch.zeros(threads, 3, dtype=torch.int32)
        check(L.simt_test_sync_reduce(P(pred), P(out), threads), L)
        n = int(pred.sum())
        assert (out[:, 0] == int(n > 0)).all() and (out[:, 1] == int(n == threads)).all()
        assert (out[:, 2] == n).all()


def test_deadlock_is_reported_not_hung(L):
    out = torch.zeros(64, dtype=torch.int32)
    msg = expect_error(L.simt_test_deadlock(P(out)), L, "deadlock", "deadlock_kernel")
    assert "__syncthreads" in msg


# ---- warp collectives ----

def warp_model(vals, mask, src, delta, width):
    out = np.full((32, 8), -1, dtype=np.int64)
    lanes = [l for l in range(32) if mask >> l & 1]
    ballot = sum(1 << l for l in lanes if vals[l] & 1)
    for l in lanes:
        seg = l & ~(width - 1)
        def get(s):
            return vals[s] if (mask >> s & 1) else None
        out[l, 0] = get(seg + ((src + l) & (width - 1))) or 0
        out[l, 1] = get(l - delta) if l - seg >= delta else vals[l]
        out[l, 2] = get(l + delta) if (l - seg) + delta < width else vals[l]
        x = l ^ delta
        out[l, 3] = get(x) if x < seg + width else vals[l]
        out[l, 4] = ballot - (1 << 32) if ballot >= 1 << 31 else ballot
        out[l, 5] = int(any(vals[s] > 1000 for s in lanes))
        out[l, 6] = int(all(vals[s] >= 0 for s in lanes))
        out[l, 7] = sum(vals[s] & 1 for s in lanes)
    return out


@pytest.mark.parametrize("mask,src,delta,width", [
    (0xFFFFFFFF, 0, 1, 32), (0xFFFFFFFF, 5, 3, 32), (0xFFFFFFFF, 1, 2, 8),
    (0xFFFFFFFF, 31, 16, 32), (0xFFFFFFFF, 3, 4, 16), (0x0000FFFF, 2, 1, 16)])
@pytest.mark.parametrize("schedule", ["in_order", "random"])
def test_warp_collectives(L, mask, src, delta, width, schedule):
    rng = np.random.default_rng(mask ^ src ^ delta)
    vals = [int(v) for v in rng.integers(0, 2000, size=32)]
    inp = torch.tensor(vals, dtype=torch.int32)
    out = torch.zeros(32, 8, dtype=torch.int32)
    with sb.configured(schedule=schedule, seed=3):
        check(L.simt_test_warp(P(inp), P(out), mask, src, delta, width), L)
    want = warp_model(vals, mask, src, delta, width)
    got = out.numpy().astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_shuffle_from_a_lane_outside_the_mask_is_poisoned(L):
    """Reading a lane outside the mask is undefined: the emulator returns a poison value."""
    vals = list(range(100, 132))
    inp = torch.tensor(vals, dtype=torch.int32)
    out = torch.zeros(32, 8, dtype=torch.int32)
    check(L.simt_test_warp(P(inp), P(out), 0x0000FFFF, 20, 1, 32), L)
    for lane in range(16):
        src = (20 + lane) % 32
        got = out[lane, 0].item() & 0xFFFFFFFF
        if src < 16:
            assert got == vals[src]
        else:
            assert got == 0xDEAD0000 | lane, hex(got)


def test_double_shuffle(L):
    inp = torch.randn(32, dtype=torch.float64)
    out = torch.zeros(32, dtype=torch.float64)
    check(L.simt_test_shfl_double(P(inp), P(out)), L)
    torch.testing.assert_close(out, torch.full((32,), inp.sum().item(), dtype=torch.float64))


def test_collective_naming_an_exited_lane_is_an_error(L):
    out = torch.zeros(32, dtype=torch.int32)
    expect_error(L.simt_test_exited_lane(P(out)), L, "exited")


# ---- clusters and shared memory ----

@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cluster_distributed_shared_memory(L, cluster, schedule):
    blocks, threads = 8, 64
    out = torch.zeros(blocks, threads, 4, dtype=torch.int32)
    with sb.configured(schedule=schedule, seed=5):
        check(L.simt_test_cluster(P(out), blocks, threads, cluster), L)
    for b in range(blocks):
        rank, base = b % cluster, b - b % cluster
        for t in range(threads):
            other = (rank + 1 + t) % cluster
            assert out[b, t].tolist() == [cluster, other, base + other,
                                          (base + other) * 10 + t % 4]


def test_dsmem_of_an_exited_block_is_an_error(L):
    out = torch.zeros(1, dtype=torch.int32)
    expect_error(L.simt_test_dsmem_after_exit(P(out)), L, "exited")


def test_cp_async_lands_at_the_wait(L):
    src = torch.tensor([11, 22, 33, 44], dtype=torch.int32)
    out = torch.zeros(12, dtype=torch.int32)
    check(L.simt_test_cp_async(P(src), P(out)), L)
    pattern = [0xA0A0A0A0 + i - (1 << 32) for i in range(4)]
    assert out[:4].tolist() == pattern, "a read before cp.async.wait_group must see stale data"
    assert out[4:8].tolist() == [11, 22, 33, 44]
    assert out[8:].tolist() == [0, 0, 0, 0], "src-size 0 zero-fills"


def test_shared_memory_starts_as_garbage(L):
    out = torch.zeros(256, dtype=torch.int32)
    check(L.simt_test_garbage(P(out), 256), L)
    assert (out != 0).sum() > 200


def test_dynamic_shared_memory_above_48k_needs_the_attribute(L):
    expect_error(L.simt_test_big_smem(100 * 1024, 0), L, "dynamic shared memory")
    check(L.simt_test_big_smem(100 * 1024, 1), L)
    assert L.simt_test_big_smem(300 * 1024, 1) != 0  # above the device's 227 KB


@pytest.mark.skipif(sys.platform != "linux", reason="needs the GNU ASan runtime")
def test_shared_memory_overflow_is_caught_by_asan():
    """The sanitized build reports an out-of-bounds shared-memory write (the role of
    compute-sanitizer memcheck)."""
    asan = sb.sanitizer_runtime("asan")
    if asan is None:
        pytest.skip("libasan not found")
    so = sb.build(variant="asan")
    code = ("import ctypes, sys; L = ctypes.CDLL(sys.argv[1]); L.simt_test_smem_overflow(16)")
    env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0")
    r = subprocess.run([sys.executable, "-c", code, str(so)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, r.stderr[-3000:]
