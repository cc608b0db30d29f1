"""Lossy acceptance rules, opt-in only.

specrt verifies losslessly by default (``ops.rejection_sample``). The Medusa reference instead
accepts, at temperature > 0, any draft token the target finds "typical enough" (Cai et al.
2024, section 2.3.1): a node is accepted when the target's probability of its token at the
parent exceeds ``min(posterior_threshold, posterior_alpha * exp(-entropy))``. That raises
acceptance and changes the output distribution, so it lives here, behind a name that says so:
``Engine(..., lossy_acceptance=TypicalAcceptance())``.

Greedy requests (temperature 0) keep the exact rule: their output still equals plain greedy
decoding. Like the reference, the typical rule uses the temperature only (no top-k / top-p).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import VerifyOutput

__all__ = ["TypicalAcceptance"]

_MIX = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class TypicalAcceptance:
    """The reference's typical acceptance (lossy).

    Per sequence: among the tree's nodes whose every edge passes the typical test, take the
    deepest (ties: the largest sum of log-probabilities along the path, then the first node);
    emit its path's tokens and a bonus token sampled from the deepest accepted node's
    distribution restricted to the tokens above its threshold (the reference's
    ``get_typical_one_token``).
    """

    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    def __post_init__(self):
        if not (0 < self.posterior_threshold <= 1) or not (0 < self.posterior_alpha):
            raise ValueError("need 0 < posterior_threshold <= 1 and posterior_alpha > 0")

    @torch.no_grad()
    def thresholds(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-row threshold ``min(eps, alpha * exp(-H))`` (the reference's entropy, with its
        ``+ 1e-5`` inside the log)."""
        ent = -(probs * torch.log(probs + 1e-5)).sum(-1)
        return torch.clamp(torch.exp(-ent) * self.posterior_alpha, max=self.posterior_threshold)

    @torch.no_grad()
    def apply(self, ver: VerifyOutput, logits: torch.Tensor, tokens: torch.Tensor,
              parents: torch.Tensor, num_nodes, temperature, seed, step) -> VerifyOutput:
        """Replace the sampled sequences' results in ``ver`` (exact results of the lossless
        op, kept for greedy ones) by typical acceptance; returns ``ver``.

        ``logits`` [N, V], ``tokens`` / ``parents`` [N] as verified; ``num_nodes``,
        ``temperature``, ``seed``, ``step``: per-sequence host lists.
        """
        max_t = ver.tokens.shape[1]
        tok = tokens.tolist()
        par = parents.tolist()
        invalid = (ver.num_accepted < 0).tolist()  # non-finite logits stay reported as such
        start = 0
        rows = []
        for b, t in enumerate(num_nodes):
            lo, start = start, start + t
            temp = float(temperature[b])
            if not temp > 0 or invalid[b]:
                continue
            p = torch.softmax(logits[lo:lo + t].float() / temp, dim=-1)
            thr = self.thresholds(p)
            depth, score, ok = [0] * t, [0.0] * t, [True] * t
            best = 0
            child_tok = torch.tensor(tok[lo + 1:lo + t], dtype=torch.long, device=p.device)
            par_idx = torch.tensor(par[lo + 1:lo + t], dtype=torch.long, device=p.device)
            if t > 1:
                q = p[par_idx, child_tok]
                passed = (q > thr[par_idx]).tolist()
                logq = torch.log(q).tolist()
            for i in range(1, t):
                pa = par[lo + i]
                ok[i] = ok[pa] and passed[i - 1]
                if not ok[i]:
                    continue
                depth[i] = depth[pa] + 1
                score[i] = score[pa] + logq[i - 1]
                if depth[i] > depth[best] or (depth[i] == depth[best] and score[i] > score[best]):
                    best = i
            path = []
            i = best
            while i >= 0:
                path.append(i)
                i = par[lo + i] if i > 0 else -1
            path.reverse()
            keep = p[best] >= thr[best]  # the reference drops tokens below the threshold
            dist = torch.where(keep, p[best], torch.zeros_like(p[best]))
            if float(dist.sum()) <= 0:  # cannot happen (the argmax is >= threshold); be safe
                dist = p[best]
            g = torch.Generator(device="cpu").manual_seed(
                (int(seed[b]) * _MIX + int(step[b]) + 1) % (2**63))
            bonus = int(torch.multinomial(dist.cpu(), 1, generator=g))
            emitted = [tok[lo + j] for j in path[1:]] + [bonus]
            rows.append((b, path, emitted))
        if not rows:
            return ver
        tokens_h = ver.tokens.cpu()
        path_h = ver.path.cpu()
        acc_h = ver.num_accepted.cpu()
        for b, path, emitted in rows:
            tokens_h[b] = -1
            path_h[b] = -1
            tokens_h[b, :len(emitted)] = torch.tensor(emitted[:max_t], dtype=torch.int32)
            path_h[b, :len(path)] = torch.tensor(path, dtype=torch.int32)
            acc_h[b] = len(path) - 1
        dev = ver.tokens.device
        ver.tokens.copy_(tokens_h.to(dev))
        ver.path.copy_(path_h.to(dev))
        ver.num_accepted.copy_(acc_h.to(dev))
        return ver
