"""EAGLE head training on a frozen target: EAGLE-3 (training-time test) and EAGLE-1.

The head is :class:`specrt.proposers.eagle.EagleHead`; training runs its pieces
(``inputs -> qkv -> attention -> finish -> logits``) with a dense, differentiable attention
(:func:`ttt_attention`) in place of the paged op, so a trained head drafts exactly what it was
trained to draft (``tests/test_train_eagle.py`` checks the two paths against each other).

Head position ``i`` reads ``(feature f_i, token t_{i+1})`` and predicts ``t_{i+2}``.

EAGLE-3, training-time test (TTT), ``length`` unrolled steps
    Step 0 at position ``i`` reads the target's features (the inputs of layers 2, L/2 and L-3,
    3H wide, fused by the head's fc); step ``s > 0`` reads the head's own step-``s-1`` output
    at ``i`` and the token ``t_{i+1+s}``, and predicts ``t_{i+2+s}``: the depth-``s`` draft
    node below position ``i`` when the earlier drafts were right. Attention at step ``s``,
    position ``i``: the step-0 keys / values of positions ``0..i`` (causal) plus those of steps
    ``1..s`` at ``i`` itself. RoPE position ``i + s``: where inference places a depth-``s``
    node (the reference keeps ``i``; we follow our inference code). Loss: per step, the
    cross-entropy of the head's log-softmax over the draft vocabulary against the target's
    distribution restricted to it (softmax of the target's logits over the draft columns, from
    the cached final-normed hidden state), at positions inside the row whose target argmax lies
    in the draft vocabulary; step weight ``0.8 ** s``.

EAGLE-1
    The feature is the target's final-normed hidden state (with the reference's uniform input
    noise while training); one causal step. Loss: smooth-L1 between the head's output ``h_i``
    and the next feature ``f_{i+1}`` (weight 1) + 0.1 x cross-entropy of
    ``lm_head(h_i)`` against the target's distribution at ``i + 1``.

Evaluation (both): per-step top-1 accuracy against the target's argmax over ``eval_length``
unrolled steps (EAGLE-1 feeds its own outputs as at inference), and the chain accuracy (steps
``0..s`` all right), whose sum is the expected number of drafted tokens a greedy chain gets
accepted.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..proposers.eagle import EagleConfig, EagleHead, save_eagle_head
from .base import ChainDraftMethod

__all__ = ["Eagle3Method", "Eagle1Method", "EagleTrainModule", "ttt_forward", "ttt_attention",
           "draft_vocab_maps", "init_head"]


# --------------------------------------------------------------------------------------------
# dense forward
# --------------------------------------------------------------------------------------------


def ttt_attention(q: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, ks: list, vs: list,
                  scale: float) -> torch.Tensor:
    """Training-time-test attention.

    ``q`` [B, n, Hq, D]: queries of one step at positions ``0..n-1``; ``k0``, ``v0``
    [B, n, Hkv, D]: step 0's keys / values (causal); ``ks``, ``vs``: lists of [B, n, Hkv, D],
    steps ``1..s``'s keys / values, each visible to the query at its own position only.
    GQA: query head ``h`` reads kv head ``h // (Hq / Hkv)``. Returns [B, n, Hq, D] (float32
    softmax, output in ``q``'s dtype)."""
    b, n, hq, d = q.shape
    hkv = k0.shape[2]
    g = hq // hkv
    qh = q.reshape(b, n, hkv, g, d)
    s0 = torch.einsum("bikgd,bjkd->bkgij", qh, k0) * scale  # [B, Hkv, g, n, n]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s0 = s0.float().masked_fill(~causal, float("-inf"))
    if ks:
        diag = torch.stack([torch.einsum("bikgd,bikd->bkgi", qh, kr) * scale for kr in ks],
                           dim=-1).float()  # [B, Hkv, g, n, s]
        p = torch.softmax(torch.cat([s0, diag], dim=-1), dim=-1)
        p0, pd = p[..., :n], p[..., n:]
    else:
        p0, pd = torch.softmax(s0, dim=-1), None
    out = torch.einsum("bkgij,bjkd->bikgd", p0.to(v0.dtype), v0)
    if pd is not None:
        vstack = torch.stack(vs, dim=-1)  # [B, n, Hkv, D, s]
        out = out + torch.einsum("bkgir,bikdr->bikgd", pd.to(v0.dtype), vstack)
    return out.reshape(b, n, hq, d)


def ttt_forward(head: EagleHead, feats: torch.Tensor, tokens: torch.Tensor,
                embed: torch.Tensor, cos_tab: torch.Tensor, sin_tab: torch.Tensor,
                length: int, lm_head: Optional[torch.Tensor] = None,
                want_logits: bool = True) -> tuple:
    """Unrolled dense forward of ``head`` over a batch of rows.

    ``feats`` [B, n, F]: the features at head positions ``0..n-1`` (F = 3H for EAGLE-3 target
    features, H otherwise); ``tokens`` int64 [B, >= n + 1] (PAD = -1 allowed: such inputs
    only feed positions that are scored as outside the row); ``embed`` the target's embedding;
    ``cos_tab`` / ``sin_tab`` the target's RoPE tables [P, D/2]. Step ``s`` at position ``i``
    reads token ``t_{i+1+s}`` (0 past the row) at RoPE position ``i + s``.

    Returns ``(logits, hidden)``: per step, [B, n, Vd] float32 logits (None unless
    ``want_logits``) and the output hidden states [B, n, H]."""
    b, n = feats.shape[:2]
    c = head.cfg
    tok = tokens.clamp(min=0)
    if tok.shape[1] < n + length:
        tok = torch.cat([tok, tok.new_zeros(b, n + length - tok.shape[1])], dim=1)
    pos = torch.arange(n, device=feats.device)
    scale = c.head_dim ** -0.5
    h = feats
    k0 = v0 = None
    ks: list = []
    vs: list = []
    logits, hiddens = [], []
    for s in range(length):
        emb = F.embedding(tok[:, 1 + s:1 + s + n], embed).reshape(b * n, -1)
        a, res = head.inputs(emb, h.reshape(b * n, -1))
        cos = cos_tab[pos + s].unsqueeze(1).repeat(b, 1, 1)
        sin = sin_tab[pos + s].unsqueeze(1).repeat(b, 1, 1)
        q, k, v = head.qkv(a, cos, sin)
        q = q.reshape(b, n, c.num_heads, c.head_dim)
        k = k.reshape(b, n, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, n, c.num_kv_heads, c.head_dim)
        if s == 0:
            k0, v0 = k, v
        else:
            ks.append(k)
            vs.append(v)
        o = ttt_attention(q, k0, v0, ks, vs, scale)
        out = head.finish(res, o.reshape(b * n, -1))
        hiddens.append(out.reshape(b, n, -1))
        logits.append(head.logits(out, lm_head).reshape(b, n, -1) if want_logits else None)
        h = out.reshape(b, n, -1)
    return logits, hiddens


class EagleTrainModule(nn.Module):
    """The trainable module: an :class:`EagleHead` whose ``forward`` is the dense unrolled
    forward (so DDP sees a forward call). The target's embedding, RoPE tables and LM head are
    plain attributes (frozen, not in the state dict)."""

    def __init__(self, head: EagleHead, embed, cos, sin, lm_head=None):
        super().__init__()
        self.head = head
        self._frozen = (embed, cos, sin, lm_head)

    def forward(self, feats, tokens, length: int, want_logits: bool = True):
        embed, cos, sin, lm_head = self._frozen
        return ttt_forward(self.head, feats, tokens, embed, cos, sin, length, lm_head,
                           want_logits)

    @torch.no_grad()
    def export_head(self, dtype=torch.float32, device="cpu") -> EagleHead:
        """A float32 CPU copy of the head (then cast to ``dtype`` / moved to ``device``)."""
        h = self.head
        out = EagleHead(h.cfg, dtype=torch.float32, device="cpu")
        out.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point()
                             else v.detach().cpu() for k, v in h.state_dict().items()})
        return out.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# vocabulary and initialisation
# --------------------------------------------------------------------------------------------


def draft_vocab_maps(token_map: Optional[torch.Tensor], vocab_size: int) -> tuple:
    """``(ids, d2t, t2d)`` of a draft vocabulary: ``ids`` the target ids sorted ascending (draft
    id order, like the reference), ``d2t[k] = ids[k] - k``, ``t2d`` [V] bool. ``token_map``
    None: the full vocabulary."""
    ids = (torch.arange(vocab_size) if token_map is None
           else torch.sort(token_map.to(torch.long).cpu()).values)
    d2t = ids - torch.arange(ids.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids, d2t, t2d


@torch.no_grad()
def init_head(head: EagleHead, *, lm_head_rows=None, norm_weight=None, generator=None) -> None:
    """nn.Linear-like init (uniform +-1/sqrt(fan_in) for weights, zero biases), norms at 1;
    EAGLE-3: ``lm_head`` from ``lm_head_rows`` (the target's rows of the draft vocabulary;
    random without) and, if given, the final norm from ``norm_weight``. (On SmolLM2 the
    target's final norm weight, mean 1.8, made the initial logits overconfident: the first
    100 steps train better from norm 1.)"""
    for name in ("fc_weight", "qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
        w = getattr(head, name)
        bound = 1.0 / math.sqrt(w.shape[1])
        w.copy_(torch.rand(w.shape, generator=generator, dtype=torch.float32)
                .mul_(2 * bound).sub_(bound).to(w.dtype))
    for name in ("fc_bias", "qkv_bias"):
        if getattr(head, name, None) is not None:
            getattr(head, name).zero_()
    for name in ("post_norm", "input_norm", "hidden_norm", "norm"):
        if hasattr(head, name):
            getattr(head, name).fill_(1.0)
    if head.cfg.variant == "eagle3":
        if lm_head_rows is not None:
            head.lm_head.copy_(lm_head_rows.to(head.lm_head.dtype))
        else:
            bound = 1.0 / math.sqrt(head.lm_head.shape[1])
            head.lm_head.uniform_(-bound, bound, generator=generator)
        if norm_weight is not None:
            head.norm.copy_(norm_weight.to(head.norm.dtype))


# --------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------


class _EagleMethod(ChainDraftMethod):
    variant = "?"

    def __init__(self, target, *, length: int, eval_length: int, device="cpu"):
        if length < 1:
            raise ValueError(f"--length must be >= 1, got {length}")
        self.device = torch.device(device)
        self.target_config = target.config
        self.length = int(length)
        self.eval_length = max(int(eval_length), 1)
        f32 = dict(device=self.device, dtype=torch.float32)
        self.embed = target.embed_tokens.detach().to(**f32)
        self.cos = target.rope_cos.detach().to(**f32)
        self.sin = target.rope_sin.detach().to(**f32)
        self.lm_head = target.lm_head.detach().to(**f32)  # [V, H]
        self.norm_weight = target.norm.weight.detach().to(**f32)

    # -- helpers -----------------------------------------------------------------------------
    def _module(self, head: EagleHead) -> EagleTrainModule:
        return EagleTrainModule(head, self.embed, self.cos, self.sin,
                                self.lm_head if self.variant == "eagle1" else None)

    def _prepare(self, batch: dict, train: bool) -> tuple:
        """``(cropped batch, n, features)``: ``n`` head positions per row (S - 1)."""
        batch = self.crop(batch)
        n = batch["tokens"].shape[1] - 1
        if n < 1:
            raise ValueError("sequence length 1 leaves no EAGLE target")
        return batch, n, self._features(batch, train=train)

    def _target_argmax(self, batch: dict) -> torch.Tensor:
        """The target's greedy next token at every position [B, S] (-1 on padding)."""
        if "argmax" in batch:
            return batch["argmax"]
        return self.target_argmax(batch["hidden"], self.lm_head, batch["tokens"])

    def _labels(self, batch: dict, steps: int) -> tuple:
        """Per step ``s``: (inside [B, n] bool: position ``i + 1 + s`` is a real token, label
        [B, n]: the target's argmax there as a *draft* id, -1 outside the draft vocabulary)."""
        tok = batch["tokens"]
        n = tok.shape[1] - 1
        am = self._target_argmax(batch)
        inside, labels = [], []
        for s in range(steps):
            t = self.shift(tok, 1 + s, n, -1)
            a = self.shift(am, 1 + s, n, -1)
            ins = (t >= 0) & (a >= 0)
            lab = torch.where(ins, self.t2d_col[a.clamp(min=0)], torch.full_like(a, -1))
            inside.append(ins)
            labels.append(lab)
        return inside, labels

    @torch.no_grad()
    def eval_counters(self, module: nn.Module, batch: dict) -> dict:
        batch, n, feats = self._prepare(batch, train=False)
        tok = batch["tokens"]
        steps = self.eval_length
        # hidden states only: the logits of one step at a time (EAGLE-1: full vocabulary)
        _, hiddens = module(feats[:, :n], tok, steps, want_logits=False)
        head = getattr(module, "head", module)
        lm = self.lm_head if self.variant == "eagle1" else None
        inside, labels = self._labels(batch, steps)
        tops = []
        for s in range(steps):
            hs = hiddens[s]
            lg = head.logits(hs.reshape(-1, hs.shape[-1]), lm).reshape(*hs.shape[:2], -1)
            tops.append(lg.topk(min(5, lg.shape[-1]), dim=-1).indices)
        return self.chain_counters(tops, labels, inside)

    def save(self, module: nn.Module, out_dir, extra_config: Optional[dict] = None,
             dtype=torch.float16, **_) -> None:
        out = module.export_head() if isinstance(module, EagleTrainModule) else module
        save_eagle_head(out, out_dir, self.target_config, extra_config=extra_config,
                        dtype=dtype)


class Eagle3Method(_EagleMethod):
    """EAGLE-3 head with training-time test over ``length`` steps.

    Parameters
    ----------
    target : the frozen target (:class:`specrt.models.LlamaModel`)
    token_map : the draft vocabulary's target ids (e.g. :func:`build_token_map`; None: full)
    length : TTT steps in training
    eval_length : steps scored in evaluation (default ``max(length, 5)``)
    decay : step ``s`` loss weight ``decay ** s``
    """

    name = "eagle3"
    variant = "eagle3"
    cache_kind = "eagle3"

    def __init__(self, target, token_map: Optional[torch.Tensor] = None, *, length: int = 4,
                 eval_length: Optional[int] = None, decay: float = 0.8, device="cpu"):
        super().__init__(target, length=length,
                         eval_length=eval_length if eval_length else max(length, 5),
                         device=device)
        tc = target.config
        ids, d2t, t2d = draft_vocab_maps(token_map, tc.vocab_size)
        self.draft_ids, self.d2t, self.t2d = ids.to(self.device), d2t, t2d
        col = torch.full((tc.vocab_size,), -1, dtype=torch.long)
        col[ids] = torch.arange(ids.numel())
        self.t2d_col = col.to(self.device)  # target id -> draft id, -1 outside
        self.decay = decay
        self.cfg = EagleConfig.for_target(tc, "eagle3", draft_vocab_size=ids.numel())
        self.feature_layers = self.cfg.feature_layers
        self.rows = self.lm_head.index_select(0, self.draft_ids)  # [Vd, H]

    def build(self) -> nn.Module:
        head = EagleHead(self.cfg, dtype=torch.float32, device=self.device)
        init_head(head, lm_head_rows=self.rows)
        with torch.no_grad():
            head.d2t.copy_(self.d2t)
            head.t2d.copy_(self.t2d)
        return self._module(head)

    def term_weights(self) -> torch.Tensor:
        return torch.tensor([self.decay ** s for s in range(self.length)])


    def _features(self, batch: dict, train: bool) -> torch.Tensor:
        if "features" not in batch:
            raise ValueError("EAGLE-3 training needs the target's feature layers in the batch "
                             "(a hidden-state cache of kind 'eagle3')")
        return batch["features"]

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        batch, n, feats = self._prepare(batch, train=True)
        tok, hid = batch["tokens"], batch["hidden"]
        logits, _ = module(feats[:, :n], tok, self.length)
        inside, labels = self._labels(batch, self.length)
        with torch.no_grad():
            # the target's distribution over the draft vocabulary at positions 1..S-1
            tl = torch.matmul(hid[:, 1:].float(), self.rows.t())
            tp = torch.softmax(tl, dim=-1)
        sums, counts, hits, total = [], [], [], []
        for s in range(self.length):
            valid = inside[s] & (labels[s] >= 0)
            p = self.shift(tp, s, n, 0.0)
            lp = torch.log_softmax(logits[s], dim=-1)
            ce = -(p * lp).sum(-1)
            sums.append((ce * valid).sum())
            counts.append(valid.sum())
            with torch.no_grad():
                hits.append(((logits[s].argmax(-1) == labels[s]) & valid).sum())
                total.append(inside[s].sum())
        metrics = {"top1_hits": torch.stack(hits).float(), "targets": torch.stack(total).float()}
        return torch.stack(sums), torch.stack(counts).float(), metrics


class Eagle1Method(_EagleMethod):
    """EAGLE-1 head: feature regression (smooth-L1, weight ``v_weight``) + ``p_weight`` x
    cross-entropy against the target's distribution, uniform input noise (the reference's
    ``AddUniformNoise``: ``(U[0,1) - 0.5) * noise * 512 / S``, S the row's length)."""

    name = "eagle"
    variant = "eagle1"
    cache_kind = "final_norm"

    def __init__(self, target, *, noise: float = 0.2, v_weight: float = 1.0,
                 p_weight: float = 0.1, eval_length: int = 5, device="cpu"):
        super().__init__(target, length=1, eval_length=eval_length, device=device)
        self.noise = float(noise)
        self.weights = (float(v_weight), float(p_weight))
        self.cfg = EagleConfig.for_target(target.config, "eagle1")
        self.feature_layers = ()
        self.t2d_col = torch.arange(target.config.vocab_size, device=self.device)

    def build(self) -> nn.Module:
        head = EagleHead(self.cfg, dtype=torch.float32, device=self.device)
        init_head(head)
        return self._module(head)

    def term_weights(self) -> torch.Tensor:
        return torch.tensor(self.weights)

    def _features(self, batch: dict, train: bool) -> torch.Tensor:
        h = batch["hidden"]
        if train and self.noise > 0:
            # the reference scales by its sample's length: here each row's real length
            real = (batch["tokens"] >= 0).sum(1).clamp(min=1).to(h.dtype)
            h = h + (torch.rand_like(h) - 0.5) * (self.noise * 512 / real)[:, None, None]
        return h

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        batch, n, feats = self._prepare(batch, train=True)
        tok, hid = batch["tokens"], batch["hidden"]
        logits, hs = module(feats[:, :n], tok, 1)
        lg, out = logits[0], hs[0]
        inside, labels = self._labels(batch, 1)
        valid = inside[0]
        nxt = hid[:, 1:].float()
        vl = F.smooth_l1_loss(out, nxt, reduction="none").mean(-1)
        with torch.no_grad():
            tp = torch.softmax(torch.matmul(nxt, self.lm_head.t()), dim=-1)
        pl = -(tp * torch.log_softmax(lg, dim=-1)).sum(-1)
        cnt = valid.sum().float()
        sums = torch.stack([(vl * valid).sum(), (pl * valid).sum()])
        with torch.no_grad():
            hits = ((lg.argmax(-1) == labels[0]) & valid).sum().float()
        metrics = {"top1_hits": hits.reshape(1), "targets": cnt.reshape(1).detach()}
        return sums, torch.stack([cnt, cnt]).detach(), metrics
