"""Roofline of specrt's kernels: each point's time against the device's own limits and peers.

Usage::

    python bench/roofline.py [--kernel tree_attention|rejection|kv_rollback|append_kv|all]
                             [--quick] [--device cuda|cpu] [--out bench/results]
                             [--peers all|none|NAME,...] [--no-gpm] [--no-flush] [--allow-dirty]

Method
------
* Ceilings, measured first in the same run: a large device-to-device copy (bytes read +
  written / median time) and a large matmul (``2 n^3`` / median time; bf16 on GPU, fp32 on CPU).
  On GPU the nominal peak DRAM bandwidth comes from NVML (bus width / 8 x max memory clock x 2).
* GPU timing (``bench/common.py``): 5 warm-up calls; every implementation, specrt's and the
  peers' alike, is captured in a CUDA graph and replayed when capture works (FlashInfer's
  wrappers are built with ``use_cuda_graph=True``, planned, then captured; its sampling gets
  seed / offset tensors so nothing syncs inside); the ``mode`` column says ``graph`` or
  ``eager`` per row, with the reason when capture failed. Then 10-100 reps (about 0.3 s per
  point), each between its own pair of CUDA events, with the L2 cache flushed before each rep by
  writing a buffer of twice the L2 size (outside the events); the figure is the median. Every
  rep so starts with the point's data in HBM, which is what makes ``pct_of_peak <= 100`` a
  physical bound. Ops get preallocated outputs and ``check=False`` so no host sync happens
  inside.
* CPU timing: ``time.perf_counter`` around each call, median of 3-20 reps (3 with ``--quick``);
  before every rep, outside the timed region, a buffer of twice the last-level cache is written
  (``common.CacheFlusher``), so each rep starts from DRAM. ``--no-flush`` skips it. Either way
  the ``cache`` column says ``flushed`` or ``warm``, plus ``,fits`` when the point's working set
  (its bytes) fits in the last-level cache (``fits_in_cache``): a ``warm,fits`` figure is a cache
  figure; a ``flushed,fits`` point read its inputs from DRAM, but its writes can still be sitting
  in the cache when the timing stops, so a write-heavy small point can exceed the copy ceiling.
  The wrappers' host-side input validation is part of the CPU time.
* tree_attention measures the verify-step path: ``specrt.ops.tree_attention`` with the split-KV
  plan and workspace of ``specrt.ops.plan_tree_attention`` (flash-decoding split, so batch 1 at
  long context fills the GPU), planned once per point outside the timing (``plan_host_us`` is
  that host cost; a step that replans pays it). The engine's verify step is meant to plan with
  the same function (``specrt.attention_plan.plan_tree_attention``). ``specrt_no_plan`` (GPU)
  is the same kernel called without a plan (one CTA per sequence and KV head): what a caller
  that passes no plan gets, reported so the split's gain is visible. On CPU the plan is ignored.
* GPM: when NVML GPM is available, each implementation is also run back to back for >= 0.3 s
  (no flush) inside ``specrt.nvml.BandwidthMonitor``; ``gpm_dram_util_pct`` is the DRAM
  bandwidth utilization NVML measured over that loop.
* Provenance: results are refused from a tree with uncommitted changes to tracked files unless
  ``--allow-dirty`` is given; the git commit is recorded, followed by ``-dirty`` in that case.

Bytes and FLOPs of a point (what must move at the least; identical for specrt and its peers,
so a peer's GB/s is an *effective* bandwidth):

* tree_attention: the K/V of every sequence's whole visible context read once per KV head,
  plus q and out: ``B*L*Hkv*D*2*e + 2*N*Hq*D*e`` (``L`` = context + new tokens, ``N`` = new
  tokens over the batch, ``e`` = element bytes; page tables and the mask are left out).
  FLOPs: ``4*D*Hq`` per (query, visible key) pair (``QK^T`` and ``PV``; softmax not counted).
* rejection: every logits row read once (``N*V*e``: a sequence's validity depends on all its
  rows). Draft probabilities (chains): the kernel reads ``q[x]`` of each acceptance test and, on
  the first rejection, the rejecting node's whole row for the residual ``max(0, p - q)``; so
  ``4*(accepted tests) + 4*V*(sequences with a rejection)``, counted from the point's actual
  outcome (Philox with fixed seeds: every rep takes the same walk). top-k / top-p points re-read
  the visited rows in their threshold passes; those re-reads are not counted (a row is counted
  once), so a filter shows up as lower GB/s. Index arrays and outputs (O(N) ints) are left out.
  FLOPs: ``4*N*V`` (scale, max, exp, sum per logit; an order of magnitude).
* kv_rollback: every K/V row that actually moves, read and written, over all layers:
  ``moved*layers*2*Hkv*D*e*2``; the chain (nothing moves) has 0 bytes and reports time only.
* append_kv: K/V read from the inputs and written into the cache: ``2*(2*N*Hkv*D*e)``.

``specrt_over_peer`` on a peer's row is the peer's time over specrt's time at the same point
(= specrt's GB/s over the peer's; > 1 means specrt is faster).

Outputs in ``--out``: ``roofline_<device>[_<kernel>]_<date>.{json,csv,png}`` with the device,
date, torch/CUDA versions, git commit (and whether the tree was dirty), cache sizes and flush
method, and the exact command line.

GPU paths (graph capture of the FlashInfer peers, top-k / top-p points on CUDA, the no-plan row)
are written against the documented APIs and exercised on CPU only as far as argument plumbing
goes: not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import inspect
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KERNELS = ("tree_attention", "rejection", "kv_rollback", "append_kv")
PEERS = ("torch_sdpa", "torch_sdpa_gather", "flex_attention", "flashinfer", "specrt_no_plan",
         "torch_vectorized", "flashinfer_chain", "torch_index", "chain_noop")
GPU_ONLY_PEERS = ("flex_attention", "flashinfer", "specrt_no_plan", "flashinfer_chain")


@dataclass(frozen=True, slots=True)
class Geometry:
    name: str
    layers: int
    hq: int
    hkv: int
    d: int


LLAMA3_8B = Geometry("llama3-8b", 32, 32, 8, 128)
SMOLLM2 = Geometry("smollm2-135m", 30, 9, 3, 64)
GEOMETRIES = {g.name: g for g in (LLAMA3_8B, SMOLLM2)}
PAGE = 16


# --------------------------------------------------------------------------------------------
# bytes and FLOPs (pure; unit-tested)
# --------------------------------------------------------------------------------------------


def binary_tree_parents(n: int) -> list[int]:
    """Parents of the benchmark's draft tree: a complete binary tree in BFS order."""
    return [-1] + [(i - 1) // 2 for i in range(1, n)]


def tree_depths(parents: list[int]) -> list[int]:
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return d


def attention_visible_pairs(context: int, parents: list[int]) -> int:
    """(query, key) pairs one sequence computes: each node sees the whole context, its
    ancestors and itself."""
    return sum(context + dep + 1 for dep in tree_depths(parents))


def attention_bytes(batch: int, context: int, new: int, hq: int, hkv: int, d: int, elem: int) -> int:
    kv = batch * (context + new) * hkv * d * 2 * elem
    q_out = 2 * batch * new * hq * d * elem
    return kv + q_out


def attention_flops(batch: int, pairs_per_seq: int, hq: int, d: int) -> int:
    return 4 * d * hq * batch * pairs_per_seq


def rejection_draft_reads(num_accepted, tree_size: int) -> tuple[int, int]:
    """Draft-probability traffic of chain verification, from each sequence's outcome:
    ``(single probabilities read, whole fp32 rows read)``.

    A sequence of ``tree_size`` nodes (``tree_size - 1`` drafts) that accepted ``a`` drafts
    read ``q[x]`` for each of them; if a draft was rejected (``a < tree_size - 1``) it also read
    the rejecting node's whole row (the residual ``max(0, p - q)``; that row holds the rejected
    ``q[x]``, so it is not counted twice). All accepted: the bonus comes from the target alone.
    ``a == -1`` (invalid logits) reads no draft probability.
    """
    reads = rows = 0
    for a in num_accepted:
        a = int(a)
        if a < 0:
            continue
        if a >= tree_size - 1:
            reads += tree_size - 1
        else:
            reads += a
            rows += 1
    return reads, rows


def rejection_bytes(nodes: int, vocab: int, logit_elem: int, draft_reads: int = 0,
                    draft_rows: int = 0) -> int:
    """Every logits row once, plus the draft probabilities the walk reads
    (:func:`rejection_draft_reads`; fp32)."""
    return nodes * vocab * logit_elem + 4 * draft_reads + 4 * vocab * draft_rows


def rejection_flops(nodes: int, vocab: int) -> int:
    return 4 * nodes * vocab


def rollback_moved(path: list[int]) -> int:
    """Path entries that really move (``path[j] != j``)."""
    return sum(1 for j, p in enumerate(path) if p != j)


def rollback_bytes(moved_total: int, layers: int, hkv: int, d: int, elem: int) -> int:
    return moved_total * layers * 2 * hkv * d * elem * 2


def append_bytes(n: int, hkv: int, d: int, elem: int) -> int:
    return 2 * (2 * n * hkv * d * elem)


def rollback_path(path_len: int, tree_size: Optional[int]) -> list[int]:
    """Benchmark path: the root then the last ``path_len - 1`` nodes of the tree (every entry
    but the root moves when the tree is larger than the path); ``tree_size=None`` is the chain
    ``0..path_len-1`` (nothing moves)."""
    if tree_size is None:
        return list(range(path_len))
    return [0] + list(range(tree_size - path_len + 1, tree_size))


# --------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------


def sweep(kernel: str, device_type: str, quick: bool) -> list[dict]:
    """Points of one kernel. GPU: the issues' full sweeps, or a handful with ``quick``.
    CPU: reduced sizes (CPU kernels are slow); ``quick`` is smaller still (the test)."""
    gpu = device_type == "cuda"
    pts: list[dict] = []
    if kernel == "tree_attention":
        if gpu and not quick:
            for g in (LLAMA3_8B, SMOLLM2):
                for b in (1, 4, 16, 64):
                    for ctx in (512, 2048, 8192, 32768):
                        for t in (1, 4, 16, 64):
                            pts.append(dict(geometry=g.name, batch=b, context=ctx, new=t))
        elif gpu:
            pts = [dict(geometry="llama3-8b", batch=1, context=8192, new=1),
                   dict(geometry="llama3-8b", batch=1, context=32768, new=16),
                   dict(geometry="llama3-8b", batch=16, context=2048, new=4),
                   dict(geometry="llama3-8b", batch=64, context=8192, new=64),
                   dict(geometry="smollm2-135m", batch=4, context=2048, new=16)]
        elif not quick:
            for b in (1, 4):
                for ctx in (512, 2048):
                    for t in (16, 1):  # a masked point first: it is the one checked
                        pts.append(dict(geometry="smollm2-135m", batch=b, context=ctx, new=t))
            pts += [dict(geometry="llama3-8b", batch=1, context=2048, new=t) for t in (1, 16)]
        else:
            pts = [dict(geometry="smollm2-135m", batch=1, context=256, new=4),
                   dict(geometry="smollm2-135m", batch=4, context=512, new=16),
                   dict(geometry="llama3-8b", batch=1, context=512, new=1)]
    elif kernel == "rejection":
        shapes = [("chain", 1), ("chain", 4), ("chain", 8), ("tree", 16), ("tree", 64)]
        # top-k / top-p: the threshold passes over every visited row
        filters = [(50, 1.0), (0, 0.9), (50, 0.9)]
        if gpu and not quick:
            for b in (1, 8, 32, 128, 256):
                for kind, n in shapes:
                    for v in (32000, 128256, 151936):
                        for dt in ("float32", "bfloat16"):
                            pts.append(dict(batch=b, draft=kind, size=n, vocab=v, logits=dt))
            for b in (1, 32, 256):
                for kind, n in (("chain", 4), ("tree", 16)):
                    for k, tp in filters:
                        pts.append(dict(batch=b, draft=kind, size=n, vocab=128256, logits="bfloat16",
                                        top_k=k, top_p=tp))
        elif gpu:
            pts = [dict(batch=1, draft="chain", size=4, vocab=128256, logits="float32"),
                   dict(batch=32, draft="chain", size=4, vocab=128256, logits="bfloat16"),
                   dict(batch=128, draft="tree", size=64, vocab=32000, logits="float32"),
                   dict(batch=256, draft="chain", size=8, vocab=151936, logits="bfloat16"),
                   dict(batch=32, draft="chain", size=4, vocab=128256, logits="bfloat16", top_k=50),
                   dict(batch=32, draft="tree", size=16, vocab=128256, logits="bfloat16", top_p=0.9)]
        elif not quick:
            for b in (1, 8):
                for kind, n in (("chain", 4), ("tree", 16)):
                    pts.append(dict(batch=b, draft=kind, size=n, vocab=32000, logits="float32"))
            pts += [dict(batch=8, draft="chain", size=4, vocab=32000, logits="bfloat16"),
                    dict(batch=1, draft="chain", size=8, vocab=151936, logits="float32")]
            for k, tp in filters:
                pts.append(dict(batch=8, draft="chain", size=4, vocab=32000, logits="float32",
                                top_k=k, top_p=tp))
            pts.append(dict(batch=8, draft="tree", size=16, vocab=32000, logits="float32", top_k=50,
                            top_p=0.9))
        else:
            pts = [dict(batch=1, draft="chain", size=4, vocab=32000, logits="float32"),
                   dict(batch=4, draft="tree", size=16, vocab=32000, logits="bfloat16"),
                   dict(batch=2, draft="chain", size=4, vocab=32000, logits="float32", top_k=50,
                        top_p=0.9)]
    elif kernel == "kv_rollback":
        if gpu and not quick:
            for g in (LLAMA3_8B, SMOLLM2):
                for b in (1, 16, 64, 256):
                    for p in (1, 4, 8):
                        pts.append(dict(geometry=g.name, batch=b, path=p, tree=None))
                        for t in (8, 64):
                            pts.append(dict(geometry=g.name, batch=b, path=p, tree=t))
        elif gpu:
            pts = [dict(geometry="llama3-8b", batch=16, path=4, tree=64),
                   dict(geometry="llama3-8b", batch=256, path=8, tree=64),
                   dict(geometry="smollm2-135m", batch=64, path=4, tree=8),
                   dict(geometry="llama3-8b", batch=16, path=4, tree=None)]
        elif not quick:
            for b in (1, 16):
                for p in (1, 4):
                    for t in (8, 64):
                        pts.append(dict(geometry="smollm2-135m", batch=b, path=p, tree=t))
                pts.append(dict(geometry="smollm2-135m", batch=b, path=4, tree=None))
            pts.append(dict(geometry="llama3-8b", batch=16, path=4, tree=64))
        else:
            pts = [dict(geometry="smollm2-135m", batch=4, path=4, tree=8),
                   dict(geometry="smollm2-135m", batch=4, path=4, tree=None)]
    elif kernel == "append_kv":
        counts = ((1, 64, 1024, 16384) if gpu and not quick else (1, 256, 16384) if gpu
                  else (16, 256, 4096) if not quick else (16, 256))
        pts = [dict(geometry="llama3-8b", tokens=n) for n in counts]
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return pts


def label_of(kernel: str, p: dict) -> str:
    if kernel == "tree_attention":
        return f"{p['geometry']} b{p['batch']} ctx{p['context']} t{p['new']}"
    if kernel == "rejection":
        return (f"b{p['batch']} {p['draft']}{p['size']} V{p['vocab']} {p['logits']}"
                + (f" topk{p['top_k']}" if p.get("top_k", 0) > 0 else "")
                + (f" topp{p['top_p']}" if p.get("top_p", 1.0) < 1 else ""))
    if kernel == "kv_rollback":
        tree = "chain" if p["tree"] is None else f"tree{p['tree']}"
        return f"{p['geometry']} b{p['batch']} path{p['path']} {tree}"
    return f"{p['geometry']} n{p['tokens']}"


def check_key(kernel: str, p: dict):
    """Points sharing a key share one reference check (CPU): the first point of each kernel,
    and for rejection the first point of each top-k / top-p setting."""
    if kernel == "rejection":
        return (kernel, p.get("top_k", 0), p.get("top_p", 1.0))
    return (kernel,)


# --------------------------------------------------------------------------------------------
# cases: what to run at a point
# --------------------------------------------------------------------------------------------


@dataclass
class Impl:
    fn: Optional[Callable[[], object]]
    pre: Optional[Callable[[], object]] = None
    graph: bool = True
    error: Optional[str] = None  # set: could not be prepared (skipped with this reason)
    note: Optional[str] = None
    moves_bytes: bool = True  # False: a baseline that does not do the point's work (time only)
    extra: dict = field(default_factory=dict)  # more fields for the row (e.g. plan_host_us)


@dataclass
class Case:
    bytes: int
    flops: int
    specrt: Impl
    peers: dict = field(default_factory=dict)
    check: Optional[Callable[[], dict]] = None  # CPU: op vs specrt.reference
    check_key: tuple = ()  # points with the same key share one check (see check_key())


def _peer(fn_builder: Callable[[], Impl]) -> Impl:
    try:
        return fn_builder()
    except Exception as e:  # noqa: BLE001  (a peer that cannot be set up is reported, not fatal)
        return Impl(None, error=f"{type(e).__name__}: {e}"[:300])


def _ops():
    from specrt import ops

    return ops


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _tol(dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else 2e-3


def case_tree_attention(p: dict, device, peers: set) -> Case:
    ops = _ops()
    g = GEOMETRIES[p["geometry"]]
    dev = torch.device(device)
    dt = _dtype(dev)
    b, ctx, t = p["batch"], p["context"], p["new"]
    seq = ctx + t
    pps = math.ceil(seq / PAGE)
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(2, b * pps, PAGE, g.hkv, g.d, generator=gen, dtype=torch.float32) \
        if dev.type == "cpu" else torch.randn(2, b * pps, PAGE, g.hkv, g.d, device=dev, dtype=dt)
    kv = kv.to(device=dev, dtype=dt)
    k_cache, v_cache = kv[0], kv[1]
    block_table = torch.randperm(b * pps, generator=gen).to(torch.int32).view(b, pps).to(dev)
    seq_lens = torch.full((b,), seq, dtype=torch.int32, device=dev)
    qo_indptr = (torch.arange(b + 1, dtype=torch.int32) * t).to(dev)
    q = torch.randn(b * t, g.hq, g.d, device=dev, dtype=dt)
    out = torch.empty_like(q)
    parents = binary_tree_parents(t)
    vis = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):  # ancestors and self
        j = i
        while j >= 0:
            vis[i, j] = True
            j = parents[j]
    mask = None
    if t > 1:
        from specrt.tree import pack_mask

        mask = pack_mask(vis).repeat(b, 1).to(dev)
    scale = 1.0 / math.sqrt(g.d)
    # The verify step's path: a split-KV plan from plan_tree_attention (None on CPU, where the
    # op ignores it), made on the host outside the timing; its host cost is reported.
    t_plan = time.perf_counter()
    plan, ws = ops.plan_tree_attention(qo_indptr.cpu(), seq_lens.cpu(), g.hq, g.hkv, g.d, PAGE, dev)
    plan_us = (time.perf_counter() - t_plan) * 1e6
    elem = torch.finfo(dt).bits // 8

    def run():
        ops.tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask,
                           sm_scale=scale, out=out, plan=plan, workspace=ws)

    spec_note = ("split-KV plan from specrt.ops.plan_tree_attention (made outside the timing)"
                 if plan is not None else "CPU kernel (no split-KV plan on CPU)")
    case = Case(bytes=attention_bytes(b, ctx, t, g.hq, g.hkv, g.d, elem),
                flops=attention_flops(b, attention_visible_pairs(ctx, parents), g.hq, g.d),
                specrt=Impl(run, note=spec_note,
                            extra={"split_kv_plan": plan is not None,
                                   "plan_host_us": plan_us if plan is not None else None}))
    if "specrt_no_plan" in peers:
        def no_plan():
            if dev.type != "cuda":
                raise RuntimeError("GPU only (the CPU op has no split-KV plan)")
            out2 = torch.empty_like(q)
            return Impl(lambda: ops.tree_attention(q, k_cache, v_cache, block_table, seq_lens,
                                                   qo_indptr, mask, sm_scale=scale, out=out2),
                        note="specrt tree_attention without a plan: one CTA per (sequence, KV head)")
        case.peers["specrt_no_plan"] = _peer(no_plan)
    group = g.hq // g.hkv
    dense = torch.ones(t, seq, dtype=torch.bool)
    dense[:, ctx:] = vis

    def gather_kv():  # paged -> [B, Hkv, L, D]
        kk = k_cache[block_table.long()].reshape(b, pps * PAGE, g.hkv, g.d)[:, :seq]
        vv = v_cache[block_table.long()].reshape(b, pps * PAGE, g.hkv, g.d)[:, :seq]
        return kk.transpose(1, 2), vv.transpose(1, 2)

    # GQA folded into the query length: the `group` heads sharing a KV head become group * T
    # query rows of that head, so SDPA's fused kernels run with no K/V expansion.
    q_fold = q.view(b, t, g.hkv, group, g.d).permute(0, 2, 3, 1, 4).reshape(b, g.hkv, group * t, g.d)
    if {"torch_sdpa", "torch_sdpa_gather"} & peers:
        fold_mask = dense.repeat(group, 1)[None, None].to(dev)  # [1, 1, group*T, L]
    if "torch_sdpa" in peers:
        def sdpa_pre():
            kk, vv = gather_kv()
            kk, vv = kk.contiguous(), vv.contiguous()
            return Impl(lambda: torch.nn.functional.scaled_dot_product_attention(
                q_fold, kk, vv, attn_mask=fold_mask, scale=scale),
                note="K/V pre-gathered (attention only), GQA folded into query rows")
        case.peers["torch_sdpa"] = _peer(sdpa_pre)
    if "torch_sdpa_gather" in peers:
        def sdpa_gather():
            def fn():
                kk, vv = gather_kv()
                return torch.nn.functional.scaled_dot_product_attention(
                    q_fold, kk, vv, attn_mask=fold_mask, scale=scale)
            return Impl(fn, note="gathers K/V from the pages, then SDPA with a dense mask")
        case.peers["torch_sdpa_gather"] = _peer(sdpa_gather)
    if "flex_attention" in peers:
        case.peers["flex_attention"] = _peer(lambda: _flex_impl(dev, q, gather_kv, vis, b, t, seq, ctx, g, scale))
    if "flashinfer" in peers:
        case.peers["flashinfer"] = _peer(lambda: _flashinfer_attention_impl(
            dev, q, k_cache, v_cache, block_table, qo_indptr, dense, b, t, seq, pps, g, dt, scale))

    if dev.type == "cpu":
        def check():
            from specrt import reference

            run()
            want = reference.tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr,
                                            mask, scale)
            err = (out.float() - want.float()).abs().max().item()
            return {"max_abs_err": err, "tol": _tol(dt), "pass": err <= _tol(dt)}
        case.check = check
    return case


_FLEX = None


def _flex_impl(dev, q, gather_kv, vis, b, t, seq, ctx, g, scale) -> Impl:
    global _FLEX
    if dev.type != "cuda":
        raise RuntimeError("FlexAttention peer runs on GPU only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 1024)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    kk, vv = gather_kv()
    kk, vv = kk.contiguous(), vv.contiguous()
    tree = vis.to(dev)
    q4 = q.view(b, t, g.hq, g.d).transpose(1, 2).contiguous()

    def mask_mod(bi, h, qi, ki):
        rel = (ki - ctx).clamp(0, t - 1)
        return (ki < ctx) | ((ki < seq) & tree[qi, rel])

    bm = create_block_mask(mask_mod, b, None, t, seq, device=dev)
    fn = lambda: _FLEX(q4, kk, vv, block_mask=bm, scale=scale, enable_gqa=True)  # noqa: E731
    fn()  # compile now, outside the timing
    return Impl(fn, note="compiled flex_attention, block mask, K/V pre-gathered")


def _flashinfer_attention_impl(dev, q, k_cache, v_cache, block_table, qo_indptr, dense, b, t,
                               seq, pps, g, dt, scale) -> Impl:
    """FlashInfer's paged prefill wrapper in its CUDA-graph mode: fixed device buffers for the
    indptrs, page indices and the packed mask, planned once, then captured by the runner like
    specrt's op. (Not yet run on a GPU.)"""
    if dev.type != "cuda":
        raise RuntimeError("FlashInfer runs on GPU only")
    import flashinfer

    kw = flashinfer_graph_buffers(b, t, seq, pps, dev)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", use_cuda_graph=True, **kw)
    kv_indptr = (torch.arange(b + 1, dtype=torch.int32) * pps).to(dev)
    kv_indices = block_table.flatten().contiguous()
    last = torch.full((b,), seq - (pps - 1) * PAGE, dtype=torch.int32, device=dev)
    # NOTE: the boolean custom_mask, not packed_custom_mask (known FlashInfer bug with the
    # packed form); one [T, L] block per request, flattened. plan() packs it into the buffer.
    custom = dense.to(dev).flatten().repeat(b)
    w.plan(qo_indptr, kv_indptr, kv_indices, last, g.hq, g.hkv, g.d, PAGE, custom_mask=custom,
           q_data_type=dt, kv_data_type=dt, sm_scale=scale)
    out = torch.empty_like(q)
    fn = lambda: w.run(q, (k_cache, v_cache), out=out)  # noqa: E731
    fn()  # JIT-compile / load the module now, outside capture and timing
    return Impl(fn, note="BatchPrefillWithPagedKVCacheWrapper(use_cuda_graph=True), boolean custom_mask")


def flashinfer_graph_buffers(b: int, t: int, seq: int, pps: int, dev) -> dict:
    """The fixed buffers FlashInfer's paged prefill wrapper needs in CUDA-graph mode for a batch
    of ``b`` requests with ``t`` queries over ``seq`` keys in ``pps`` pages each: indptrs
    ``[b+1]``, page indices ``[b*pps]``, last-page lengths ``[b]`` (int32), and the bit-packed
    custom mask (uint8; each request's ``t*seq`` bits padded to whole bytes)."""
    i32 = dict(dtype=torch.int32, device=dev)
    return {"qo_indptr_buf": torch.zeros(b + 1, **i32),
            "paged_kv_indptr_buf": torch.zeros(b + 1, **i32),
            "paged_kv_indices_buf": torch.zeros(b * pps, **i32),
            "paged_kv_last_page_len_buf": torch.zeros(b, **i32),
            "custom_mask_buf": torch.zeros(b * ((t * seq + 7) // 8), dtype=torch.uint8, device=dev),
            "mask_indptr_buf": torch.zeros(b + 1, **i32)}


def case_rejection(p: dict, device, peers: set) -> Case:
    ops = _ops()
    dev = torch.device(device)
    b, kind, size, vocab = p["batch"], p["draft"], p["size"], p["vocab"]
    ldt = getattr(torch, p["logits"])
    t = size + 1 if kind == "chain" else size
    parents_local = list(range(-1, t - 1)) if kind == "chain" else binary_tree_parents(t)
    n = b * t
    logits = (torch.randn(n, vocab, device=dev) * 3).to(ldt)
    # Drafts the target likes (its argmax at the parent): walks go deep, the worst case.
    par = torch.tensor(parents_local * b, dtype=torch.int32)
    base = (torch.arange(b) * t).repeat_interleave(t)
    arg = logits.float().argmax(-1).cpu()
    tokens = torch.where(par >= 0, arg[(base + par.clamp_min(0).long())], torch.zeros_like(arg))
    tokens = tokens.to(torch.int32).to(dev)
    parents = par.to(dev)
    indptr = (torch.arange(b + 1, dtype=torch.int32) * t).to(dev)
    draft_probs = None
    if kind == "chain":
        draft_probs = torch.softmax(logits.float() + 0.5 * torch.randn(n, vocab, device=dev), -1)
    k_val, p_val = int(p.get("top_k", 0)), float(p.get("top_p", 1.0))
    temp = torch.ones(b, dtype=torch.float32, device=dev)
    top_k = torch.full((b,), k_val, dtype=torch.int32, device=dev)
    top_p = torch.full((b,), p_val, dtype=torch.float32, device=dev)
    seed = torch.arange(b, dtype=torch.int64, device=dev) + 1234
    offset = torch.zeros(b, dtype=torch.int64, device=dev)
    out = ops.VerifyOutput(torch.empty(b, t, dtype=torch.int32, device=dev),
                           torch.empty(b, t, dtype=torch.int32, device=dev),
                           torch.empty(b, dtype=torch.int32, device=dev))

    def run():
        ops.rejection_sample(logits, tokens, parents, indptr, draft_probs=draft_probs,
                             temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
                             offset=offset, max_t=t, out=out, check=False)

    elem = torch.finfo(ldt).bits // 8
    # The walk's draft-probability reads depend on the outcome, which is the same every rep
    # (Philox, fixed seeds): run once (outside the timing) and count it.
    reads = rows = 0
    if draft_probs is not None:
        run()
        reads, rows = rejection_draft_reads(out.num_accepted.cpu().tolist(), t)
    case = Case(bytes=rejection_bytes(n, vocab, elem, reads, rows),
                flops=rejection_flops(n, vocab), specrt=Impl(run),
                check_key=check_key("rejection", p))
    case.specrt.extra = {"draft_prob_reads": reads, "draft_prob_rows": rows,
                         "top_k": k_val, "top_p": p_val}
    ld = t - 1 if kind == "chain" else t  # accept decisions per sequence
    if "torch_vectorized" in peers:
        case.peers["torch_vectorized"] = _peer(lambda: _torch_verify_impl(
            logits, draft_probs, tokens, parents_local, b, t, vocab, kind, k_val, p_val))
    if "flashinfer_chain" in peers and kind == "chain":
        case.peers["flashinfer_chain"] = _peer(lambda: _flashinfer_chain_impl(
            dev, logits, draft_probs, tokens, b, t, vocab, ld, k_val, p_val))
    if dev.type == "cpu":
        def check():
            from specrt import reference

            run()
            want = reference.rejection_sample(logits, tokens, parents, indptr, draft_probs, temp,
                                              top_k, top_p, seed, offset, None, t)
            same = [bool(torch.equal(a.cpu(), w_.cpu())) for a, w_ in
                    zip((out.tokens, out.path, out.num_accepted), want)]
            return {"tokens_equal": same[0], "path_equal": same[1], "num_accepted_equal": same[2],
                    "pass": all(same)}
        case.check = check
    return case


def filter_probs(p: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Rows of ``p`` [.., V] restricted to top-k then top-p and renormalized, in plain PyTorch
    (the peers' processing; top-k keeps ties at the k-th value, top-p keeps a token when the
    mass strictly before it in sorted order is < top_p)."""
    vocab = p.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(p, top_k, dim=-1).values[..., -1:]
        p = torch.where(p >= kth, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    if top_p < 1:
        sp, idx = torch.sort(p, dim=-1, descending=True)
        before = sp.cumsum(-1) - sp
        sp = torch.where(before < top_p, sp, torch.zeros_like(sp))
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def _torch_verify_impl(logits, draft_probs, tokens, parents_local, b, t, vocab, kind,
                       top_k: int = 0, top_p: float = 1.0) -> Impl:
    """Vectorized PyTorch verification: softmax (+ top-k / top-p) + gather + compare +
    multinomial. Exact for chains with draft probabilities; for trees it does the same work with
    the walk taken in node order (a work-equivalent peer, not an exact tree verifier)."""
    dev = logits.device
    par = torch.tensor([max(x, 0) for x in parents_local], device=dev)
    tok = tokens.view(b, t).long()[:, 1:]  # tokens of nodes 1..T-1
    rows = torch.arange(b, device=dev)

    def fn():
        p = filter_probs(torch.softmax(logits.float(), -1), top_k, top_p).view(b, t, vocab)
        p_par = p[:, par[1:]]  # [B, T-1, V]: the distribution each draft token is judged by
        px = p_par.gather(-1, tok[..., None]).squeeze(-1)
        u = torch.rand(b, t - 1, device=dev)
        if draft_probs is not None:
            q = draft_probs.view(b, t, vocab)[:, :-1]
            qx = q.gather(-1, tok[..., None]).squeeze(-1)
            acc = u * qx < px
        else:
            acc = u < px
        n_acc = acc.int().cumprod(1).sum(1)  # first rejection ends the walk
        p_at = p[rows, n_acc]
        if draft_probs is not None:
            q_full = draft_probs.view(b, t, vocab)
            q_at = torch.where((n_acc < t - 1)[:, None], q_full[rows, n_acc], torch.zeros_like(p_at))
            resid = (p_at - q_at).clamp_min(0)
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_at)
        else:
            resid = p_at
        return torch.multinomial(resid, 1), n_acc
    note = "exact chain verification" if kind == "chain" else "tree walk taken in node order (work-equivalent)"
    if top_k > 0 or top_p < 1:
        note += "; top-k / top-p by topk + sort / cumsum"
    return Impl(fn, note=note)


def _flashinfer_chain_impl(dev, logits, draft_probs, tokens, b, t, vocab, ld, top_k: int = 0,
                           top_p: float = 1.0) -> Impl:
    """softmax (+ FlashInfer's top-k / top-p renorm kernels) + chain_speculative_sampling, with
    seed / offset tensors where the API takes them so that the call can be captured in a CUDA
    graph (a host-side generator read cannot be). (Not yet run on a GPU.)"""
    if dev.type != "cuda":
        raise RuntimeError("FlashInfer runs on GPU only")
    import flashinfer

    fs = flashinfer.sampling
    f = fs.chain_speculative_sampling
    dp = draft_probs.view(b, t, vocab)[:, :ld].contiguous()
    ids = tokens.view(b, t)[:, 1:].contiguous()
    kw = flashinfer_chain_kwargs(inspect.signature(f).parameters, dev)

    def target_probs():
        tp = torch.softmax(logits.float(), -1)
        if 0 < top_k < vocab:
            tp = fs.top_k_renorm_probs(tp, top_k)
        if top_p < 1:
            tp = fs.top_p_renorm_probs(tp, top_p)
        return tp.view(b, t, vocab)

    if "uniform_samples" in inspect.signature(f).parameters:  # older FlashInfer
        def fn():
            u = torch.rand(b, t, device=dev)
            return f(dp, ids, u, target_probs())
    else:
        def fn():
            return f(dp, ids, target_probs(), **kw)
    fn()  # JIT-compile / load now, outside capture and timing
    note = "softmax + chain_speculative_sampling"
    if top_k > 0 or top_p < 1:
        note += " after top_k_renorm_probs / top_p_renorm_probs"
    return Impl(fn, note=note)


def flashinfer_chain_kwargs(params, dev) -> dict:
    """Keyword arguments that make ``chain_speculative_sampling`` CUDA-graph capturable: device
    seed / offset tensors when the signature has them (else it reads the torch generator's
    state on the host, which capture forbids)."""
    kw = {}
    if "seed" in params and "offset" in params:
        kw["seed"] = torch.tensor([1234], dtype=torch.int64, device=dev)
        kw["offset"] = torch.zeros(1, dtype=torch.int64, device=dev)
    return kw


def case_kv_rollback(p: dict, device, peers: set) -> Case:
    ops = _ops()
    g = GEOMETRIES[p["geometry"]]
    dev = torch.device(device)
    dt = _dtype(dev)
    b, plen, tsize = p["batch"], p["path"], p["tree"]
    t = plen if tsize is None else tsize
    path_l = rollback_path(plen, tsize)
    committed0 = torch.tensor([1000 + (7 * i) % PAGE for i in range(b)], dtype=torch.int32)
    # Only the pages a rollback touches are real; the prefix points at the shared page 0.
    width = (int(committed0.max()) + t - 1) // PAGE + 1
    bt = torch.zeros(b, width, dtype=torch.int32)
    nxt = 1
    for i in range(b):
        c = int(committed0[i])
        for pg in range(c // PAGE, (c + t - 1) // PAGE + 1):
            bt[i, pg] = nxt
            nxt += 1
    kv = torch.randn(g.layers, 2, nxt, PAGE, g.hkv, g.d, device=dev, dtype=dt)
    block_table = bt.to(dev)
    committed_init = committed0.to(dev)
    committed = committed_init.clone()
    path = torch.full((b, t), -1, dtype=torch.int32)
    path[:, :plen] = torch.tensor(path_l, dtype=torch.int32)
    path = path.to(dev)
    num_acc = torch.full((b,), plen - 1, dtype=torch.int32, device=dev)
    reset = lambda: committed.copy_(committed_init)  # noqa: E731  (the op grows committed)

    def run():
        ops.kv_rollback(kv, block_table, committed, path, num_acc)

    elem = torch.finfo(dt).bits // 8
    moved = rollback_moved(path_l) * b
    case = Case(bytes=rollback_bytes(moved, g.layers, g.hkv, g.d, elem), flops=0,
                specrt=Impl(run, pre=reset))
    if "torch_index" in peers and moved:
        def torch_index():
            src, dst = [], []
            for i in range(b):
                c = int(committed0[i])
                for j, pj in enumerate(path_l):
                    if pj != j:
                        for pos, lst in ((c + pj, src), (c + j, dst)):
                            lst.append(int(bt[i, pos // PAGE]) * PAGE + pos % PAGE)
            s, d_ = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
            n_add = torch.full((b,), plen, dtype=torch.int32, device=dev)
            flat = kv.view(g.layers, 2, nxt * PAGE, g.hkv, g.d)

            def fn():
                for layer in range(g.layers):  # one gather + one scatter per layer
                    rows = flat[layer][:, s]
                    flat[layer][:, d_] = rows
                committed.add_(n_add)
            return Impl(fn, pre=reset, note="index gather + index_put per layer, precomputed slots")
        case.peers["torch_index"] = _peer(torch_index)
    if "chain_noop" in peers and tsize is not None:
        ident = torch.full((b, t), -1, dtype=torch.int32)
        ident[:, :plen] = torch.arange(plen, dtype=torch.int32)
        ident = ident.to(dev)
        case.peers["chain_noop"] = Impl(lambda: ops.kv_rollback(kv, block_table, committed, ident, num_acc),
                                        pre=reset, moves_bytes=False,
                                        note="specrt kv_rollback on the identity path (nothing moves)")
    if dev.type == "cpu":
        def check():
            from specrt import reference

            kv_ref, c_ref = kv.clone(), committed_init.clone()
            kv_before = kv.clone()
            reset()
            run()
            reference.kv_rollback(kv_ref, block_table, c_ref, path, num_acc)
            ok_kv, ok_c = bool(torch.equal(kv, kv_ref)), bool(torch.equal(committed, c_ref))
            kv.copy_(kv_before)
            return {"kv_equal": ok_kv, "committed_equal": ok_c, "pass": ok_kv and ok_c}
        case.check = check
    return case


def case_append_kv(p: dict, device, peers: set) -> Case:
    ops = _ops()
    g = GEOMETRIES[p["geometry"]]
    dev = torch.device(device)
    dt = _dtype(dev)
    n = p["tokens"]
    num_pages = 2 * math.ceil(n / PAGE) + 1
    k_cache = torch.zeros(num_pages, PAGE, g.hkv, g.d, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_pages * PAGE)[:n].to(torch.int64).to(dev)
    k = torch.randn(n, g.hkv, g.d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    run = lambda: ops.append_kv(k, v, k_cache, v_cache, slots)  # noqa: E731
    elem = torch.finfo(dt).bits // 8
    case = Case(bytes=append_bytes(n, g.hkv, g.d, elem), flops=0, specrt=Impl(run))
    if "torch_index" in peers:
        kf, vf = k_cache.view(-1, g.hkv, g.d), v_cache.view(-1, g.hkv, g.d)

        def fn():
            kf.index_copy_(0, slots, k)
            vf.index_copy_(0, slots, v)
        case.peers["torch_index"] = Impl(fn, note="index_copy_ into the flattened cache")
    if dev.type == "cpu":
        def check():
            from specrt import reference

            kr, vr = k_cache.clone(), v_cache.clone()
            reference.append_kv(k, v, kr, vr, slots)
            run()
            ok = bool(torch.equal(k_cache, kr)) and bool(torch.equal(v_cache, vr))
            return {"cache_equal": ok, "pass": ok}
        case.check = check
    return case


CASES = {"tree_attention": case_tree_attention, "rejection": case_rejection,
         "kv_rollback": case_kv_rollback, "append_kv": case_append_kv}


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def _graphed(fn: Callable[[], object], pre: Optional[Callable[[], object]] = None) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (its replay), after a warm-up on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        if pre is not None:  # e.g. kv_rollback grows committed_lens: restore it first
            pre()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


class Runner:
    def __init__(self, device, quick: bool, use_gpm: bool, flush: bool = True):
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.quick = quick
        if self.gpu:
            self.flusher = common.L2Flusher(self.device)
            self.cache_bytes = self.flusher.cache_bytes
        else:
            self.flusher = common.CacheFlusher() if flush else None
            self.cache_bytes = self.flusher.cache_bytes if flush else common.last_level_cache_bytes()
            if self.flusher is not None:
                self.flusher()  # fault the buffer's pages in now, not in the first point's reps
        self.monitor_ok = False
        if self.gpu and use_gpm:
            from specrt.nvml import BandwidthMonitor

            m = BandwidthMonitor(self.device)
            self.monitor_ok = m.available and m.method == "gpm"
            self.monitor_reason = m.reason or (None if self.monitor_ok else f"method {m.method}")
        else:
            self.monitor_reason = "GPM needs a GPU" if not self.gpu else "disabled (--no-gpm)"

    def timing_kw(self) -> dict:
        if self.gpu:
            return {"flusher": self.flusher}
        # A flush costs ~0.1 s per rep on CPU: fewer reps in --quick.
        return {"target_s": 0.03 if self.quick else 0.15, "flusher": self.flusher,
                "max_reps": 3 if self.quick else 20}

    def cache_info(self) -> dict:
        f = self.flusher
        return {"level": "L2" if self.gpu else "LLC", "bytes": self.cache_bytes,
                "flushed": f is not None, "flush_bytes": getattr(f, "bytes", None),
                "method": ("a buffer of twice the cache size written before every rep, outside "
                           "the timed region") if f is not None else
                          "not flushed (--no-flush): rows with fits_in_cache true are warm-cache figures"}

    def measure(self, impl: Impl, nbytes: int) -> dict:
        fn, graphed, why_eager = impl.fn, False, None
        if self.gpu and impl.graph:
            try:
                fn = _graphed(impl.fn, impl.pre)
                graphed = True
            except Exception as e:  # noqa: BLE001  (some peers cannot be captured)
                torch.cuda.synchronize()
                fn = impl.fn
                why_eager = f"graph capture failed: {type(e).__name__}: {e}"[:200]
                impl.note = ((impl.note + "; ") if impl.note else "") + f"eager (graph capture failed: {type(e).__name__})"
        elif self.gpu:
            why_eager = "not capturable (the implementation says so)"
        t = common.time_fn(fn, self.device, pre=impl.pre, **self.timing_kw())
        row = {**t.as_dict(), "cuda_graph": graphed, "mode": "graph" if graphed else "eager",
               "eager_reason": why_eager}
        if self.monitor_ok:
            row.update(self._gpm(fn, impl.pre, nbytes, t.median))
        return row

    def _gpm(self, fn, pre, nbytes, t_med) -> dict:
        from specrt.nvml import BandwidthMonitor

        iters = max(1, int(0.3 / max(t_med, 1e-7)))
        mon = BandwidthMonitor(self.device)
        with mon:
            for _ in range(iters):
                if pre is not None:
                    pre()
                fn()
        r = mon.result()
        return {"gpm_dram_util_pct": r["dram_bw_util_pct"], "gpm_sm_util_pct": r["sm_util_pct"],
                "gpm_gbps_loop": nbytes * iters / r["elapsed_s"] / 1e9 if (nbytes and r["elapsed_s"]) else None}


def _metrics(row: dict, case: Case, ceil: dict) -> None:
    t = row.get("time_s")
    if not t:
        return
    row["time_us"] = t * 1e6
    row["time_min_us"] = row["time_min_s"] * 1e6
    row["bytes"], row["flops"] = case.bytes, case.flops
    row["fits_in_cache"] = common.fits_in_cache(case.bytes, ceil.get("cache_bytes"))
    row["intensity"] = case.flops / case.bytes if case.bytes and case.flops else None
    bw = case.bytes / t if case.bytes else None
    row["achieved_gbps"] = bw / 1e9 if bw else None
    peak = ceil.get("nominal_peak_bytes_per_s")
    row["pct_of_peak"] = 100 * bw / peak if (bw and peak) else None
    row["pct_of_copy"] = 100 * bw / ceil["copy_bytes_per_s"] if bw else None
    row["gflops_per_s"] = case.flops / t / 1e9 if case.flops else None
    row["pct_of_matmul"] = 100 * case.flops / t / ceil["matmul_flops_per_s"] if case.flops else None


def _status_of(e: BaseException) -> tuple[str, str]:
    msg = f"{type(e).__name__}: {e}".strip()
    low = msg.lower()
    # Missing kernels (a CPU twin still being written, a build without CUDA kernels) and OOM
    # are expected states of a point, not failures of the tool.
    skipped = any(s in low for s in ("not implemented", "notimplementederror", "could not run",
                                     "extensionerror", "could not be imported", "no kernel",
                                     "outofmemory", "out of memory"))
    return ("skipped" if skipped else "error"), msg[:500]


def run_kernel(kernel: str, runner: Runner, ceil: dict, peers: set, rows: list, echo) -> None:
    pts = sweep(kernel, runner.device.type, runner.quick)
    checked: set = set()
    for p in pts:
        label = label_of(kernel, p)
        base = {"kernel": kernel, "label": label, **{f"p_{k}": v for k, v in p.items()}}
        try:
            case = CASES[kernel](p, runner.device, peers)
        except Exception as e:  # noqa: BLE001
            status, reason = _status_of(e)
            rows.append({**base, "impl": "specrt", "status": status, "reason": reason})
            echo(rows[-1])
            if runner.gpu:
                torch.cuda.empty_cache()
            continue
        spec = {**base, "impl": "specrt", "status": "ok", "reason": None, **case.specrt.extra}
        key = case.check_key or check_key(kernel, p)
        try:
            spec.update(runner.measure(case.specrt, case.bytes))
            _metrics(spec, case, ceil)
            if case.check is not None and key not in checked and case.bytes:
                # CPU: op vs specrt.reference on the first point of each check key that does work
                spec["check"] = case.check()
                checked.add(key)
        except Exception as e:  # noqa: BLE001
            spec["status"], spec["reason"] = _status_of(e)
            if spec["status"] == "error":
                traceback.print_exc(limit=3)
        spec["note"] = case.specrt.note
        rows.append(spec)
        echo(spec)
        for name, impl in case.peers.items():
            row = {**base, "impl": name, "status": "ok", "reason": None, **impl.extra}
            if impl.error is not None or impl.fn is None:
                row["status"], row["reason"] = "skipped", impl.error
            else:
                try:
                    row.update(runner.measure(impl, case.bytes if impl.moves_bytes else 0))
                    if impl.moves_bytes:
                        _metrics(row, case, ceil)
                    else:
                        row["time_us"], row["time_min_us"] = row["time_s"] * 1e6, row["time_min_s"] * 1e6
                    if spec.get("time_s") and row.get("time_s"):
                        row["specrt_over_peer"] = row["time_s"] / spec["time_s"]
                except Exception as e:  # noqa: BLE001
                    row["status"], row["reason"] = _status_of(e)
            row["note"] = impl.note
            rows.append(row)
            echo(row)
        del case
        if runner.gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = (f"{'kernel':<14} {'point':<38} {'impl':<18} {'mode':<5} {'cache':<12} {'time_us':>10} "
          f"{'GB/s':>9} {'%peak':>6} {'%copy':>6} {'GFLOP/s':>9} {'AI':>7} {'GPM%':>5} {'x peer':>7}  status")


def cache_state(r: dict) -> str:
    """The ``cache`` column: ``flushed`` (the cache was evicted before every rep: the point's
    data starts in DRAM / HBM) or ``warm`` (CPU ``--no-flush``: it may start in the cache), then
    ``,fits`` when the point's working set fits in the last-level cache (CPU) / L2 (GPU). A
    ``warm,fits`` row is a cache figure, not a DRAM one; a ``flushed,fits`` row read its inputs
    from DRAM but its writes may still sit in the cache when the timing stops (written back
    later), so a write-heavy point of that kind can beat the copy ceiling. ``-``: not measured."""
    if r.get("time_s") is None:
        return "-"
    return ("flushed" if r.get("cache_flushed") else "warm") + (",fits" if r.get("fits_in_cache") else "")


def format_row(r: dict) -> str:
    return (f"{r['kernel']:<14} {r['label'][:38]:<38} {r['impl']:<18} {r.get('mode') or '-':<5} "
            f"{cache_state(r):<12} {_fmt(r.get('time_us'), '10.2f')} "
            f"{_fmt(r.get('achieved_gbps'), '9.2f')} {_fmt(r.get('pct_of_peak'), '6.1f')} "
            f"{_fmt(r.get('pct_of_copy'), '6.1f')} {_fmt(r.get('gflops_per_s'), '9.2f')} "
            f"{_fmt(r.get('intensity'), '7.2f')} {_fmt(r.get('gpm_dram_util_pct'), '5.1f')} "
            f"{_fmt(r.get('specrt_over_peer'), '7.2f')}  {r['status']}"
            + (f" ({r['reason'][:80]})" if r.get("reason") else "")
            + (f" check={'pass' if r['check']['pass'] else 'FAIL'}" if r.get("check") else ""))


def write_csv(path: Path, rows: list) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})


def plot(path: Path, rows: list, ceil: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    colors = {"tree_attention": "tab:blue", "rejection": "tab:orange", "kv_rollback": "tab:green",
              "append_kv": "tab:red"}
    ok = [r for r in rows if r["status"] == "ok" and r.get("time_s")]
    bw_copy, peak, fl = ceil["copy_bytes_per_s"], ceil.get("nominal_peak_bytes_per_s"), ceil["matmul_flops_per_s"]

    # Classic roofline: kernels that do arithmetic.
    pts = [r for r in ok if r.get("intensity")]
    xs = [r["intensity"] for r in pts] or [1.0]
    lo, hi = min(xs + [fl / bw_copy]) / 4, max(xs + [fl / bw_copy]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax1.plot(grid, [min(fl, bw_copy * x) for x in grid], "k-", label=f"measured copy {bw_copy/1e9:.0f} GB/s, matmul {fl/1e12:.2f} TFLOP/s")
    if peak:
        ax1.plot(grid, [min(fl, peak * x) for x in grid], "k--", lw=0.8, label=f"nominal peak {peak/1e9:.0f} GB/s")
    for r in pts:
        spec = r["impl"] == "specrt"
        ax1.scatter(r["intensity"], r["flops"] / r["time_s"], c=colors.get(r["kernel"]),
                    marker="o" if spec else "x", s=28 if spec else 22, alpha=0.85)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax1.set_ylabel("achieved FLOP/s")
    ax1.set_title("roofline (kernels with FLOPs)")

    # Bandwidth view: every kernel, achieved bytes/s against bytes moved.
    pts2 = [r for r in ok if r.get("achieved_gbps")]
    for r in pts2:
        spec = r["impl"] == "specrt"
        fits = bool(r.get("fits_in_cache"))  # hollow: the working set fits in the cache
        col = colors.get(r["kernel"])
        ax2.scatter(r["bytes"], r["achieved_gbps"] * 1e9, marker="o" if spec else "x",
                    s=28 if spec else 22, alpha=0.85,
                    **({"facecolors": "none", "edgecolors": col} if (fits and spec) else {"c": col}))
    ax2.axhline(bw_copy, color="k", label="measured copy ceiling")
    if peak:
        ax2.axhline(peak, color="k", ls="--", lw=0.8, label="nominal peak (NVML)")
    cache = ceil.get("cache")
    if cache and cache.get("bytes"):
        how = "flushed before every rep" if cache.get("flushed") else "NOT flushed"
        ax2.axvline(cache["bytes"], color="gray", ls=":", lw=0.8,
                    label=f"{cache['level']} size {cache['bytes'] / 2**20:.0f} MiB ({how}; hollow: fits)")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("bytes that must move per call")
    ax2.set_ylabel("achieved bytes/s")
    ax2.set_title("bandwidth (all kernels)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=k) for k, c in colors.items()]
    handles += [Line2D([], [], color="gray", marker="o", ls="", label="specrt"),
                Line2D([], [], color="gray", marker="x", ls="", label="peers")]
    ax1.legend(handles=ax1.get_legend_handles_labels()[0] + handles, fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def measure_ceilings(runner: Runner) -> dict:
    dev = runner.device
    kw = runner.timing_kw()
    if runner.gpu:
        cp = common.copy_ceiling(dev, 1 << 30, **kw)
        mm = common.matmul_ceiling(dev, 8192, torch.bfloat16, **kw)
        from specrt.nvml import device_info

        info = device_info(dev.index or 0)
    else:
        # The copy's working set (source + destination) is kept above the last-level cache so
        # the ceiling is a DRAM figure even without a flush.
        llc = runner.cache_bytes or 0
        cp = common.copy_ceiling(dev, max((32 << 20) if runner.quick else (256 << 20), llc), **kw)
        mm = common.matmul_ceiling(dev, 512 if runner.quick else 1536, torch.float32, **kw)
        info = None
    return {"copy_bytes_per_s": cp["bytes_per_s"], "copy": cp,
            "matmul_flops_per_s": mm["flops_per_s"], "matmul": mm,
            "nominal_peak_bytes_per_s": info.peak_bandwidth if info else None,
            "nvml": info.as_dict() if info else None,
            "cache_bytes": runner.cache_bytes, "cache": runner.cache_info()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", default="all", choices=[*KERNELS, "all"])
    ap.add_argument("--quick", action="store_true", help="a handful of points per kernel")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default: cuda when available")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--peers", default="all", help="all, none, or a comma list of " + ",".join(PEERS))
    ap.add_argument("--no-gpm", action="store_true", help="skip the NVML GPM loop per point")
    ap.add_argument("--no-flush", action="store_true",
                    help="CPU: do not flush the last-level cache between reps (rows then say which "
                         "points fit in it); the GPU always flushes its L2")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="write results even though tracked files have uncommitted changes "
                         "(the results then say 'dirty')")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice); 1 gives stable figures on a busy machine")
    ap.add_argument("--name", default=None, help="output file stem (default roofline_<device>[_<kernel>]_<date>)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("roofline: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    peers = set(PEERS) if args.peers == "all" else set() if args.peers == "none" else set(args.peers.split(","))
    unknown = peers - set(PEERS)
    if unknown:
        print(f"roofline: unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}", file=sys.stderr)
        return 2
    kernels = list(KERNELS) if args.kernel == "all" else [args.kernel]
    try:
        git = common.require_clean_tree(args.allow_dirty)
    except common.DirtyTreeError as e:
        print(f"roofline: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = common.environment(dev, git)
    t_start = time.perf_counter()
    runner = Runner(dev, args.quick, not args.no_gpm, flush=not args.no_flush)
    ceil = measure_ceilings(runner)
    cache = ceil["cache"]
    print(f"# {env['device']} ({device}), torch {env['torch']}, CUDA {env['cuda']}, git {common.git_label(git)}")
    print(f"# {cache['level']} {_fmt(cache['bytes'] and cache['bytes'] / 2**20, '.0f')} MiB: {cache['method']}")
    print(f"# copy ceiling {ceil['copy_bytes_per_s']/1e9:.1f} GB/s, matmul {ceil['matmul_flops_per_s']/1e9:.1f} GFLOP/s"
          + (f", nominal peak {ceil['nominal_peak_bytes_per_s']/1e9:.0f} GB/s" if ceil["nominal_peak_bytes_per_s"] else ""))
    print(HEADER)
    rows: list[dict] = []
    echo = lambda r: print(format_row(r), flush=True)  # noqa: E731
    for k in kernels:
        run_kernel(k, runner, ceil, peers, rows, echo)
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    stem = args.name or f"roofline_{device}{'' if args.kernel == 'all' else '_' + args.kernel}_{date}"
    doc = {"meta": {**env, "git_label": common.git_label(git), "cache": ceil["cache"],
                    "kernels": kernels, "quick": args.quick, "peers": sorted(peers),
                    "gpm": {"used": runner.monitor_ok, "reason": runner.monitor_reason},
                    "wall_s": time.perf_counter() - t_start,
                    "method": __doc__.split("Method\n------\n")[1].split("\n\nBytes")[0]},
           "ceilings": ceil, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str))
    write_csv(out_dir / f"{stem}.csv", rows)
    plot(out_dir / f"{stem}.png", rows, ceil, f"{env['device']} | {env['date']} | torch {env['torch']} | "
         f"git {common.git_label(git)} | {env['command']}")
    n_bad = sum(r["status"] == "error" for r in rows)
    fails = [r["label"] for r in rows if r.get("check") and not r["check"]["pass"]]
    print(f"# wrote {out_dir / stem}.{{json,csv,png}}; {len(rows)} rows, {n_bad} errors"
          + (f", reference check FAILED at {fails}" if fails else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
