"""The plug-in interface of a trainable proposer (Medusa, EAGLE-3, EAGLE-1; MTP later).

The trainer owns everything method-independent (data, hidden-state cache, distribution,
optimizer, schedule, checkpoints, evaluation loop); a :class:`Method` says what is trained and
how a batch is scored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["Method", "ChainDraftMethod"]


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


class ChainDraftMethod(Method):
    """Shared pieces of the methods whose draft at depth ``d`` below a position is scored
    against the target's own greedy token there (EAGLE's steps, MTP's modules): batch
    cropping and shifting, the target's argmax, and top-1 / top-5 / chain counters with their
    summary."""

    @staticmethod
    def crop(batch: dict) -> dict:
        """Drop the columns past the longest row of the batch (all padding)."""
        tok = batch["tokens"]
        real = (tok >= 0).sum(1)
        s = max(int(real.max()), 2) if real.numel() else tok.shape[1]
        if s >= tok.shape[1]:
            return batch
        return {k: (v[:, :s] if torch.is_tensor(v) and v.dim() >= 2 else v)
                for k, v in batch.items()}

    @staticmethod
    def shift(x: torch.Tensor, s: int, n: int, fill) -> torch.Tensor:
        """``x[:, s:s + n]`` padded with ``fill`` to length ``n`` along dim 1."""
        y = x[:, s:s + n]
        if y.shape[1] < n:
            pad = torch.full((x.shape[0], n - y.shape[1], *x.shape[2:]), fill, dtype=x.dtype,
                             device=x.device)
            y = torch.cat([y, pad], dim=1)
        return y

    @staticmethod
    @torch.no_grad()
    def target_argmax(hidden: torch.Tensor, lm_head: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
        """The target's greedy next token at every position [B, S] from its final-normed
        hidden states (in slices of 2048 rows), -1 on padding."""
        b, s, hs = hidden.shape
        flat = hidden.reshape(-1, hs)
        am = torch.cat([(flat[i:i + 2048].float() @ lm_head.t()).argmax(-1)
                        for i in range(0, flat.shape[0], 2048)]).reshape(b, s)
        return torch.where(tokens >= 0, am, torch.full_like(am, -1))

    @staticmethod
    def chain_counters(tops: list, wants: list, inside: list) -> dict:
        """Per depth ``d``: ``tops[d]`` [B, n, r] the draft's best tokens, ``wants[d]`` [B, n]
        the target's greedy token (-1: unreachable, a miss), ``inside[d]`` [B, n] scored
        positions. Counts top-1 / top-r hits and chain hits (depths 0..d all right)."""
        k = len(tops)
        top1, top5, chain, total = (torch.zeros(k) for _ in range(4))
        ok = torch.ones_like(inside[0])
        for d, (top, want, ins) in enumerate(zip(tops, wants, inside)):
            hit = (top[..., 0] == want) & (want >= 0)
            ok = ok & hit
            top1[d] = (hit & ins).sum().float().cpu()
            top5[d] = (((top == want.unsqueeze(-1)).any(-1)) & (want >= 0) & ins).sum().float().cpu()
            chain[d] = (ok & ins).sum().float().cpu()
            total[d] = ins.sum().float().cpu()
        return {"top1_hits": top1, "top5_hits": top5, "chain_hits": chain, "targets": total}

    def summarize(self, counters: dict) -> dict:
        tot = counters["targets"].double().clamp(min=1)
        chain = counters["chain_hits"].double() / tot
        return {"targets": [int(t) for t in counters["targets"].tolist()],
                "top1": [round(float(a), 4) for a in counters["top1_hits"].double() / tot],
                "top5": [round(float(a), 4) for a in counters["top5_hits"].double() / tot],
                "chain": [round(float(a), 4) for a in chain],
                # expected accepted drafts of a greedy chain as deep as the counters
                "expected_accepted": round(float(chain.sum()), 4)}

    def format_metrics(self, m: dict) -> str:
        acc = (m["top1_hits"] / m["targets"].clamp(min=1)).tolist()
        return "top1 " + " ".join(f"{a:.3f}" for a in acc)
