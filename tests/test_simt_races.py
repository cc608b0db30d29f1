"""Shared-memory race detection for the emulated kernels: the emulation built with
ThreadSanitizer (-DSPECRT_SIMT_TSAN=ON). Every fiber is a TSan fiber, and the emulator tells TSan
exactly which orderings the machine guarantees (block and cluster barriers, __syncwarp,
cp.async landing at its wait), so two threads touching the same bytes with no barrier between,
at least one writing, are reported as a data race, even when the schedule happened to give the
right answer. Runs in a subprocess with the TSan runtime preloaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import simt_backend as sb

pytestmark = pytest.mark.emulated
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tsan_so():
    if sb.sanitizer_runtime("tsan") is None:
        pytest.skip("libtsan not found")
    return sb.build(variant="tsan")


def run_under_tsan(so, code: str):
    env = dict(os.environ, LD_PRELOAD=sb.sanitizer_runtime("tsan"), SPECRT_SIMT_LIB=str(so),
               TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0",
               PYTHONPATH=str(HERE))
    env.pop("ASAN_OPTIONS", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900, cwd=HERE)


def test_race_without_barrier_is_reported(tsan_so):
    code = """
import ctypes, torch, simt_backend as sb
L = sb.lib()
inp = torch.arange(64, dtype=torch.int32); out = torch.zeros_like(inp)
assert L.simt_test_reverse(ctypes.c_void_p(inp.data_ptr()), ctypes.c_void_p(out.data_ptr()), 1, 64, 0) == 0
"""
    r = run_under_tsan(tsan_so, code)
    assert r.returncode == 66 and "data race" in r.stderr, r.stderr[-3000:]
    assert "reverse_kernel" in r.stderr


def test_no_report_with_the_barrier(tsan_so):
    code = """
import ctypes, torch, simt_backend as sb
L = sb.lib()
inp = torch.arange(64, dtype=torch.int32); out = torch.zeros_like(inp)
for blocks in (1, 3):
    assert L.simt_test_reverse(ctypes.c_void_p(inp.data_ptr()), ctypes.c_void_p(out.data_ptr()), 1, 64, 1) == 0
outc = torch.zeros(8, 32, 4, dtype=torch.int32)
assert L.simt_test_cluster(ctypes.c_void_p(outc.data_ptr()), 8, 32, 4) == 0
print("clean")
"""
    r = run_under_tsan(tsan_so, code)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr[-3000:]


KERNEL_CASES = """
import random, torch, simt_backend as sb
from test_attention import make_case, random_batch, random_parents, run_ref
from test_simt_attention import run_emulated
from test_sampling_gpu import req, tree_batch, dyadic_q
from test_simt_sampling import emu_rs, emu_sample
from test_cache_ops import make_rollback_case, make_append_case
from test_simt_cache import emu_rollback
rng = random.Random(1)
prefixes, parents = random_batch(2, rng, sizes=(1, 7, 16), max_prefix=200)
prefixes[0] = 200
case = make_case(prefixes, parents, 8, 2, 64, 16, torch.float16, seed=1)
for path in ("cuda_cores", "tensor_cores"):
    for split in (False, True):
        run_emulated(case, split, path, "in_order")
# D = 256 (16-key mma tiles, 32-key CUDA-core tiles), GQA 3, one-token pages, a long split
case = make_case([150, 40], [random_parents(16, rng), random_parents(3, rng)], 6, 2, 256, 1,
                 torch.bfloat16, seed=2)
for path in ("cuda_cores", "tensor_cores"):
    run_emulated(case, True, path, "in_order")
gen = torch.Generator().manual_seed(2)
logits, tokens, par, indptr = tree_batch([7, 3], 10000, gen)
prm = req(2, gen)
emu_rs(logits, tokens, par, indptr, None, prm, None, 8, num_sms=2)
from test_simt_sampling import crafted_sibling_case
lg, tk, pa, ip, pr = crafted_sibling_case(10000)
emu_rs(lg, tk, pa, ip, None, pr, None, 4)
for seed in range(6):  # sampled trees: rejections, accepted siblings, residual draws
    gen = torch.Generator().manual_seed(10 + seed)
    logits, tokens, par, indptr = tree_batch([16, 7, 9], 111 if seed % 2 else 10000, gen)
    emu_rs(logits, tokens, par, indptr, None, req(3, gen, greedy_every=100), None, 16,
           num_sms=4)
logits, tokens, par, indptr = tree_batch([4], 10000, gen, chain=True)
emu_rs(logits, tokens, par, indptr, dyadic_q(logits, gen), req(1, gen), None, 4)
emu_sample(logits[:1], req(1, gen), None)
emu_rollback(make_rollback_case(3, 2, 16, [16, 7], kind="tree", num_layers=2,
                                num_kv_heads=2, head_dim=64, dtype=torch.float16),
             "in_order")
emu_rollback(make_rollback_case(4, 1, 16, [40], kind="tree", num_layers=4, num_kv_heads=2,
                                head_dim=64, dtype=torch.float16), "in_order")  # cluster of 8
kv, layer, k, v, slots = make_append_case(5, 9, 4)
sb.append_kv(k, v, kv[layer, 0], kv[layer, 1], slots)
print("clean")
"""


def test_kernels_are_race_free(tsan_so):
    """Representative launches of every kernel and path (tensor cores and CUDA cores, split and
    unsplit attention, D 64 and 256, clustered rejection sampling on sampled trees with
    rejections, sampling, rollback with clusters of 2 and 8, append_kv): no race reported."""
    r = run_under_tsan(tsan_so, KERNEL_CASES)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr[-5000:]
