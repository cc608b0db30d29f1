"""Fused CPU row-wise layer ops (ops.rms_norm, ops.rope_, ops.silu_mul) and the fused residual
of ops.linear: against the reference tensor expressions (transformers' Llama order), row
independence (bit-exact), strided inputs, bad input, and the model with the fused path on/off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specrt import ops
from specrt.models import llama

from _tiny import tiny_model
from test_cpu_linear import _chain_logits

DTYPES = [torch.float32, torch.bfloat16]


def _ref_rms(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _ref_rope(qk, cos, sin, heads, d):
    n = qk.shape[0]
    out = qk.clone()
    h = out[:, : heads * d].view(n, heads, d)
    c, s = cos[:, None], sin[:, None]
    x1, x2 = h[..., : d // 2], h[..., d // 2:]
    h.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", [(1, 1), (3, 15), (5, 64), (8, 576), (70, 1000)])
def test_rms_norm_matches_reference(dtype, m, h):
    g = torch.Generator().manual_seed(m * 1000 + h)
    x = (torch.randn(m, h, generator=g) * 3).to(dtype)
    w = torch.randn(h, generator=g).to(dtype)
    y = ops.rms_norm(x, w, 1e-5)
    ref = _ref_rms(x, w, 1e-5)
    # fp32: the variance's summation order differs; bf16: at most one bf16 ulp after that
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(y.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_equals_reference_bitwise(dtype):
    """Each product and sum is rounded in the dtype as the reference does, so equal bits."""
    g = torch.Generator().manual_seed(7)
    for m, heads, d, extra in [(1, 1, 2, 0), (4, 12, 64, 128), (9, 5, 34, 3), (33, 2, 128, 0)]:
        qk = torch.randn(m, heads * d + extra, generator=g).to(dtype)
        ang = torch.rand(m, d // 2, generator=g) * 50
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        ref = _ref_rope(qk, cos, sin, heads, d)
        out = ops.rope_(qk.clone(), cos, sin, heads, d)
        assert torch.equal(out, ref), (m, heads, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(6, 2 * 1537, generator=g) * 6).to(dtype)
    gu[0, :4] = torch.tensor([0.0, -0.0, 100.0, -100.0])  # saturated and signed zeros
    y = ops.silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    tol = dict(rtol=3e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    assert torch.isnan(ops.silu_mul(torch.tensor([[float("nan"), 1.0]], dtype=dtype))).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_are_independent(dtype):
    """A row's result is the same bits whatever else is in the batch (draft trees rely on it)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 576, generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    gu = torch.randn(40, 3072, generator=g).to(dtype)
    ang = torch.rand(40, 32, generator=g)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    whole = (ops.rms_norm(x, w, 1e-6), ops.silu_mul(gu),
             ops.rope_(x.clone(), cos, sin, 9, 64))
    for r in (0, 17, 39):
        one = (ops.rms_norm(x[r:r + 1], w, 1e-6), ops.silu_mul(gu[r:r + 1]),
               ops.rope_(x[r:r + 1].clone(), cos[r:r + 1], sin[r:r + 1], 9, 64))
        for a, b in zip(whole, one):
            assert torch.equal(a[r:r + 1], b)


def test_strided_rows_and_in_place():
    x = torch.randn(5, 100)[:, 10:74]  # row stride 100
    w = torch.randn(64)
    assert torch.equal(ops.rms_norm(x, w, 1e-5), ops.rms_norm(x.contiguous(), w, 1e-5))
    out = torch.empty(5, 64)
    assert ops.rms_norm(x, w, 1e-5, out=out) is out
    y = x.contiguous()
    ops.rms_norm(y, w, 1e-5, out=y)  # in place
    assert torch.equal(y, out)
    gu = torch.randn(4, 300)[:, :200]
    assert torch.equal(ops.silu_mul(gu), ops.silu_mul(gu.contiguous()))


@pytest.mark.skipif(not ops.linear_isa(torch.float32), reason="ops.linear needs AVX-512")
@pytest.mark.parametrize("dtype", [torch.float32] + (
    [torch.bfloat16] if ops.linear_isa(torch.bfloat16) else []))
def test_linear_residual_is_the_unfused_sum(dtype):
    """residual + linear(x): the same bits as the two ops (bf16: the GEMM result rounded before
    the add, as in torch), also written over the residual itself."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 97, generator=g).to(dtype)
    w = torch.randn(45, 97, generator=g).to(dtype)
    b = torch.randn(45, generator=g).to(dtype)
    r = torch.randn(7, 45, generator=g).to(dtype)
    p = ops.pack_linear(w)
    expect = r + ops.linear(x, p, b)
    assert torch.equal(ops.linear(x, p, b, residual=r), expect)
    r2 = r.clone()
    assert ops.linear(x, w, b, residual=r2, out=r2) is r2
    assert torch.equal(r2, expect)
    with pytest.raises(ops.SpecrtInputError, match="residual"):
        ops.linear(x, p, b, residual=r[:3])
    with pytest.raises(RuntimeError, match="alias"):
        ops.linear(x[:6], p, b, residual=r2[1:], out=r2[:-1])


def test_bad_input_raises():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x.double(), torch.ones(8, dtype=torch.double), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="eps"):
        ops.rms_norm(x, torch.ones(8), -1.0)
    with pytest.raises(RuntimeError, match="even"):
        ops.rope_(x, torch.ones(3, 1), torch.ones(3, 1), 1, 3)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.rope_(x, torch.ones(3, 2), torch.ones(3, 2), 3, 4)
    with pytest.raises(RuntimeError, match="cos"):
        ops.rope_(x, torch.ones(2, 2), torch.ones(3, 2), 2, 4)
    with pytest.raises(RuntimeError, match="even number"):
        ops.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="out"):
        ops.silu_mul(torch.randn(2, 8), out=torch.empty(2, 3))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_fused_path_matches_reference_ops(monkeypatch, arch):
    """The model's logits with the fused CPU ops on and off agree to fp32 round-off (off: the
    reference's tensor ops)."""
    model = tiny_model(seed=9, arch=arch)
    prefix, chain = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]
    fused = _chain_logits(model, chain, prefix, one_at_a_time=False)
    monkeypatch.setattr(llama, "CPU_FUSED_OPS", False)
    ref = _chain_logits(model, chain, prefix, one_at_a_time=False)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
