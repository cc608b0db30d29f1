"""Per-step metadata handed from the engine to a model's forward (one ragged batch).

The engine builds it from the draft trees (``specrt.tree``) and the page tables
(``specrt.kv_cache``); models only read it. Every tensor lives on the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where the new tokens of one forward go in the paged cache, and what they may see.

    Attributes
    ----------
    qo_indptr : int32 [B+1]
        Row offsets of each sequence's new tokens in the flat ``[N]`` token batch.
    seq_lens : int32 [B]
        KV length of each sequence *including* its new tokens (committed + T_b).
    block_table : int32 [B, max_pages]
        Page ids of each sequence (``-1`` past its allocation).
    slot_mapping : int64 [N]
        Cache slot (``page * page_size + offset``) each new token's K/V is written to; -1 = pad.
    mask : int32 [N, W] or None
        Packed visibility among the new tokens (docs/ops.md); None = causal (chains, prompts).
    plan, workspace : optional
        CUDA split-KV plan / scratch from ``specrt.ops.plan_tree_attention`` (None on CPU).
    trusted : bool
        Built by specrt (``kv_cache.build_metadata``): the model skips the ops' Python-side
        checks for it. False (the default) for metadata built elsewhere.
    """

    qo_indptr: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    mask: Optional[torch.Tensor] = None
    plan: Optional[torch.Tensor] = None
    workspace: Optional[torch.Tensor] = None
    trusted: bool = False

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
