"""MTP module training on a frozen target (DeepSeek-V3's multi-token prediction, D = 1..3).

The modules are :class:`specrt.proposers.mtp.MTPModules`; training runs their pieces
(``inputs -> qkv -> attention -> finish -> normed``) with a dense causal attention in place of
the paged op, so a trained module drafts exactly what it was trained on
(``tests/test_train_mtp.py`` checks the two paths against each other).

Module ``k`` (0-based) at row ``i`` reads (``h^{k-1}_i``, token ``t_{i+k+1}``) and predicts
``t_{i+k+2}``; ``h^{-1}`` is the target's final-normed hidden state (the hidden-state cache),
``h^k`` the module's output (final-normed: the MiMo / specrt feed). Rows attend causally to the
module's own rows, RoPE position ``i + 1``. The whole sequence of every module is one forward.

Loss: ``sum_k lambda_k * L_k`` with ``L_k`` the mean, over the rows whose input token is real,
of the cross-entropy of module ``k``'s log-softmax over the draft vocabulary against

* ``labels="target"`` (default): the target's own distribution at position ``i + k + 1``
  restricted to the draft vocabulary (self-distillation: what verification accepts), or
* ``labels="text"``: the data's token ``t_{i+k+2}`` (DeepSeek-V3's MTP loss; rows whose label
  lies outside the draft vocabulary are skipped).

Evaluation: per-depth top-1 against the target's greedy token (full vocabulary), and the
chain accuracy (modules ``0..k`` all right at the same row: a greedy chain rooted there
accepts ``k + 1`` drafts), whose sum is the expected number of accepted drafts per step.

CLI: ``specrt train mtp ...`` (:func:`add_args`, :func:`run`); the shared pipeline pieces
(data, hidden-state cache, self-distillation, loop, checkpoints, resume, DDP) come from
:mod:`specrt.train.trainer`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..proposers.mtp import MTPConfig, MTPModules, save_mtp_modules
from . import dist
from .base import ChainDraftMethod
from .data import DataError
from .eagle import ttt_attention
from .trainer import TrainConfig

__all__ = ["MTPTrainConfig", "MTPMethod", "MTPTrainModule", "mtp_forward", "add_args", "run",
           "run_config"]


@dataclass
class MTPTrainConfig(TrainConfig):
    """:class:`TrainConfig` plus the MTP fields (part of the resume fingerprint)."""

    method: str = "mtp"
    out: str = "mtp-modules"
    mtp_depth: int = 3
    mtp_lambda: list = field(default_factory=lambda: [1.0])
    mtp_labels: str = "target"
    eval_rows: int = 4

    def lambdas(self) -> list:
        lam = [float(x) for x in self.mtp_lambda]
        if len(lam) == 1:
            lam = lam * self.mtp_depth
        if len(lam) != self.mtp_depth or any(x < 0 for x in lam) or not any(lam):
            raise ValueError(f"--mtp-lambda: one weight, or one per depth ({self.mtp_depth}), "
                             f">= 0 and not all 0; got {self.mtp_lambda}")
        return lam


# --------------------------------------------------------------------------------------------
# dense forward
# --------------------------------------------------------------------------------------------


def mtp_forward(mods: MTPModules, hidden: torch.Tensor, tokens: torch.Tensor,
                embed: torch.Tensor, cos_tab: torch.Tensor, sin_tab: torch.Tensor,
                lm_head: Optional[torch.Tensor] = None) -> tuple:
    """Dense forward of every module over a batch of rows.

    ``hidden`` [B, n, H]: the target's final-normed hidden states at positions ``0..n-1``;
    ``tokens`` int64 [B, >= n + 1] (PAD = -1: such inputs only feed rows scored as outside);
    module ``k`` row ``i`` reads token ``t_{i+k+1}`` (0 past the row) at RoPE position
    ``i + 1``. Returns ``(logits, outputs)``: per module, [B, n, Vd] float32 logits over the
    draft vocabulary (None without ``lm_head``) and block outputs [B, n, H]."""
    b, n = hidden.shape[:2]
    d = mods.num_modules
    tok = tokens.clamp(min=0)
    if tok.shape[1] < n + d:
        tok = torch.cat([tok, tok.new_zeros(b, n + d - tok.shape[1])], dim=1)
    pos = torch.arange(1, n + 1, device=hidden.device)
    cos = cos_tab[pos].unsqueeze(1).repeat(b, 1, 1)
    sin = sin_tab[pos].unsqueeze(1).repeat(b, 1, 1)
    c = mods.cfg
    scale = c.head_dim ** -0.5
    h = hidden
    logits, outs = [], []
    for k, layer in enumerate(mods.layers):
        emb = F.embedding(tok[:, 1 + k:1 + k + n], embed).reshape(b * n, -1)
        x = layer.inputs(emb, h.reshape(b * n, -1))
        q, kk, v = layer.qkv(x, cos, sin)
        o = ttt_attention(q.reshape(b, n, c.num_heads, c.head_dim),
                          kk.reshape(b, n, c.num_kv_heads, c.head_dim),
                          v.reshape(b, n, c.num_kv_heads, c.head_dim), [], [], scale)
        out = layer.finish(x, o.reshape(b * n, -1))
        outs.append(out.reshape(b, n, -1))
        logits.append(None if lm_head is None else
                      mods.logits(layer.normed(out), lm_head).reshape(b, n, -1))
        h = layer.feed(out).reshape(b, n, -1)
    return logits, outs


class MTPTrainModule(nn.Module):
    """The trainable modules; ``forward`` is the dense forward (so DDP sees a call). The
    target's embedding, RoPE tables and LM head are plain attributes (frozen, not saved)."""

    def __init__(self, mods: MTPModules, embed, cos, sin, lm_head):
        super().__init__()
        self.mods = mods
        self._frozen = (embed, cos, sin, lm_head)

    def forward(self, hidden, tokens, want_logits: bool = True):
        embed, cos, sin, lm_head = self._frozen
        return mtp_forward(self.mods, hidden, tokens, embed, cos, sin,
                           lm_head if want_logits else None)

    @torch.no_grad()
    def export(self, dtype=torch.float32, device="cpu") -> MTPModules:
        m = self.mods
        out = MTPModules(m.cfg, token_map=m.token_map, dtype=torch.float32, device="cpu")
        out.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point()
                             else v.detach().cpu() for k, v in m.state_dict().items()})
        return out.to(dtype=dtype, device=device)


@torch.no_grad()
def init_modules(mods: MTPModules, generator=None) -> None:
    """nn.Linear-like init (uniform +-1/sqrt(fan_in)), biases 0, norms 1."""
    for layer in mods.layers:
        for name in ("proj", "qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
            w = getattr(layer, name)
            bound = 1.0 / math.sqrt(w.shape[1])
            w.copy_(torch.rand(w.shape, generator=generator).mul_(2 * bound).sub_(bound)
                    .to(w.dtype))
        if layer.qkv_bias is not None:
            layer.qkv_bias.zero_()
        for name in ("token_norm", "hidden_norm", "input_norm", "post_norm", "final_norm"):
            getattr(layer, name).fill_(1.0)


# --------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------


class MTPMethod(ChainDraftMethod):
    """D MTP modules on a frozen target.

    Parameters
    ----------
    target : the frozen target (:class:`specrt.models.LlamaModel`)
    token_map : draft vocabulary (target ids; None: full)
    num_modules : D
    lambdas : per-depth loss weights (length D)
    labels : ``"target"`` (the target's distribution) or ``"text"`` (the data's tokens)
    """

    name = "mtp"
    cache_kind = "final_norm"
    feature_layers = ()

    def __init__(self, target, token_map: Optional[torch.Tensor] = None, *, num_modules: int = 3,
                 lambdas=None, labels: str = "target", device="cpu"):
        if num_modules < 1:
            raise ValueError(f"--mtp-depth must be >= 1, got {num_modules}")
        if labels not in ("target", "text"):
            raise ValueError(f"--mtp-labels must be 'target' or 'text', got {labels!r}")
        self.device = torch.device(device)
        self.target_config = tc = target.config
        self.num_modules = int(num_modules)
        self.lambdas = list(lambdas) if lambdas is not None else [1.0] * self.num_modules
        if len(self.lambdas) != self.num_modules:
            raise ValueError("one loss weight per depth")
        self.labels = labels
        f32 = dict(device=self.device, dtype=torch.float32)
        self.embed = target.embed_tokens.detach().to(**f32)
        self.cos = target.rope_cos.detach().to(**f32)
        self.sin = target.rope_sin.detach().to(**f32)
        self.lm_head = target.lm_head.detach().to(**f32)
        self.token_map = None if token_map is None else token_map.to(torch.long).cpu()
        ids = (torch.arange(tc.vocab_size) if self.token_map is None else self.token_map)
        self.rows = self.lm_head.index_select(0, ids.to(self.device))  # [Vd, H]
        col = torch.full((tc.vocab_size,), -1, dtype=torch.long)
        col[ids] = torch.arange(ids.numel())
        self.col = col.to(self.device)  # target id -> draft column, -1 outside
        self.cfg = MTPConfig.for_target(tc, self.num_modules, feed_normed=True)

    def build(self) -> nn.Module:
        mods = MTPModules(self.cfg, token_map=self.token_map, dtype=torch.float32,
                          device=self.device)
        init_modules(mods)
        return MTPTrainModule(mods, self.embed, self.cos, self.sin, self.lm_head)

    def term_weights(self) -> torch.Tensor:
        return torch.tensor(self.lambdas, dtype=torch.float32)

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        batch = self.crop(batch)
        tok, hid = batch["tokens"], batch["hidden"]
        n = tok.shape[1] - 1
        if n < 1:
            raise ValueError("sequence length 1 leaves no MTP target")
        logits, _ = module(hid[:, :n], tok)
        with torch.no_grad():
            tl = torch.matmul(hid.float(), self.rows.t())  # target logits, draft columns [B,S,Vd]
            am = tl.argmax(-1)
        sums, counts, hits, total = [], [], [], []
        for k in range(self.num_modules):
            inp = self.shift(tok, 1 + k, n, -1)  # module k's input token at row i
            lg = torch.log_softmax(logits[k], dim=-1)
            if self.labels == "target":
                valid = inp >= 0
                with torch.no_grad():
                    p = torch.softmax(self.shift(tl, 1 + k, n, 0.0), dim=-1)
                ce = -(p * lg).sum(-1)
            else:
                nxt = self.shift(tok, 2 + k, n, -1)
                lab = torch.where(nxt >= 0, self.col[nxt.clamp(min=0)], torch.full_like(nxt, -1))
                valid = (inp >= 0) & (lab >= 0)
                ce = -lg.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            sums.append((ce * valid).sum())
            counts.append(valid.sum())
            with torch.no_grad():
                want = self.shift(am, 1 + k, n, -1)
                hits.append(((logits[k].argmax(-1) == want) & (inp >= 0)).sum())
                total.append((inp >= 0).sum())
        metrics = {"top1_hits": torch.stack(hits).float(), "targets": torch.stack(total).float()}
        return torch.stack(sums), torch.stack(counts).float(), metrics

    @torch.no_grad()
    def eval_counters(self, module: nn.Module, batch: dict) -> dict:
        batch = self.crop(batch)
        tok, hid = batch["tokens"], batch["hidden"]
        n = tok.shape[1] - 1
        _, outs = module(hid[:, :n], tok, want_logits=False)
        mods = getattr(module, "mods", module)
        b = tok.shape[0]
        # the target's greedy token at every position, full vocabulary
        am = self.target_argmax(hid, self.lm_head, tok)
        tops, wants, inside = [], [], []
        for k, layer in enumerate(mods.layers):
            lg = mods.logits(layer.normed(outs[k].reshape(b * n, -1)), self.lm_head).reshape(b, n, -1)
            tops.append(mods.to_target(lg.topk(min(5, lg.shape[-1]), dim=-1).indices))
            inside.append(self.shift(tok, 1 + k, n, -1) >= 0)
            wants.append(self.shift(am, 1 + k, n, -1))
        return self.chain_counters(tops, wants, inside)

    def save(self, module: nn.Module, out_dir, extra_config: Optional[dict] = None,
             dtype=torch.float16, **_) -> None:
        mods = module.export() if isinstance(module, MTPTrainModule) else module
        save_mtp_modules(mods, out_dir, self.target_config, extra_config=extra_config,
                         dtype=dtype)


# --------------------------------------------------------------------------------------------
# pipeline and CLI
# --------------------------------------------------------------------------------------------


def _log(*a):
    if dist.rank() == 0:
        print(*a, flush=True)


def run_config(cfg: MTPTrainConfig, model=None, tokenizer=None,
               model_path: Optional[str] = None) -> dict:
    """The whole pipeline (data -> hidden states -> training -> held-out evaluation -> modules
    in the MiMo layout + card); returns the summary."""
    from .hidden import compute_hidden_cache
    from .medusa import build_token_map
    from .trainer import (_coverage, _data_lines, _reproduce_lines, check_stages,
                          heldout_summary, load_stage_data, target_and_cache, train_on_rows)

    t_start = time.perf_counter()
    device = dist.init(cfg.device)
    lambdas = cfg.lambdas()
    if cfg.mtp_depth < 1:
        raise ValueError(f"--mtp-depth must be >= 1, got {cfg.mtp_depth}")
    if cfg.seq_len < cfg.mtp_depth + 2:
        raise ValueError(f"--seq-len {cfg.seq_len} is too small for {cfg.mtp_depth} modules "
                         f"(need >= {cfg.mtp_depth + 2})")
    check_stages(cfg)
    model, tokenizer, model_path, fingerprint, cache_dir = target_and_cache(
        cfg, device, model, tokenizer, model_path)
    _log(f"[train] mtp: target {model_path or 'in-memory'}; device {device}; "
         f"{cfg.mtp_depth} modules; labels {cfg.mtp_labels}; lambda {lambdas}")
    stage_rows, heldout = load_stage_data(cfg, model, tokenizer, cache_dir, fingerprint)
    token_map = build_token_map([r for r in stage_rows if r is not None],
                                model.config.vocab_size, cfg.draft_vocab)
    method = MTPMethod(model, token_map, num_modules=cfg.mtp_depth, lambdas=lambdas,
                       labels=cfg.mtp_labels, device=device)
    if token_map is not None:
        _log(f"[train] draft vocabulary {token_map.numel()} of {model.config.vocab_size} "
             f"tokens covers {_coverage(stage_rows, token_map):.2%} of training tokens")

    def hc(rows, name):
        return compute_hidden_cache(model, rows, cache_dir, fingerprint=fingerprint, name=name,
                                    dtype=cfg.hidden_dtype,
                                    tokens_per_batch=cfg.hidden_batch_tokens, device=device,
                                    log=_log)

    caches = [hc(r, n) if r is not None else None
              for r, n in zip(stage_rows, ("stage 1", "stage 2"))]
    held = {k: hc(v, f"held-out {k}") for k, v in heldout.items()}
    module, history = train_on_rows(cfg, method, caches, device=device)
    if module is None:
        return {"stopped_at": cfg.stop_after, "history": history}
    results, summary = heldout_summary(method, module, held, cfg.eval_rows, device, history,
                                       t_start)
    if dist.rank() == 0:
        extra = {"heldout_depth_accuracy": results,
                 "training": {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                         if k not in ("stop_after", "resume")},
                              "target": model_path or "in-memory"}}
        out = getattr(module, "module", module)
        method.save(out, cfg.out, extra_config=extra, dtype=getattr(torch, cfg.save_dtype))
        _write_card(cfg, method, summary, token_map, stage_rows, _data_lines, _reproduce_lines,
                    _coverage)
        (Path(cfg.out) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    summary["history"] = history
    return summary


def _write_card(cfg, method, summary, token_map, stage_rows, data_lines, reproduce_lines,
                coverage) -> None:
    c = method.cfg
    lines = [f"# MTP-{c.num_modules} modules for `{cfg.model}`", "",
             f"Trained with `specrt train mtp` (specrt's own trainer) on the frozen target: "
             f"{c.num_modules} DeepSeek-V3-style multi-token-prediction modules, each "
             f"`proj(cat(hidden_norm(h), token_norm(embed(t))))` (2H -> H) into one decoder "
             f"layer of the target's family (hidden {c.hidden_size}, {c.num_heads} query / "
             f"{c.num_kv_heads} kv heads, MLP {c.intermediate_size}), then `final_norm` and "
             "the target's shared LM head"
             + (f" restricted to a draft vocabulary of {token_map.numel()} tokens (`token_map`, "
                f"{coverage(stage_rows, token_map):.2%} of the training tokens)"
                if token_map is not None else "")
             + ". Module k + 1 reads module k's final-normed output. Loss: "
             + ("cross-entropy against the target's own distribution"
                if cfg.mtp_labels == "target" else "cross-entropy against the data's tokens")
             + f", per-depth weights lambda = {method.lambdas}.", "",
             f"Layout: MiMo (`model.mtp_layers.{{k}}.*`, `config.json` + `model.safetensors`), "
             f"weights {cfg.save_dtype}; load with `MTPProposer(target, path)` or "
             "`specrt generate --proposer mtp --mtp-modules PATH`.", "", "## Data", ""]
    lines += data_lines(cfg, stage_rows)
    lines += ["", "## Held-out accuracy", "",
              "Depth d: module d - 1's draft below a position, fed the true tokens and the "
              "earlier modules' outputs; top-1 against the target's own greedy token (what "
              "greedy verification accepts; a token outside the draft vocabulary is a miss). "
              "Chain: depths 1..d all right; their sum is the expected number of accepted "
              f"drafts of a greedy {c.num_modules}-token chain.", "",
              "| set | positions | " + " | ".join(f"depth {k + 1} top-1 / chain"
                                                  for k in range(c.num_modules))
              + " | expected accepted |",
              "|---|---|" + "---|" * c.num_modules + "---|"]
    for nm, r in summary["heldout"].items():
        lines.append(f"| {nm} | {r['targets'][0]} | " + " | ".join(
            f"{a:.3f} / {b:.3f}" for a, b in zip(r["top1"], r["chain"]))
            + f" | {r['expected_accepted']:.2f} |")
    lines += reproduce_lines(cfg, cfg.command or "specrt train mtp ...", summary)
    (Path(cfg.out) / "README.md").write_text("\n".join(lines))


def add_args(m) -> None:
    """The ``specrt train mtp`` options (the shared ones and MTP's own)."""
    from .cli import _common

    _common(m)
    m.add_argument("--mtp-depth", type=int, default=3, help="number of chained modules D")
    m.add_argument("--mtp-lambda", type=float, nargs="+", default=[1.0],
                   help="loss weight per depth (one value: the same for all)")
    m.add_argument("--mtp-labels", choices=["target", "text"], default="target",
                   help="targets: the target's own distribution (self-distillation) or the "
                        "data's next tokens (DeepSeek-V3's loss)")
    m.add_argument("--draft-vocab", type=int, default=8192,
                   help="train (and draft) over the N most frequent training tokens (0: full)")
    m.add_argument("--eval-rows", type=int, default=4, help="rows per evaluation batch")


def config_from_args(args) -> MTPTrainConfig:
    cfg = MTPTrainConfig()
    for k in vars(cfg):
        if hasattr(args, k) and getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    if getattr(args, "data", None) is None:
        cfg.data = ["stdlib"]
    cfg.method = "mtp"
    return cfg


def run(args) -> int:
    """``specrt train mtp``: returns the exit status."""
    import shlex
    import sys

    cfg = config_from_args(args)
    cfg.command = cfg.command or " ".join(shlex.quote(a) for a in ["specrt", *sys.argv[1:]])
    try:
        run_config(cfg)
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"specrt train: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":  # python -m specrt.train.mtp ... (without the CLI hook)
    import argparse
    import sys

    import shlex

    ap = argparse.ArgumentParser(prog="specrt train mtp")
    add_args(ap)
    ns = ap.parse_args()
    ns.command = " ".join(shlex.quote(a) for a in ["specrt", "train", "mtp", *sys.argv[1:]])
    sys.exit(run(ns))
