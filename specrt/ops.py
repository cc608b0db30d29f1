"""The public op surface: validated wrappers over ``torch.ops.specrt.*``.

Each wrapper checks devices, dtypes and shapes (cheap, always), then calls the registered op.
Index values (page ids, slots, tree shapes, token ids) are checked by the CPU kernels themselves
before they write anything (a ``RuntimeError`` naming the problem); CUDA kernels skip what is
out of range rather than fault. With ``strict_checks`` on, the wrapper also reads the index
tensors on the host and raises :class:`SpecrtInputError` first (one device sync per op on CUDA;
never while a CUDA graph is being captured). The exact semantics are in
``docs/ops.md``; ``specrt.reference`` is their plain-PyTorch oracle.

Outputs follow destination passing: pass ``out=`` tensors to reuse buffers (CUDA graphs), or
let the wrapper allocate them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ._ext import load_extension

__all__ = [
    "SpecrtInputError",
    "tree_attention",
    "append_kv",
    "kv_rollback",
    "rejection_sample",
    "sample",
    "VerifyOutput",
    "plan_tree_attention",
    "strict_checks",
    "linear",
    "linear_isa",
    "pack_linear",
    "PackedLinear",
]

#: Check index values in the wrapper too (costs a host read, a device sync on CUDA). Set
#: ``SPECRT_STRICT=1`` or assign ``specrt.ops.strict_checks = True``.
strict_checks = os.environ.get("SPECRT_STRICT", "0") == "1"

_HALF = (torch.float16, torch.bfloat16)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class SpecrtInputError(ValueError):
    """Raised by ``specrt.ops`` for invalid arguments (before anything is written)."""


def _op(name: str):
    load_extension()
    return getattr(torch.ops.specrt, name)


def _fail(msg: str):
    raise SpecrtInputError(msg)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        _fail(msg)


def _check_tensor(name, t, dtypes=None, ndim=None, device=None):
    _need(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
        _need(t.dtype in dtypes, f"{name}: dtype {t.dtype} not in {[str(d) for d in dtypes]}")
    if ndim is not None:
        _need(t.dim() == ndim, f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None:
        _need(t.device == device, f"{name}: on {t.device}, expected {device}")


def _values_checkable(*ts: torch.Tensor) -> bool:
    """Index values are read on the host under strict_checks, unless a graph is being
    captured."""
    if not strict_checks:
        return False
    if all(t.device.type == "cpu" for t in ts):
        return True
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_indptr(name, indptr, n_rows=None):
    _check_tensor(name, indptr, torch.int32, 1)
    _need(indptr.numel() >= 2, f"{name}: needs at least 2 entries (batch >= 1)")
    if _values_checkable(indptr):
        v = indptr.cpu()
        _need(int(v[0]) == 0, f"{name}[0] must be 0, got {int(v[0])}")
        d = v[1:] - v[:-1]
        _need(bool((d >= 1).all()), f"{name}: every sequence needs >= 1 row (non-decreasing, no empties)")
        if n_rows is not None:
            _need(int(v[-1]) == n_rows, f"{name}[-1] = {int(v[-1])} but there are {n_rows} rows")


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask=None, *,
                   sm_scale: Optional[float] = None, out=None, lse=None,
                   return_lse: bool = False, plan=None, workspace=None, validate: bool = True):
    """Attention of new tokens (a draft tree, chain, Lookahead window or one token per
    sequence) against a paged KV cache whose committed prefix is fully visible.

    Parameters
    ----------
    q : [N, Hq, D] fp16/bf16 (fp32 on CPU)
        Queries of the new tokens, ragged over the batch by ``qo_indptr``.
    k_cache, v_cache : [num_pages, page_size, Hkv, D], dtype of q
        One layer of the paged cache (``kv[l, 0]``, ``kv[l, 1]``); ``Hq % Hkv == 0``.
    block_table : int32 [B, max_pages]
    seq_lens : int32 [B]
        KV length of each sequence including its new tokens (already appended).
    qo_indptr : int32 [B+1]
    mask : int32 [N, W] or None
        Packed visibility among the new tokens (``specrt.tree``); None = causal.
    sm_scale : float, default ``1/sqrt(D)``
    out : [N, Hq, D], optional
    lse : float32 [N, Hq], optional
        Written when given (or allocated when ``return_lse``).
    plan, workspace : optional
        CUDA split-KV plan from :func:`plan_tree_attention` (ignored on CPU).
    validate : bool
        False skips the Python-side checks (hot path, for inputs the engine built itself;
        the CPU op still validates index values, the CUDA kernel skips invalid ones).

    Returns
    -------
    out, or ``(out, lse)`` when ``return_lse`` or ``lse`` is given.
    """
    if not validate:
        out = torch.empty_like(q) if out is None else out
        if lse is None and return_lse:
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        _op("tree_attention")(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, out,
                              lse, float(scale), plan, workspace)
        return (out, lse) if lse is not None else out
    _check_tensor("q", q, _FLOAT, 3)
    dev = q.device
    if dev.type == "cuda":
        _need(q.dtype in _HALF, f"q: CUDA tree_attention takes fp16/bf16, got {q.dtype}")
    n, hq, d = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, c, q.dtype, 4, dev)
        _need(c.stride(-1) == 1, f"{name}: last dim must be contiguous")
    _need(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}")
    num_pages, page_size, hkv, dk = k_cache.shape
    _need(dk == d, f"head_dim of q ({d}) != head_dim of the cache ({dk})")
    _need(hkv > 0 and hq % hkv == 0, f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if dev.type == "cuda":
        _need(d in (64, 128, 256), f"CUDA tree_attention supports head_dim 64/128/256, got {d}")
        _need(page_size & (page_size - 1) == 0 and page_size <= 128,
              f"page_size must be a power of two <= 128, got {page_size}")
    _check_tensor("block_table", block_table, torch.int32, 2, dev)
    _check_tensor("seq_lens", seq_lens, torch.int32, 1, dev)
    _check_tensor("qo_indptr", qo_indptr, torch.int32, 1, dev)
    b = seq_lens.shape[0]
    _need(qo_indptr.shape[0] == b + 1, f"qo_indptr has {qo_indptr.shape[0]} entries, expected {b + 1}")
    _need(block_table.shape[0] == b, f"block_table has {block_table.shape[0]} rows, expected {b}")
    if mask is not None:
        _check_tensor("mask", mask, torch.int32, 2, dev)
        _need(mask.shape[0] == n, f"mask has {mask.shape[0]} rows, expected {n}")
    if _values_checkable(qo_indptr, seq_lens, block_table):
        _check_indptr("qo_indptr", qo_indptr, n)
        qi = qo_indptr.cpu().long()
        t = qi[1:] - qi[:-1]
        sl = seq_lens.cpu().long()
        _need(bool((sl >= t).all()), "seq_lens must include the new tokens (seq_lens >= T per sequence)")
        need_pages = (sl + page_size - 1) // page_size
        _need(bool((need_pages <= block_table.shape[1]).all()),
              "block_table is too narrow for seq_lens")
        bt = block_table.cpu()
        cols = torch.arange(bt.shape[1])[None, :] < need_pages[:, None]
        used = bt[cols]
        _need(bool(((used >= 0) & (used < num_pages)).all()),
              f"block_table holds page ids outside [0, {num_pages}) within seq_lens")
        if mask is not None:
            _need(mask.shape[1] * 32 >= int(t.max()), "mask is too narrow for the largest tree")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    if out is None:
        out = torch.empty_like(q)
    else:
        _check_tensor("out", out, q.dtype, 3, dev)
        _need(out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    if lse is None and return_lse:
        lse = torch.empty((n, hq), dtype=torch.float32, device=dev)
    if lse is not None:
        _check_tensor("lse", lse, torch.float32, 2, dev)
        _need(tuple(lse.shape) == (n, hq), f"lse shape {tuple(lse.shape)} != {(n, hq)}")
    _op("tree_attention")(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, out, lse,
                          float(sm_scale), plan, workspace)
    return (out, lse) if lse is not None else out


def plan_tree_attention(qo_indptr, seq_lens, num_qo_heads, num_kv_heads, head_dim, page_size,
                        device, num_sms=None):
    """Host-side split-KV plan for the CUDA kernel (``specrt.attention_plan``); returns
    ``(plan, workspace)`` to pass to :func:`tree_attention`, or ``(None, None)`` on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None
    from .attention_plan import plan_tree_attention as _plan

    return _plan(qo_indptr.cpu(), seq_lens.cpu(), num_qo_heads, num_kv_heads, head_dim,
                 page_size, num_sms, device)


def append_kv(k, v, k_cache, v_cache, slot_mapping, *, validate: bool = True) -> None:
    """Write the K/V of new tokens into one layer of the paged cache.

    Parameters
    ----------
    k, v : [N, Hkv, D], dtype of the cache
    k_cache, v_cache : [num_pages, page_size, Hkv, D] (written in place)
    slot_mapping : int64 [N]
        ``page * page_size + offset`` per row; -1 skips the row.
    validate : bool
        False skips the Python-side checks (see :func:`tree_attention`).
    """
    if not validate:
        _op("append_kv")(k, v, k_cache, v_cache, slot_mapping)
        return
    _check_tensor("k_cache", k_cache, _FLOAT, 4)
    dev, dt = k_cache.device, k_cache.dtype
    _check_tensor("v_cache", v_cache, dt, 4, dev)
    _need(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    num_pages, page_size, hkv, d = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        _check_tensor(name, x, dt, 3, dev)
        _need(tuple(x.shape[1:]) == (hkv, d), f"{name}: shape {tuple(x.shape)} != [N, {hkv}, {d}]")
    _need(k.shape == v.shape, "k and v shapes differ")
    _check_tensor("slot_mapping", slot_mapping, torch.int64, 1, dev)
    _need(slot_mapping.shape[0] == k.shape[0], f"slot_mapping has {slot_mapping.shape[0]} rows, k has {k.shape[0]}")
    if _values_checkable(slot_mapping) and slot_mapping.numel():
        s = slot_mapping.cpu()
        _need(bool(((s >= -1) & (s < num_pages * page_size)).all()),
              f"slot_mapping values must be -1 or in [0, {num_pages * page_size})")
    _op("append_kv")(k, v, k_cache, v_cache, slot_mapping)


_LINEAR_ISA: dict = {}


def linear_isa(dtype: torch.dtype) -> str:
    """The instruction set :func:`linear` runs with for ``dtype`` on this CPU ("avx512",
    "avx512_bf16"), or "" when it cannot run here (no AVX-512, or not fp32 / bf16)."""
    if dtype not in _LINEAR_ISA:
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
        _LINEAR_ISA[dtype] = load_extension().linear_isa(name) if name else ""
    return _LINEAR_ISA[dtype]


@dataclass(frozen=True)
class PackedLinear:
    """A weight ``[n, k]`` in the layout :func:`linear` streams fastest (tiles of 4 rows
    interleaved by 64-byte steps, zero padded; csrc/cpu/linear.h). Made by :func:`pack_linear`
    for this CPU; a copy: later changes to the source weight do not reach it."""

    data: torch.Tensor  # 1-D, the weight's dtype
    n: int
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype


def pack_linear(weight) -> PackedLinear:
    """Pack ``weight [n, k]`` (fp32 / bf16, CPU) for :func:`linear`."""
    _check_tensor("weight", weight, (torch.float32, torch.bfloat16), 2, torch.device("cpu"))
    _need(bool(linear_isa(weight.dtype)), "ops.pack_linear needs AVX-512 on this CPU")
    n, k = weight.shape
    name = "float32" if weight.dtype == torch.float32 else "bfloat16"
    data = weight.new_empty(load_extension().linear_packed_size(name, n, k))
    _op("linear_pack")(weight if weight.stride(-1) == 1 else weight.contiguous(), data)
    return PackedLinear(data, n, k)


def linear(x, weight, bias=None, *, residual=None, out=None, validate: bool = True):
    """``x @ weight.T + bias`` on the CPU, for the few rows of a decode or verify step.

    Reads ``weight`` once per call; each output element is one fixed-order dot product, so a
    row's result does not depend on the other rows, on the thread count or on whether the
    weight is packed (docs/cpu_linear.md). Use it where :func:`linear_isa` is non-empty; it
    raises otherwise.

    Parameters
    ----------
    x : [m, k], float32 or bfloat16, CPU, unit last stride
    weight : [n, k] of x's dtype (unit last stride), or a :class:`PackedLinear`
    bias : [n], optional
    residual : [m, n], optional
        Added to the result: ``residual + (x @ weight.T + bias)``, rounded as that expression
        is in torch (the residual stream's add, fused). ``out`` may be ``residual`` itself.
    out : [m, n], optional (allocated when omitted)
    validate : bool
        False skips the Python-side checks (the op still checks devices, dtypes and shapes).
    """
    packed = isinstance(weight, PackedLinear)
    n = weight.n if packed else weight.shape[0]
    w = weight.data if packed else weight
    if not validate:
        if out is None:
            out = x.new_empty(x.shape[0], n)
        _op("linear")(x, w, bias, out, packed, residual)
        return out
    _check_tensor("x", x, (torch.float32, torch.bfloat16), 2, torch.device("cpu"))
    if packed:
        _need(w.dtype == x.dtype, f"packed weight is {w.dtype}, x is {x.dtype}")
        _need(weight.k == x.shape[1], f"packed weight is [{n}, {weight.k}] for x of "
                                      f"{x.shape[1]} columns")
    else:
        _check_tensor("weight", w, x.dtype, 2, x.device)
        _need(w.shape[1] == x.shape[1], f"weight is {tuple(w.shape)} for x of {x.shape[1]} columns")
    if bias is not None:
        _check_tensor("bias", bias, x.dtype, 1, x.device)
        _need(bias.shape[0] == n, f"bias has {bias.shape[0]} entries for {n} weight rows")
    if residual is not None:
        _check_tensor("residual", residual, x.dtype, 2, x.device)
        _need(tuple(residual.shape) == (x.shape[0], n),
              f"residual is {tuple(residual.shape)}, expected [{x.shape[0]}, {n}]")
    _need(bool(linear_isa(x.dtype)), "ops.linear needs AVX-512 on this CPU (linear_isa is empty)")
    if out is None:
        out = x.new_empty(x.shape[0], n)
    _op("linear")(x, w, bias, out, packed, residual)
    return out


# ---- fused row-wise decoder-layer ops (CPU; csrc/cpu/layer_ops.h) ----------------------------
# One call each where the reference model makes 5-10 small tensor ops per layer; a row's result
# never depends on the other rows. fp32 / bf16 CPU tensors, 2-D, unit last stride; the op
# checks shapes, dtypes and devices (RuntimeError).

def rms_norm(x, weight, eps: float, *, out=None):
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` per row, the variance in fp32 and the
    weight applied in x's dtype (the reference's order). x [m, h], weight [h]."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _op("rms_norm")(x, weight, float(eps), out)
    return out


def rope_(qk, cos, sin, heads: int, head_dim: int):
    """Rotary embedding (rotate-half layout) in place on the first ``heads`` heads of each row
    of ``qk [m, >= heads * head_dim]``; ``cos`` / ``sin [m, head_dim / 2]`` hold each row's
    angles. Products and sums are rounded in qk's dtype as in the reference. Returns qk."""
    _op("rope")(qk, cos, sin, int(heads), int(head_dim))
    return qk


def silu_mul(gate_up, *, out=None):
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` rows ``[m, 2 * inter]`` -> ``[m, inter]``
    (SiLU rounded to the dtype before the multiply, as in the reference)."""
    if out is None:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _op("silu_mul")(gate_up, out)
    return out


def kv_rollback(kv_cache, block_table, committed_lens, path, num_accepted, *,
                validate: bool = True) -> None:
    """Move each sequence's accepted path K/V to the positions right after its committed
    prefix, in every layer (K and V), and grow ``committed_lens`` by the path length.

    Parameters
    ----------
    kv_cache : [L, 2, num_pages, page_size, Hkv, D] (updated in place)
    block_table : int32 [B, max_pages]
    committed_lens : int32 [B] (updated in place: ``+= num_accepted + 1``)
    path : int32 [B, max_T] (``out_path`` of :func:`rejection_sample`)
    num_accepted : int32 [B] (-1: nothing moves)
    validate : bool
        False skips the Python-side checks (see :func:`tree_attention`).
    """
    if not validate:
        _op("kv_rollback")(kv_cache, block_table, committed_lens, path, num_accepted)
        return
    _check_tensor("kv_cache", kv_cache, _FLOAT, 6)
    dev = kv_cache.device
    _check_tensor("block_table", block_table, torch.int32, 2, dev)
    _check_tensor("committed_lens", committed_lens, torch.int32, 1, dev)
    _check_tensor("path", path, torch.int32, 2, dev)
    _check_tensor("num_accepted", num_accepted, torch.int32, 1, dev)
    b = committed_lens.shape[0]
    _need(block_table.shape[0] == b and path.shape[0] == b and num_accepted.shape[0] == b,
          "block_table, committed_lens, path and num_accepted must agree on the batch size")
    if _values_checkable(path, num_accepted, committed_lens, block_table):
        na = num_accepted.cpu().long()
        _need(bool(((na >= -1) & (na < path.shape[1])).all()), "num_accepted out of range")
        page_size, num_pages = kv_cache.shape[3], kv_cache.shape[2]
        cl, pth, bt = committed_lens.cpu().long(), path.cpu().long(), block_table.cpu().long()
        n = na + 1  # path entries per sequence (0 = nothing moves)
        live = n > 0
        cols = torch.arange(pth.shape[1])[None, :]
        inside = cols < n[:, None]
        _need(bool((pth[live, 0] == 0).all()), "path: every moving sequence's path must start at the root (0)")
        steps = pth[:, 1:] > pth[:, :-1]
        _need(bool((steps | ~inside[:, 1:]).all()), "path: entries must be strictly increasing")
        last = cl + pth.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
        last_page = torch.where(live, last // page_size, torch.full_like(last, -1))
        _need(bool((last_page < bt.shape[1]).all()), "block_table is too narrow for the accepted paths")
        used = torch.arange(bt.shape[1])[None, :] <= last_page[:, None]
        _need(bool(((bt >= 0) & (bt < num_pages) | ~used).all()),
              "block_table does not back the accepted paths (page ids out of range)")
    _op("kv_rollback")(kv_cache, block_table, committed_lens, path, num_accepted)


# --------------------------------------------------------------------------------------------
# sampling and verification
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class VerifyOutput:
    """Result of :func:`rejection_sample` (all int32; -1 padded).

    tokens : [B, max_T] emitted tokens (accepted drafts, then one correction / bonus token)
    path : [B, max_T] accepted local node indices, starting with the root 0
    num_accepted : [B] accepted draft tokens (emitted = accepted + 1; -1 = invalid logits)
    """

    tokens: torch.Tensor
    path: torch.Tensor
    num_accepted: torch.Tensor


def _as_param(name, x, b, dtype, dev):
    if not isinstance(x, torch.Tensor):
        x = torch.full((b,), x, dtype=dtype, device=dev)
    _check_tensor(name, x, dtype, 1, dev)
    _need(x.shape[0] == b, f"{name}: {x.shape[0]} entries, expected {b}")
    return x


def _sampling_params(b, dev, temperature, top_k, top_p, seed, offset):
    # Scalars are checked for free; tensors under strict_checks (below).
    if not isinstance(temperature, torch.Tensor):
        _need(math.isfinite(temperature) and temperature >= 0, "temperature must be finite and >= 0")
    if not isinstance(top_p, torch.Tensor):
        _need(top_p > 0, "top_p must be > 0")
    temperature = _as_param("temperature", temperature, b, torch.float32, dev)
    top_k = _as_param("top_k", top_k, b, torch.int32, dev)
    top_p = _as_param("top_p", top_p, b, torch.float32, dev)
    seed = _as_param("seed", seed, b, torch.int64, dev)
    offset = _as_param("offset", offset, b, torch.int64, dev)
    if _values_checkable(temperature, top_p):
        tc, pc = temperature.cpu(), top_p.cpu()
        _need(bool((tc >= 0).all()) and bool(torch.isfinite(tc).all()),
              "temperature must be finite and >= 0")
        _need(bool((pc > 0).all()), "top_p must be > 0")
    return temperature, top_k, top_p, seed, offset


def rejection_sample(target_logits, draft_tokens, parents, node_indptr, *, draft_probs=None,
                     temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0, uniforms=None,
                     max_t: Optional[int] = None, out: Optional[VerifyOutput] = None,
                     check: bool = True, validate: bool = True) -> VerifyOutput:
    """Verify a batch of draft trees against target logits in one call (docs/ops.md §3).

    Parameters
    ----------
    target_logits : [N, V] fp32/bf16/fp16
        Row of node ``i``: the target's logits for the children of node ``i``.
    draft_tokens : int32 [N]
        Token of each node (the root's entry is ignored).
    parents : int32 [N]
        Local parent index per node (-1 for each root).
    node_indptr : int32 [B+1]
    draft_probs : float32 [N, V], optional
        Draft distributions (chains only); None = deterministic drafts.
    temperature, top_k, top_p, seed, offset : scalars or [B] tensors
        Per-request sampling parameters (temperature 0 = greedy) and Philox key/offset.
    uniforms : float32 [N], optional
        Explicit uniforms replacing Philox (tests).
    max_t : int, optional
        Width of the outputs (default: the largest tree, read on the host).
    check : bool
        Raise if a sequence had invalid (NaN / inf) logits. Costs a host read of
        ``num_accepted`` (which the engine reads anyway).
    validate : bool
        False skips the Python-side checks (hot path): the sampling parameters must then be
        [B] tensors of the op's dtypes, ``max_t`` given, and ``check`` is ignored.

    Returns
    -------
    VerifyOutput
    """
    if not validate:
        b, dev = node_indptr.shape[0] - 1, target_logits.device
        if out is None:
            out = VerifyOutput(torch.empty((b, max_t), dtype=torch.int32, device=dev),
                               torch.empty((b, max_t), dtype=torch.int32, device=dev),
                               torch.empty((b,), dtype=torch.int32, device=dev))
        _op("rejection_sample")(target_logits, draft_tokens, parents, node_indptr, draft_probs,
                                temperature, top_k, top_p, seed, offset, uniforms, out.tokens,
                                out.path, out.num_accepted)
        return out
    _check_tensor("target_logits", target_logits, _FLOAT, 2)
    dev = target_logits.device
    n, vocab = target_logits.shape
    _check_tensor("draft_tokens", draft_tokens, torch.int32, 1, dev)
    _check_tensor("parents", parents, torch.int32, 1, dev)
    _need(draft_tokens.shape[0] == n and parents.shape[0] == n,
          f"draft_tokens / parents need {n} entries (one per logits row)")
    _check_tensor("node_indptr", node_indptr, torch.int32, 1, dev)
    b = node_indptr.shape[0] - 1
    _need(b >= 1, "node_indptr: batch must be >= 1")
    if draft_probs is not None:
        _check_tensor("draft_probs", draft_probs, torch.float32, 2, dev)
        _need(tuple(draft_probs.shape) == (n, vocab), f"draft_probs shape {tuple(draft_probs.shape)} != {(n, vocab)}")
    if uniforms is not None:
        _check_tensor("uniforms", uniforms, torch.float32, 1, dev)
        _need(uniforms.shape[0] == n, f"uniforms needs {n} entries")
    params = _sampling_params(b, dev, temperature, top_k, top_p, seed, offset)
    if _values_checkable(node_indptr, parents, draft_tokens):
        _check_indptr("node_indptr", node_indptr, n)
        ip = node_indptr.cpu().long()
        par, tok = parents.cpu().long(), draft_tokens.cpu().long()
        local = torch.arange(n) - torch.repeat_interleave(ip[:-1], ip[1:] - ip[:-1])
        is_root = local == 0
        _need(bool((par[is_root] == -1).all()), "parents: every root (local node 0) needs parent -1")
        nr = ~is_root
        _need(bool(((par[nr] >= 0) & (par[nr] < local[nr])).all()),
              "parents: not a tree (need 0 <= parents[i] < i for every non-root node)")
        _need(bool(((tok[nr] >= 0) & (tok[nr] < vocab)).all()), f"draft_tokens out of [0, {vocab})")
        if draft_probs is not None:
            # Greedy sequences ignore draft_probs (they may branch); sampled ones verify q.
            seq = torch.repeat_interleave(torch.arange(b), ip[1:] - ip[:-1])
            sampled = (params[0].cpu() > 0)[seq] & nr
            _need(bool((par[sampled] == local[sampled] - 1).all()),
                  "draft_probs: the trees of sampled requests (temperature > 0) must be chains")
    if max_t is None or node_indptr.device.type == "cpu":
        t_max = int((node_indptr[1:] - node_indptr[:-1]).max())  # a host read of B+1 ints
        max_t = t_max if max_t is None else max_t
        _need(max_t >= t_max, f"max_t={max_t} is smaller than the largest tree ({t_max})")
    if out is None:
        out = VerifyOutput(torch.empty((b, max_t), dtype=torch.int32, device=dev),
                           torch.empty((b, max_t), dtype=torch.int32, device=dev),
                           torch.empty((b,), dtype=torch.int32, device=dev))
    else:
        for name, t, shape in (("out.tokens", out.tokens, (b, max_t)), ("out.path", out.path, (b, max_t)),
                               ("out.num_accepted", out.num_accepted, (b,))):
            _check_tensor(name, t, torch.int32, len(shape), dev)
            _need(tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)} != {shape}")
    _op("rejection_sample")(target_logits, draft_tokens, parents, node_indptr, draft_probs, *params,
                            uniforms, out.tokens, out.path, out.num_accepted)
    if check and (dev.type == "cpu" or not torch.cuda.is_current_stream_capturing()):
        bad = (out.num_accepted < 0).nonzero()
        if bad.numel():
            raise FloatingPointError(f"rejection_sample: non-finite logits for sequence(s) {bad.flatten().tolist()}")
    return out


def sample(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, offset=0, *, uniforms=None,
           return_probs: bool = False, out=None, out_probs=None):
    """Draw one token per row from the processed distribution (temperature / top-k / top-p).

    Parameters
    ----------
    logits : [N, V] fp32/bf16/fp16
    temperature, top_k, top_p, seed, offset : scalars or [N] tensors
    uniforms : float32 [N], optional
    return_probs : bool
        Also return the processed probabilities (float32 [N, V]): what a drafting model hands
        to :func:`rejection_sample` as ``draft_probs``.

    Returns
    -------
    tokens int32 [N], or ``(tokens, probs)``.
    """
    _check_tensor("logits", logits, _FLOAT, 2)
    dev = logits.device
    n, vocab = logits.shape
    params = _sampling_params(n, dev, temperature, top_k, top_p, seed, offset)
    if uniforms is not None:
        _check_tensor("uniforms", uniforms, torch.float32, 1, dev)
        _need(uniforms.shape[0] == n, f"uniforms needs {n} entries")
    if out is None:
        out = torch.empty((n,), dtype=torch.int32, device=dev)
    _check_tensor("out", out, torch.int32, 1, dev)
    if return_probs and out_probs is None:
        out_probs = torch.empty((n, vocab), dtype=torch.float32, device=dev)
    if out_probs is not None:
        _check_tensor("out_probs", out_probs, torch.float32, 2, dev)
        _need(tuple(out_probs.shape) == (n, vocab), f"out_probs shape must be {(n, vocab)}")
    _op("sample")(logits, *params, uniforms, out, out_probs)
    return (out, out_probs) if out_probs is not None else out
