"""Medusa-1 head training on a frozen target.

Head ``k`` reads the target's final-normed hidden state at position ``t`` and predicts the
token at ``t + 2 + k``. Loss: ``sum_k 0.8**k * CE_k`` (the Medusa paper's head weighting),
each ``CE_k`` the mean cross-entropy over the head's targets that lie in the draft vocabulary
(``token_map``: the most frequent training tokens; a target outside it is left out of the loss
and counted as a miss in every accuracy). The output projection is the target's own LM head
(rows ``token_map``), frozen; the residual blocks start at zero, so before training every head
predicts what the target's next-token head predicts.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..proposers.medusa import MedusaHeads, save_medusa_heads
from .base import Method

__all__ = ["MedusaMethod", "build_token_map", "RANKS"]

#: ranks recorded per head in ``medusa_rank_accuracy``
RANKS = 10


def build_token_map(token_arrays, vocab_size: int, size: int) -> Optional[torch.Tensor]:
    """The ``size`` most frequent token ids of ``token_arrays`` (int arrays, PAD = -1 ignored),
    most frequent first (ties: lower id first); unseen ids fill up the map in id order.
    ``size`` 0 or >= ``vocab_size``: None (the full vocabulary)."""
    if size < 0:
        raise ValueError(f"draft vocabulary size must be >= 0, got {size}")
    if size == 0 or size >= vocab_size:
        return None
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a in token_arrays:
        a = np.asarray(a).reshape(-1)
        a = a[(a >= 0) & (a < vocab_size)]
        counts += np.bincount(a, minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))  # count desc, then id asc
    return torch.from_numpy(order[:size].astype(np.int64))


class MedusaMethod(Method):
    """Medusa-1 heads on the target's LM head (ResBlock-only layout).

    Parameters
    ----------
    hidden_size, vocab_size : the target's
    lm_head : [V, H] tensor, the target's (frozen) output projection
    num_heads, num_layers : K heads of ``num_layers`` residual blocks
    token_map : draft vocabulary (None: full)
    decay : head ``k`` loss weight ``decay ** k``
    labels : ``"text"``: head ``k`` at ``t`` learns the data's token ``t + 2 + k``;
        ``"target"``: the target's own greedy prediction of that token (its argmax at
        ``t + 1 + k`` given the data's prefix, over the draft vocabulary), i.e. what greedy
        verification will accept (self-distillation at the label level, as in Medusa-2)
    """

    name = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, lm_head: torch.Tensor, *,
                 num_heads: int = 4, num_layers: int = 1,
                 token_map: Optional[torch.Tensor] = None, decay: float = 0.8,
                 labels: str = "text", device="cpu"):
        if labels not in ("text", "target"):
            raise ValueError(f"labels must be 'text' or 'target', got {labels!r}")
        self.labels = labels
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        self.token_map = token_map
        self.decay = decay
        self.device = torch.device(device)
        self.lm_head = lm_head.detach()
        # the full [V, H] projection (fp32); the heads gather rows token_map (and cache them)
        self.proj = self.lm_head.to(device=self.device, dtype=torch.float32)
        inv = torch.full((vocab_size,), -2, dtype=torch.long)
        if token_map is None:
            inv = torch.arange(vocab_size)
        else:
            inv[token_map] = torch.arange(token_map.numel())
        self.inv = inv.to(self.device)  # target id -> draft column, -2 outside the map
        # the target's LM-head rows of the draft vocabulary (labels "target")
        self.draft_rows = (self.proj if token_map is None
                           else self.proj.index_select(0, token_map.to(self.device)))

    # ------------------------------------------------------------------------------ module
    def build(self) -> nn.Module:
        return MedusaHeads(self.hidden_size, self.vocab_size, self.num_heads, self.num_layers,
                           bias=True, own_lm_head=False, token_map=self.token_map,
                           dtype=torch.float32, device=self.device)

    def term_weights(self) -> torch.Tensor:
        return torch.tensor([self.decay ** k for k in range(self.num_heads)])

    # ------------------------------------------------------------------------------ batches
    def _inputs(self, batch: dict):
        """(x [N, H] at positions with a head-0 target, labels [K, N]): labels are draft
        columns, -2 outside the map, -1 no target (past the row's end)."""
        tok, hid = batch["tokens"], batch["hidden"]
        b, s = tok.shape
        k_ = self.num_heads
        if s < 3:
            raise ValueError(f"sequence length {s} leaves no Medusa target (need >= 3)")
        lab = torch.full((k_, b, s - 2), -1, dtype=torch.long, device=tok.device)
        for k in range(k_):
            n = s - 2 - k
            if n > 0:
                lab[k, :, :n] = tok[:, 2 + k:2 + k + n]
        keep = lab[0] >= 0  # head 0 has a target (so the position and its hidden are real)
        if self.labels == "target":
            # the target's argmax (draft columns) at positions 1..s-1: pred[:, p - 1] is its
            # guess for token p + 1; head k at t wants the guess for token t + 2 + k
            with torch.no_grad():
                rows = self.draft_rows
                pred = torch.cat([(hid[i:i + 1, 1:].float() @ rows.t()).argmax(-1)
                                  for i in range(b)])
            for k in range(k_):
                n = s - 2 - k
                if n > 0:
                    lab[k, :, :n] = torch.where(lab[k, :, :n] >= 0, pred[:, k:k + n], -1)
            lab = lab[:, keep]
            return hid[:, :s - 2][keep], lab
        lab = lab[:, keep]
        x = hid[:, :s - 2][keep]
        valid = lab >= 0
        cols = torch.where(valid, self.inv[lab.clamp(min=0)], torch.full_like(lab, -1))
        return x, cols

    def _logits(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x, self.proj)  # [K, N, Vd]

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        x, cols = self._inputs(batch)
        logits = self._logits(module, x)
        k_ = self.num_heads
        sums, counts, hits, total = [], [], [], []
        for k in range(k_):
            c = cols[k]
            in_map = c >= 0
            ce = F.cross_entropy(logits[k][in_map], c[in_map], reduction="sum") \
                if bool(in_map.any()) else logits[k].sum() * 0.0
            sums.append(ce)
            counts.append(in_map.sum())
            with torch.no_grad():
                top = logits[k].argmax(-1)
                hits.append(((top == c) & in_map).sum())
                total.append((c != -1).sum())
        metrics = {"top1_hits": torch.stack(hits).float(), "targets": torch.stack(total).float()}
        return torch.stack(sums), torch.stack(counts).float(), metrics

    @torch.no_grad()
    def eval_counters(self, module: nn.Module, batch: dict) -> dict:
        x, cols = self._inputs(batch)
        k_ = self.num_heads
        rank_hits = torch.zeros(k_, RANKS)
        total = torch.zeros(k_)
        nll = torch.zeros(k_)
        nll_n = torch.zeros(k_)
        for i in range(0, x.shape[0], 4096):  # bound the logits' memory
            lg = self._logits(module, x[i:i + 4096])
            c = cols[:, i:i + 4096]
            r = min(RANKS, lg.shape[-1])
            top = lg.topk(r, dim=-1).indices  # [K, n, r]
            match = (top == c.unsqueeze(-1)) & (c >= 0).unsqueeze(-1)
            rank_hits[:, :r] += match.sum(1).float().cpu()
            total += (c != -1).sum(1).float().cpu()
            lp = torch.log_softmax(lg, -1)
            ok = c >= 0
            g = lp.gather(-1, c.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll += (-(g * ok)).sum(1).cpu()
            nll_n += ok.sum(1).float().cpu()
        return {"rank_hits": rank_hits.reshape(-1), "targets": total, "nll": nll,
                "nll_n": nll_n}

    def summarize(self, counters: dict) -> dict:
        k_ = self.num_heads
        hits = counters["rank_hits"].reshape(k_, RANKS).double()
        tot = counters["targets"].double().clamp(min=1)
        acc = hits / tot[:, None]
        return {
            "targets": [int(t) for t in counters["targets"].tolist()],
            "top1": [round(float(a), 4) for a in acc[:, 0]],
            "top5": [round(float(a), 4) for a in acc[:, :5].sum(1)],
            "rank_accuracy": [[round(float(v), 5) for v in row] for row in acc],
            "ce_in_vocab": [round(float(a), 4) for a in
                            (counters["nll"] / counters["nll_n"].clamp(min=1))],
        }

    def format_metrics(self, m: dict) -> str:
        acc = (m["top1_hits"] / m["targets"].clamp(min=1)).tolist()
        return "top1 " + " ".join(f"{a:.3f}" for a in acc)

    # ------------------------------------------------------------------------------ output
    def save(self, module: nn.Module, out_dir, extra_config: Optional[dict] = None,
             layout: str = "resblock", dtype=torch.float16) -> None:
        src = module
        out = MedusaHeads(self.hidden_size, self.vocab_size, self.num_heads, self.num_layers,
                          bias=src.block_bias is not None, own_lm_head=False,
                          token_map=self.token_map, dtype=dtype, device="cpu")
        with torch.no_grad():
            out.block_weight.copy_(src.block_weight.detach().cpu())
            if src.block_bias is not None:
                out.block_bias.copy_(src.block_bias.detach().cpu())
        extra = dict(extra_config or {})
        if layout != "resblock":  # Medusa-1 / vLLM files carry the projection
            extra["target_lm_head"] = self.lm_head.to(dtype=dtype, device="cpu")
        save_medusa_heads(out, out_dir, layout=layout, extra_config=extra)
