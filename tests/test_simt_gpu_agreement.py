"""Agreement of the SIMT emulation with the hardware (needs a GPU; part of scripts/gpu_check):

- the emulated mma.sync / ldmatrix / ex2.approx twins and the real instructions on the same
  random fragments (csrc/simt/selftest.cu compiled by nvcc for the GPU and by the host compiler
  for the emulation: one source);
- the emulated kernels and the real ones (torch.ops.specrt on CUDA) on a fixed set of inputs:
  bit-exact for sampling and the cache ops, attention within the GPU tolerance (the tensor
  cores' fp32 accumulation order is not specified), the max difference printed.
"""
from __future__ import annotations

import ctypes as C
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import simt_backend as sb

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None,
                       reason="needs a CUDA device and nvcc"),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_lib():
    out = ROOT / "build" / "simt-gpu"
    out.mkdir(parents=True, exist_ok=True)
    so = out / "libsimt_selftest_gpu.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O2",
                    "-arch=sm_90a", "-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc/include"),
                    str(ROOT / "csrc/simt/selftest.cu"), "-o", str(so)], check=True)
    return C.CDLL(str(so))


def P(t):
    return C.c_void_p(t.data_ptr())


@pytest.mark.parametrize("bf16", [0, 1])
def test_mma_twin_equals_hardware(gpu_lib, bf16):
    emu = sb.lib()
    dtype = torch.bfloat16 if bf16 else torch.float16
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(16, 16, generator=g).to(dtype)
        B = torch.randn(16, 8, generator=g).to(dtype)
        Cm = torch.randn(16, 8, generator=g)
        if seed % 2:  # small integers: exact in any summation order -> bit-exact
            A, B = A.round().clamp(-4, 4), B.round().clamp(-4, 4)
            Cm = Cm.round()
        d_emu = torch.full((16, 8), float("nan"))
        assert emu.simt_test_mma(P(A.view(torch.int16)), P(B.view(torch.int16)), P(Cm),
                                 P(d_emu), bf16) == 0
        Ag, Bg, Cg = A.cuda(), B.cuda(), Cm.cuda()
        d_gpu = torch.full((16, 8), float("nan"), device="cuda")
        assert gpu_lib.simt_test_mma(P(Ag.view(torch.int16)), P(Bg.view(torch.int16)), P(Cg),
                                     P(d_gpu), bf16) == 0
        torch.cuda.synchronize()
        if seed % 2:
            assert torch.equal(d_gpu.cpu(), d_emu)
        else:
            torch.testing.assert_close(d_gpu.cpu(), d_emu, rtol=4e-7, atol=4e-7)


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_twin_equals_hardware(gpu_lib, trans):
    emu = sb.lib()
    src = torch.randint(-30000, 30000, (256,), dtype=torch.int16)
    for pitch in (8, 24, 64):
        o_emu = torch.zeros(32, 4, dtype=torch.int32)
        assert emu.simt_test_ldmatrix(P(src), P(o_emu), trans, pitch) == 0
        o_gpu = torch.zeros(32, 4, dtype=torch.int32, device="cuda")
        assert gpu_lib.simt_test_ldmatrix(P(src.cuda()), P(o_gpu), trans, pitch) == 0
        torch.cuda.synchronize()
        assert torch.equal(o_gpu.cpu(), o_emu)


def test_ex2_twin_close_to_hardware(gpu_lib):
    emu = sb.lib()
    x = torch.linspace(-150, 130, 4001)
    y_emu = torch.empty_like(x)
    assert emu.simt_test_ex2(P(x), P(y_emu), x.numel()) == 0
    y_gpu = torch.empty(x.numel(), device="cuda")
    assert gpu_lib.simt_test_ex2(P(x.cuda()), P(y_gpu), x.numel()) == 0
    torch.cuda.synchronize()
    torch.testing.assert_close(y_gpu.cpu(), y_emu, rtol=2.0 ** -21, atol=0)


def test_kernels_agree_on_fixed_inputs():
    from test_attention import make_case, random_batch
    from test_cache_ops import make_rollback_case
    from test_sampling_gpu import req, run_rs, tree_batch
    from test_simt_attention import run_emulated
    from test_simt_cache import emu_rollback
    from test_simt_sampling import emu_rs

    # attention: both paths, split and unsplit
    rng = random.Random(3)
    prefixes, parents = random_batch(3, rng, sizes=(1, 7, 16), max_prefix=300)
    case = make_case(prefixes, parents, 8, 2, 128, 16, torch.bfloat16, seed=3)
    gcase = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    from test_attention_gpu import run_cuda
    for path in ("cuda_cores", "tensor_cores"):
        os.environ["SPECRT_ATTN_PATH"] = path
        try:
            for split in (False, True):
                g_out, g_lse = run_cuda(gcase, split)
                e_out, e_lse, _ = run_emulated(case, split, path, "in_order",
                                               num_sms=torch.cuda.get_device_properties(0)
                                               .multi_processor_count)
                diff = (g_out.cpu().float() - e_out.float()).abs().max().item()
                print(f"attention {path} split={split}: max |gpu - emulated| = {diff:.3g}")
                torch.testing.assert_close(g_out.cpu(), e_out, atol=1e-2, rtol=1e-2)
                torch.testing.assert_close(g_lse.cpu(), e_lse, atol=1e-4, rtol=1e-5)
        finally:
            del os.environ["SPECRT_ATTN_PATH"]
    # sampling: bit-exact (dyadic logits), the device's SM count so the cluster widths match
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(4)
    logits, tokens, par, indptr = tree_batch([7, 16, 1, 2], 32000, gen)
    prm = req(4, gen)
    gpu = run_rs("cuda", logits, tokens, par, indptr, None, prm, None, 20)
    emu = emu_rs(logits, tokens, par, indptr, None, prm, None, 20, num_sms=sms)
    for a, b in zip(gpu, emu):
        assert torch.equal(a, b)
    # rollback: bit-exact
    case = make_rollback_case(5, 3, 16, [7, 64, 12], kind="tree", num_layers=4,
                              num_kv_heads=2, head_dim=64, dtype=torch.float16)
    kv, bt, lens, path, na = case
    kv_g, lens_g = kv.cuda(), lens.cuda()
    torch.ops.specrt.kv_rollback(kv_g, bt.cuda(), lens_g, path.cuda(), na.cuda())
    kv_e, lens_e, _ = emu_rollback(case, "in_order", num_sms=sms)
    assert torch.equal(lens_g.cpu(), lens_e)
    assert torch.equal(kv_g.cpu().view(torch.int16), kv_e.view(torch.int16))
