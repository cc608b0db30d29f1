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
from typing import Optional, Sequence, Union

import numpy as np
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


class AttentionPlanner:
    """Split-KV plans for one attention shape (a model's heads, head_dim and page size on one
    device) into preallocated buffers: one plan tensor per batch size (its size depends on the
    batch only) and one workspace sized up front for the largest bucket (``max_batch``
    sequences of ``max_t`` new tokens), so a CUDA graph captured for a bucket stays valid when
    later plans of that bucket are written into the same tensors.

    Plan once per forward (``build_metadata(..., planner=)``); every layer reuses it.

    Parameters
    ----------
    num_qo_heads, num_kv_heads, head_dim, page_size : int
    device : the device of the attention calls (CUDA; any device works, for tests)
    max_batch, max_t : the largest bucket the workspace is reserved for (a larger forward
        grows it, which invalidates graphs captured before)
    num_sms : int or None (None: read from the CUDA device)
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 device, *, max_batch: int = 1, max_t: int = 1, num_sms: Optional[int] = None):
        if num_kv_heads <= 0 or num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads {num_qo_heads} must be a multiple of {num_kv_heads}")
        self.device = torch.device(device)
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.head_dim, self.page_size, self.num_sms = head_dim, page_size, int(num_sms)
        self.max_batch, self.max_t = max(1, max_batch), max(1, max_t)
        self._plans: dict[int, torch.Tensor] = {}
        self._workspace: Optional[torch.Tensor] = None
        self.num_plans = 0  # plans written (one per planned forward)

    def _ws_numel(self, rows: int) -> int:
        return rows * self.num_qo_heads * (self.head_dim + 1)

    def plan(self, qo_indptr: Union[Sequence[int], np.ndarray, torch.Tensor],
             seq_lens: Union[Sequence[int], np.ndarray, torch.Tensor]):
        """``(plan, workspace)`` for one forward; ``qo_indptr`` [B+1] and ``seq_lens`` [B] are
        host values (no device read). The returned tensors are this planner's buffers."""
        qo = torch.as_tensor(np.asarray(qo_indptr, dtype=np.int32))
        lens = torch.as_tensor(np.asarray(seq_lens, dtype=np.int32))
        batch = int(lens.numel())
        ts = qo[1:] - qo[:-1]
        total_q = int(qo[-1]) if batch else 0
        max_t = max(int(ts.max()) if batch else 1, 1)
        cap, rows = plan_sizes(batch, total_q, max_t, self.num_kv_heads, self.num_sms)
        buf = self._plans.get(batch)
        if buf is None:
            buf = torch.zeros(HEADER + 4 * cap + batch + 1, dtype=torch.int32, device=self.device)
            self._plans[batch] = buf
        need = self._ws_numel(rows)
        if self._workspace is None or self._workspace.numel() < need:
            _, reserve = plan_sizes(self.max_batch, self.max_batch * self.max_t, self.max_t,
                                    self.num_kv_heads, self.num_sms)
            self._workspace = torch.empty(max(need, self._ws_numel(reserve)),
                                          dtype=torch.float32, device=self.device)
        self.num_plans += 1
        return plan_tree_attention(qo, lens, self.num_qo_heads, self.num_kv_heads,
                                   self.head_dim, self.page_size, self.num_sms, self.device,
                                   plan_out=buf, workspace_out=self._workspace)
