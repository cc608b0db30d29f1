"""The plug-in interface of a trainable proposer (Medusa, EAGLE-3, EAGLE-1; MTP later).

The trainer owns everything method-independent (data, hidden-state cache, distribution,
optimizer, schedule, checkpoints, evaluation loop); a :class:`Method` says what is trained and
how a batch is scored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["Method"]


class Method:
    """A trainable proposer on a frozen target.

    A batch is a dict with ``tokens`` (int64 [B, S], PAD = -1) and ``hidden`` (the target's
    final-normed hidden states, float [B, S, H]); with a hidden-state cache of kind
    ``"eagle3"`` (a method's ``cache_kind`` attribute, default ``"final_norm"``, and its
    ``feature_layers``) also ``features`` (float [B, S, 3H]) and ``argmax`` (the target's
    greedy next token, int64 [B, S], -1 on padding).
    """

    #: name used by the CLI and in output cards
    name: str = "?"

    def build(self) -> nn.Module:
        """The trainable module (fresh initialisation)."""
        raise NotImplementedError

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        """``(sums, counts, metrics)``: per-term loss sums and the number of targets each sum
        covers (float tensors of equal length, counts without grad), plus metric counters (a
        dict of 1-D float tensors, summed over ranks by the trainer). The trainer forms
        ``sum_i weight_i * sums_i / global_counts_i`` so that sharded batches give the loss of
        the whole global batch."""
        raise NotImplementedError

    def term_weights(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_counters(self, module: nn.Module, batch: dict) -> dict:
        """Evaluation counters (1-D float tensors, summed over batches and ranks)."""
        raise NotImplementedError

    def summarize(self, counters: dict) -> dict:
        """Accuracies etc. from summed evaluation counters (JSON-serialisable)."""
        raise NotImplementedError

    def save(self, module: nn.Module, out_dir, extra_config: Optional[dict] = None) -> None:
        """Write the trained module in the method's public layout."""
        raise NotImplementedError

    def format_metrics(self, metrics: dict) -> str:
        return ""
