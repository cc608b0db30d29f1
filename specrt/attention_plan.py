"""Host-side split-KV (flash-decoding) plan for the CUDA tree-attention kernel.

The kernel's grid is ``(item_capacity, num_kv_heads)``: one CTA per (work item, kv head). A work
item is a contiguous range of KV positions of one sequence; it serves every query row of that
sequence (all nodes x the query heads of the kv head). A sequence split into several items
writes fp32 partial outputs and their log-sum-exp to the workspace, and a merge kernel combines
them; a sequence with a single item is written to ``out`` directly.

Plan layout (int32, 1-D, on the device)::

    [0:8]                       header: num_items, item_capacity, batch, kv_chunk,
                                        workspace_rows, 0, 0, 0
    [8 : 8 + 4*cap]             items: (seq, kv_start, kv_end, partial_row) per item,
                                        ordered by sequence; partial_row = -1 for unsplit seqs
    [8 + 4*cap : + batch + 1]   seq_item_indptr: items of sequence b are
                                        seq_item_indptr[b] .. seq_item_indptr[b+1]-1

Workspace (float32, 1-D): ``workspace_rows * Hq * D`` partial outputs (row-major
``[row, head, dim]``, row = partial_row + local node) followed by ``workspace_rows * Hq``
partial LSEs (natural log).

Split rule: aim at about two CTAs per SM, ``target = ceil(2 * num_sms / Hkv)`` items; the chunk
is ``max(128, 2 * max_T * group, ceil(total_kv / target))`` rounded up to 64 keys, the same for
every sequence. So batch 1 at 32k context with 8 kv heads on 132 SMs gets 32 chunks of 1024 keys
= 256 CTAs, and a large batch is not split at all. NOTE: the ``2 * rows`` floor bounds the fp32
partial traffic (``T * group`` rows per item) to about half of the item's K/V bytes: big trees
split less and rely on the row loop inside the CTA.

Both tensors' sizes depend only on (batch, total_q, max_T, heads, head_dim, num_sms) and not on
``seq_lens``: a CUDA graph captured with one plan can be replayed after a fresh plan for the same
bucket is copied into the captured plan tensor (pass ``plan_out=``/``workspace_out=`` to write
into preallocated tensors; the copy is asynchronous on the current stream).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

HEADER = 8
MIN_CHUNK = 128
CHUNK_ALIGN = 64  # the kernel's KV tile for head_dim <= 128 (a multiple of the 256 tile's 32)
CTAS_PER_SM = 2


def plan_sizes(batch: int, total_q: int, max_t: int, num_kv_heads: int, num_sms: int):
    """(item_capacity, workspace_rows) for a bucket; what :func:`plan_tree_attention` allocates."""
    target = max(1, math.ceil(CTAS_PER_SM * num_sms / num_kv_heads))
    cap = target + batch
    # A split sequence has L_b > chunk, so ceil(L_b / chunk) <= 2 L_b / chunk, and
    # sum_b L_b / chunk <= target: at most 2 * target items of split sequences, each with at
    # most max_T rows; also at most (target + 1) items per sequence.
    rows = min(max_t * 2 * target, total_q * (target + 1))
    return cap, max(rows, 1)


def plan_tree_attention(qo_indptr_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor,
                        num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                        num_sms: Optional[int], device, *, plan_out: Optional[torch.Tensor] = None,
                        workspace_out: Optional[torch.Tensor] = None):
    """Split-KV plan for one tree_attention launch.

    Parameters
    ----------
    qo_indptr_cpu : int32 [B+1] (CPU)
    seq_lens_cpu : int32 [B] (CPU), KV lengths including the new tokens
    num_qo_heads, num_kv_heads, head_dim, page_size : int
    num_sms : int or None (None: read from the device)
    device : the CUDA device of the attention call
    plan_out, workspace_out : optional preallocated tensors of the sizes this function would
        allocate (see :func:`plan_sizes`); written in place and returned.

    Returns
    -------
    plan : int32 [8 + 4 * item_capacity + B + 1] on ``device``
    workspace : float32 [workspace_rows * Hq * (D + 1)] on ``device``
    """
    device = torch.device(device)
    qo = [int(x) for x in qo_indptr_cpu.tolist()]
    lens = [int(x) for x in seq_lens_cpu.tolist()]
    batch = len(lens)
    if len(qo) != batch + 1:
        raise ValueError(f"qo_indptr has {len(qo)} entries for {batch} sequences")
    if num_kv_heads <= 0 or num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads {num_qo_heads} must be a multiple of {num_kv_heads}")
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    ts = [qo[b + 1] - qo[b] for b in range(batch)]
    if any(t < 0 for t in ts) or any(lens[b] < ts[b] for b in range(batch)):
        raise ValueError("qo_indptr must be non-decreasing and seq_lens >= T per sequence")
    total_q = qo[-1] if batch else 0
    max_t = max(ts, default=1)
    cap, ws_rows = plan_sizes(batch, total_q, max(max_t, 1), num_kv_heads, num_sms)
    target = cap - batch

    total_kv = sum(lens)
    group = num_qo_heads // num_kv_heads
    chunk = max(MIN_CHUNK, 2 * max_t * group, math.ceil(total_kv / target))
    chunk = (chunk + CHUNK_ALIGN - 1) // CHUNK_ALIGN * CHUNK_ALIGN

    items: list[tuple[int, int, int, int]] = []
    seq_item_indptr = [0]
    part_row = 0
    for b in range(batch):
        n_items = max(1, math.ceil(lens[b] / chunk)) if ts[b] > 0 else 0
        for c in range(n_items):
            start, end = c * chunk, min(lens[b], (c + 1) * chunk)
            items.append((b, start, end, part_row if n_items > 1 else -1))
            if n_items > 1:
                part_row += ts[b]
        seq_item_indptr.append(len(items))
    assert len(items) <= cap and part_row <= ws_rows, "plan bound violated"

    plan = torch.zeros(HEADER + 4 * cap + batch + 1, dtype=torch.int32)
    plan[:5] = torch.tensor([len(items), cap, batch, chunk, ws_rows], dtype=torch.int32)
    if items:
        plan[HEADER:HEADER + 4 * len(items)] = torch.tensor(items, dtype=torch.int32).flatten()
    plan[HEADER + 4 * cap:] = torch.tensor(seq_item_indptr, dtype=torch.int32)
    ws_numel = ws_rows * num_qo_heads * (head_dim + 1)

    if plan_out is not None:
        if plan_out.shape != plan.shape or plan_out.dtype != torch.int32:
            raise ValueError(f"plan_out must be int32 {tuple(plan.shape)}")
        plan_out.copy_(plan, non_blocking=True)
        plan = plan_out
    else:
        plan = plan.to(device)
    if workspace_out is not None:
        if workspace_out.numel() < ws_numel or workspace_out.dtype != torch.float32:
            raise ValueError(f"workspace_out must be float32 with >= {ws_numel} elements")
        workspace = workspace_out
    else:
        workspace = torch.empty(ws_numel, dtype=torch.float32, device=device)
    return plan, workspace
