"""MLP speculator training (``specrt train mlp-speculator``): the fms-extras recipe on the
shared pipeline.

Stage 1: causal LM on corpus text in long rows: at every position ``t`` the speculator reads
the frozen target's final-normed state ``h_t`` and, teacher-forced on the true tokens, stage
``i`` predicts token ``t + 2 + i`` (loss: the plain sum of the stages' cross-entropies).
Stage 2: the same on sequences the target wrote itself: short prompts cut from the corpus
(``--stage2-prompt-len`` tokens), continued by the target (greedy by default,
``--stage2-new-tokens``), trained in batches ``--stage2-group`` times larger; only tokens the
target generated are labels, so the speculator learns to match the target's outputs. Default
schedule: 5 stage-1 steps for every 2 stage-2 steps (fms-fsdp's 15000 + 6000).

Training over a reduced vocabulary (``--train-vocab N``, the N most frequent training tokens):
the head rows of every other token are fixed at zero, so their logits are exactly 0 and the
loss over ``N`` columns plus ``(V - N)`` zero logits is the full-vocabulary loss of the saved
checkpoint (which holds those zero rows, in the public layout). At inference the proposer
skips all-zero rows.

``add_args(parser)`` / ``run(args)`` are what ``specrt train`` dispatches to.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..proposers.mlp_speculator import MLPSpeculator, save_mlp_speculator
from . import dist
from .base import Method
from .data import PAD, DataError, pad_rows, split_of, tokenize_chunks
from .trainer import TrainConfig

__all__ = ["MLPSpecConfig", "MLPSpeculatorMethod", "Stage2Cache", "generate_continuations",
           "corpus_prompts", "add_args", "run", "run_config"]

#: ranks counted by the held-out evaluation (top-k accuracy)
RANKS = 5


@dataclass
class MLPSpecConfig(TrainConfig):
    method: str = "mlp-speculator"
    out: str = "mlp-speculator"
    n_predict: int = 4
    inner_dim: int = 48
    tie_weights: bool = True
    scale_input: bool = False
    train_vocab: int = 8192
    init: str = "target"
    stage2_prompt_len: int = 64
    stage2_new_tokens: int = 256
    stage2_prompts: int = 64
    stage2_group: int = 4
    top_k_tokens_per_head: Optional[list] = None
    n_candidates: int = 5


def _log(*a):
    if dist.rank() == 0:
        print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# stage-2 data: the target's own continuations
# --------------------------------------------------------------------------------------------


def corpus_prompts(rows: np.ndarray, prompt_len: int, count: int) -> list:
    """``count`` prompts of ``prompt_len`` tokens cut from token rows (int [N, S], PAD = -1):
    consecutive windows of each row (fms-fsdp's reshape of a long row into short prompts),
    rows taken in turn so the prompts spread over the corpus."""
    if prompt_len < 1 or count < 1:
        return []
    per_row = rows.shape[1] // prompt_len
    out = []
    for w in range(per_row):
        for r in range(rows.shape[0]):
            seg = rows[r, w * prompt_len:(w + 1) * prompt_len]
            if (seg != PAD).all():
                out.append([int(x) for x in seg])
                if len(out) >= count:
                    return out
    return out


def _gen_key(fingerprint: str, prompts: list, params: dict) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    for p in prompts:
        h.update(np.asarray(p, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


def generate_continuations(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                           cache_dir=None, fingerprint: str = "", temperature: float = 0.0,
                           batch_size: int = 16, seed: int = 0, tokenizer=None,
                           log=_log) -> list:
    """The target continues token prompts through specrt's engine (batched; greedy unless a
    temperature is given): ``[prompt + continuation]`` in prompt order. Cached as JSONL
    under ``cache_dir`` (keyed by the target, the prompts and the parameters); under
    ``torch.distributed`` each rank generates its share."""
    from ..engine import Engine, SamplingParams

    prompts = [[int(t) for t in p] for p in prompts]
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "kind": "continuations"}
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"continue-{_gen_key(fingerprint, prompts, params)}.jsonl"
        if path.is_file():
            recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            log(f"[train] stage 2: {len(recs)} cached target continuations from {path}")
            return [r["ids"] for r in recs]
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(prompts), world))
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    t0 = time.perf_counter()
    done, ntok = [], 0
    group = 4 * batch_size
    for g in range(0, len(mine), group):
        idx = mine[g:g + group]
        sp = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed * 1_000_003 + i) for i in idx]
        outs = engine.generate([prompts[i] for i in idx], sp)
        for i, o in zip(idx, outs):
            if getattr(o, "error", None):
                log(f"[train] stage 2: prompt {i} failed: {o.error}")
                continue
            done.append((i, prompts[i] + [int(t) for t in o.token_ids]))
            ntok += len(o.token_ids)
        if rank == 0:
            dt = time.perf_counter() - t0
            log(f"[train] stage 2: {len(done) * world}/{len(prompts)} prompts continued by the "
                f"target, {ntok * world} tokens, {ntok * world / max(dt, 1e-9):.0f} tok/s")
    gathered = sorted((x for part in dist.all_gather_objects(done) for x in part),
                      key=lambda x: x[0])
    out = [ids for _, ids in gathered]
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for (i, ids) in gathered:
                f.write(json.dumps({"prompt_index": i, "ids": ids}) + "\n")
        tmp.replace(path)
    dist.barrier()
    return out


class Stage2Cache:
    """A hidden-state cache of target-written sequences seen through groups: item ``j`` of
    this view is ``group`` sequences (a fixed, seeded grouping), so a global batch of ``B``
    items holds ``B * group`` short rows (fms' larger stage-2 batch), and every batch carries
    ``loss_from`` (int64 [rows]): the first label position of each row (its prompt length;
    earlier tokens are the prompt's, not the target's)."""

    def __init__(self, cache, loss_from: np.ndarray, group: int = 1, seed: int = 0):
        n = len(cache)
        if len(loss_from) != n:
            raise ValueError(f"loss_from has {len(loss_from)} entries for {n} rows")
        self.cache, self.loss_from = cache, np.asarray(loss_from, dtype=np.int64)
        self.group = max(1, int(group))
        order = np.random.default_rng([seed, 2]).permutation(n) if self.group > 1 else np.arange(n)
        k = max(1, n // self.group)
        self.groups = [order[i * self.group:(i + 1) * self.group] for i in range(k)]
        if self.group > 1 and n > k * self.group:  # left-overs join the last groups
            for j, r in enumerate(order[k * self.group:]):
                self.groups[j % k] = np.append(self.groups[j % k], r)

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, idx, device="cpu", dtype=torch.float32) -> dict:
        rows = np.concatenate([self.groups[int(i)] for i in np.atleast_1d(idx)])
        out = self.cache.batch(rows, device, dtype)
        out["loss_from"] = torch.from_numpy(self.loss_from[rows]).to(device)
        return out


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------


class MLPSpeculatorMethod(Method):
    """An MLP speculator on a frozen target.

    Parameters
    ----------
    target : the target model (its LM head / norm seed the ``init="target"`` initialisation)
    n_predict, inner_dim, tie_weights, scale_input : the architecture
    token_map : int64 [N] or None
        Training vocabulary (the loss is exact for a head whose other rows are zero); None:
        full vocabulary.
    init : ``"target"``: embedding and head rows are the target's LM-head rows projected on
        their top ``inner_dim`` principal directions (``proj.0`` reads those directions of
        the target's state; later projections start as the identity); ``"random"``:
        fms-extras' truncated normal (std ``1 / sqrt(inner_dim)``).
    """

    name = "mlp-speculator"

    def __init__(self, target, *, n_predict: int = 4, inner_dim: int = 48,
                 tie_weights: bool = True, scale_input: bool = False,
                 token_map: Optional[torch.Tensor] = None, init: str = "target", seed: int = 0,
                 device="cpu"):
        if init not in ("target", "random"):
            raise ValueError(f"init must be 'target' or 'random', got {init!r}")
        c = target.config
        self.target = target
        self.hidden_size, self.vocab_size = c.hidden_size, c.vocab_size
        self.n_predict, self.inner_dim = n_predict, inner_dim or c.hidden_size
        self.tie_weights, self.scale_input, self.init, self.seed = (tie_weights, scale_input,
                                                                    init, seed)
        self.device = torch.device(device)
        self.token_map = None if token_map is None else token_map.to(torch.long)
        inv = torch.full((self.vocab_size,), -1, dtype=torch.long)
        if self.token_map is None:
            inv = torch.arange(self.vocab_size)
        else:
            inv[self.token_map] = torch.arange(self.token_map.numel())
        self.inv = inv.to(self.device)  # target id -> training column, -1 outside
        self._map_dev = None if self.token_map is None else self.token_map.to(self.device)
        n_rest = self.vocab_size - (self.vocab_size if token_map is None else token_map.numel())
        self.log_rest = math.log(n_rest) if n_rest > 0 else None
        self.curves: list = []  # per training step: per-stage mean CE

    # ------------------------------------------------------------------------------ module
    def build(self) -> nn.Module:
        m = MLPSpeculator(self.hidden_size, self.inner_dim, self.vocab_size, self.n_predict,
                          tie_weights=self.tie_weights, scale_input=self.scale_input,
                          dtype=torch.float32, device=self.device)
        g = torch.Generator().manual_seed(self.seed)
        d = m.inner_dim
        with torch.no_grad():
            for mod in m.modules():  # fms-extras reset_parameters
                if isinstance(mod, (nn.Embedding, nn.Linear)):
                    w = torch.empty(mod.weight.shape)
                    nn.init.trunc_normal_(w, 0.0, 1 / math.sqrt(d), generator=g)
                    mod.weight.copy_(w)
            if self.init == "target":
                self._init_from_target(m)
            if self.token_map is not None:
                keep = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                keep[self._map_dev] = True
                for h in {id(x): x for x in m.head}.values():
                    h.weight[~keep] = 0
        return m

    @torch.no_grad()
    def _init_from_target(self, m: MLPSpeculator) -> None:
        d, h = m.inner_dim, self.hidden_size
        lm = self.target.lm_head.detach().float().to(self.device)  # [V, H]
        emb = self.target.embed_tokens.detach().float().to(self.device)
        if d >= h:
            basis = torch.eye(h, d, device=self.device)
        else:
            evals, evecs = torch.linalg.eigh(lm.t() @ lm)  # ascending
            basis = evecs[:, -d:].flip(-1)  # [H, d], top principal directions
        pe = emb @ basis
        pe = pe / pe.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # unit rows: std 1/sqrt(d)
        ph = lm @ basis
        ph = ph / (ph.std() * math.sqrt(d))
        for e in {id(x): x for x in m.emb}.values():
            e.weight.copy_(pe)
        for hd in {id(x): x for x in m.head}.values():
            hd.weight.copy_(ph)
        # the state's projection on the basis, scaled to about the embedding term's norm
        rms = (1 / math.sqrt(2) if m.scale_input
               else float(self.target.norm.weight.detach().float().pow(2).mean().sqrt()))
        m.proj[0].weight.copy_(basis.t() * (2.0 / (math.sqrt(d) * max(rms, 1e-3))))
        for p in {id(x): x for x in m.proj[1:]}.values():
            p.weight.copy_(torch.eye(d, device=self.device)
                           + p.weight * 0.1)

    def term_weights(self) -> torch.Tensor:
        return torch.ones(self.n_predict)  # fms-extras: the plain sum of the stages' losses

    # ------------------------------------------------------------------------------ batches
    def _prep(self, batch: dict):
        """(states [B, n, H], inputs [B, n + P], targets [P, B, n], valid [P, B, n])."""
        tok, hid = batch["tokens"], batch["hidden"]
        b, s = tok.shape
        p = self.n_predict
        if s < 3:
            raise ValueError(f"sequence length {s} leaves no speculator target (need >= 3)")
        n = s - 2
        inds = torch.cat([tok[:, 1:], torch.full((b, p), PAD, dtype=tok.dtype,
                                                 device=tok.device)], 1)  # [B, s - 1 + p]
        tgt = torch.stack([inds[:, i + 1:i + 1 + n] for i in range(p)])  # token t + 2 + i
        valid = tgt != PAD
        if "loss_from" in batch:
            pos = torch.arange(n, device=tok.device)
            lf = batch["loss_from"].to(tok.device)
            for i in range(p):
                valid[i] &= (pos[None, :] + 2 + i) >= lf[:, None]
        return hid[:, :n], inds.clamp(min=0), tgt, valid

    def _stage_logits(self, module, i: int, state: torch.Tensor) -> torch.Tensor:
        """Logits over the training columns ([N, M])."""
        w = module.head[i].weight
        if self._map_dev is not None:
            w = w.index_select(0, self._map_dev)
        return F.linear(state, w).float()

    def _scores(self, logits: torch.Tensor, target: torch.Tensor):
        """(CE [N] of the full-vocabulary model, target column [N] (-1 outside), logits)."""
        col = self.inv[target]
        if self.log_rest is not None:
            rest = torch.full((logits.shape[0], 1), self.log_rest, device=logits.device)
            lse = torch.logsumexp(torch.cat([logits, rest], 1), dim=1)
        else:
            lse = torch.logsumexp(logits, dim=1)
        tl = torch.where(col >= 0, logits.gather(1, col.clamp(min=0)[:, None])[:, 0],
                         torch.zeros_like(lse))
        return lse - tl, col

    def _top1(self, logits: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        best, arg = logits.max(1)
        ok = (arg == col) & (col >= 0)
        if self.log_rest is not None:
            ok &= best > 0  # else a zero-row token is the argmax
        return ok

    def loss_terms(self, module: nn.Module, batch: dict) -> tuple:
        x, inds, tgt, valid = self._prep(batch)
        n = x.shape[1]
        state = module.input_state(x)
        sums, counts, hits = [], [], []
        for i in range(self.n_predict):
            state = module.stage(i, state, inds[:, i:i + n])
            v = valid[i]
            lg = self._stage_logits(module, i, state[v])
            ce, col = self._scores(lg, tgt[i][v])
            sums.append(ce.sum())
            counts.append(v.sum())
            with torch.no_grad():
                hits.append(self._top1(lg, col).sum())
        sums_t = torch.stack(sums)
        counts_t = torch.stack(counts).float()
        self.curves.append([float(s) / max(float(c), 1.0) for s, c in
                            zip(sums_t.detach(), counts_t)])
        return sums_t, counts_t, {"top1_hits": torch.stack(hits).float(), "targets": counts_t}

    @torch.no_grad()
    def eval_counters(self, module: nn.Module, batch: dict) -> dict:
        x, inds, tgt, valid = self._prep(batch)
        n = x.shape[1]
        p = self.n_predict
        state = module.input_state(x)
        rank_hits = torch.zeros(p, RANKS)
        total = torch.zeros(p)
        nll = torch.zeros(p)
        chain_hits, chain_den = torch.zeros(p), torch.zeros(p)
        ok_all = torch.ones_like(valid[0])
        val_all = torch.ones_like(valid[0])
        for i in range(p):
            state = module.stage(i, state, inds[:, i:i + n])
            v = valid[i]
            lg = self._stage_logits(module, i, state[v])
            ce, col = self._scores(lg, tgt[i][v])
            nll[i] = ce.sum().cpu()
            total[i] = float(v.sum())
            r = min(RANKS, lg.shape[1])
            top = lg.topk(r, dim=1)
            hit = (top.indices == col[:, None]) & (col[:, None] >= 0)
            if self.log_rest is not None:
                hit &= top.values > 0
            rank_hits[i, :r] = hit.sum(0).float().cpu()
            correct = torch.zeros_like(v)
            correct[v] = self._top1(lg, col)
            val_all = val_all & v
            ok_all = ok_all & correct & v
            chain_hits[i] = float(ok_all.sum())
            chain_den[i] = float(val_all.sum())
        return {"rank_hits": rank_hits.reshape(-1), "targets": total, "nll": nll,
                "chain_hits": chain_hits, "chain_den": chain_den}

    def summarize(self, counters: dict) -> dict:
        p = self.n_predict
        hits = counters["rank_hits"].reshape(p, RANKS).double()
        tot = counters["targets"].double().clamp(min=1)
        acc = hits / tot[:, None]
        chain = counters["chain_hits"].double() / counters["chain_den"].double().clamp(min=1)
        return {"targets": [int(t) for t in counters["targets"].tolist()],
                "top1": [round(float(a), 4) for a in acc[:, 0]],
                "top5": [round(float(a), 4) for a in acc.sum(1)],
                "chain": [round(float(c), 4) for c in chain],
                "expected_accepted": round(float(chain.sum()), 3),
                "ce": [round(float(a), 4) for a in counters["nll"].double() / tot]}

    def format_metrics(self, m: dict) -> str:
        acc = (m["top1_hits"] / m["targets"].clamp(min=1)).tolist()
        return "top1 " + " ".join(f"{a:.3f}" for a in acc)

    def save(self, module: nn.Module, out_dir, extra_config: Optional[dict] = None,
             dtype=torch.float16) -> None:
        save_mlp_speculator(module, out_dir, extra_config, dtype=dtype)


# --------------------------------------------------------------------------------------------
# CLI and pipeline
# --------------------------------------------------------------------------------------------


def add_args(parser) -> None:
    """``specrt train mlp-speculator`` options (the shared ones plus the method's)."""
    import argparse

    from .cli import _common

    _common(parser)
    parser.set_defaults(stage2_steps=None, seq_len=512, lr=1e-3)
    parser.add_argument("--n-predict", type=int, default=4, help="stages (draft depth)")
    parser.add_argument("--inner-dim", type=int, default=48,
                        help="state size (0: the target's hidden size)")
    parser.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=True,
                        help="one embedding / head / norm for all stages (default on)")
    parser.add_argument("--scale-input", action="store_true",
                        help="RMS-normalise the target's state / sqrt(2) first")
    parser.add_argument("--train-vocab", type=int, default=8192,
                        help="loss over the N most frequent training tokens, other head rows "
                             "fixed at zero (0: full vocabulary)")
    parser.add_argument("--init", choices=["target", "random"], default="target")
    parser.add_argument("--stage2-prompt-len", type=int, default=64,
                        help="stage 2: corpus prompt length in tokens")
    parser.add_argument("--stage2-new-tokens", type=int, default=256,
                        help="stage 2: tokens the target generates per prompt")
    parser.add_argument("--stage2-prompts", type=int, default=64,
                        help="stage 2: corpus prompts continued by the target")
    parser.add_argument("--stage2-group", type=int, default=4,
                        help="stage 2: short sequences per stage-1 row in a batch (batch size "
                             "x this many rows)")
    parser.add_argument("--top-k-tokens-per-head", default=None,
                        help="comma list written to config.json (the proposer's default tree)")
    parser.add_argument("--n-candidates", type=int, default=5,
                        help="candidate paths written to config.json")


def config_from_args(args) -> MLPSpecConfig:
    cfg = MLPSpecConfig()
    for k in vars(cfg):
        if hasattr(args, k) and getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    if args.data is None:
        cfg.data = ["stdlib"]
    cfg.method = "mlp-speculator"
    if getattr(args, "stage2_steps", None) is None:
        cfg.stage2_steps = (cfg.steps * 2) // 5  # fms-fsdp: 5 stage-1 steps per 2 stage-2 steps
    if isinstance(cfg.top_k_tokens_per_head, str):
        cfg.top_k_tokens_per_head = [int(x) for x in cfg.top_k_tokens_per_head.split(",") if x]
    return cfg


def run(args, model=None, tokenizer=None) -> int:
    """``specrt train mlp-speculator``: returns a process exit code."""
    cfg = config_from_args(args)
    if getattr(args, "command", None):
        cfg.command = args.command
    else:
        argv = sys.argv[1:]
        rest = argv[argv.index("mlp-speculator") + 1:] if "mlp-speculator" in argv else argv
        cfg.command = " ".join(shlex.quote(a) for a in
                               ["specrt", "train", "mlp-speculator", *rest])
    try:
        run_config(cfg, model, tokenizer)
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"specrt train: error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


def _check(cfg: MLPSpecConfig) -> None:
    if cfg.n_predict < 1:
        raise ValueError(f"--n-predict must be >= 1, got {cfg.n_predict}")
    if cfg.tie_weights and cfg.n_predict < 2:
        raise ValueError("--tie-weights needs --n-predict >= 2")
    if cfg.inner_dim < 0 or cfg.train_vocab < 0:
        raise ValueError("--inner-dim and --train-vocab must be >= 0")
    if cfg.seq_len < 3:
        raise ValueError(f"--seq-len {cfg.seq_len} is too small (need >= 3)")
    if cfg.steps < 0 or cfg.stage2_steps < 0 or cfg.steps + cfg.stage2_steps < 1:
        raise ValueError("need --steps + --stage2-steps >= 1 (and neither negative)")
    if cfg.steps > 0 and not cfg.data:
        raise ValueError("stage 1 (--steps > 0) needs --data")
    if cfg.stage2_steps > 0 and cfg.stage2_prompts < 1 and not cfg.self_distill:
        raise ValueError("stage 2 needs target-written data: --stage2-prompts > 0 or "
                         "--self-distill")
    if cfg.stage2_steps > 0 and (cfg.stage2_prompt_len < 1 or cfg.stage2_new_tokens < 1):
        raise ValueError("--stage2-prompt-len and --stage2-new-tokens must be >= 1")
    if cfg.batch_size < dist.world_size():
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the number of "
                         f"processes ({dist.world_size()})")


def run_config(cfg: MLPSpecConfig, model=None, tokenizer=None, model_path=None) -> dict:
    """The whole pipeline; returns the summary (also written to ``cfg.out``)."""
    from .hidden import compute_hidden_cache
    from .medusa import build_token_map
    from .trainer import heldout_summary, target_and_cache, train_on_rows

    t_start = time.perf_counter()
    device = dist.init(cfg.device)
    _check(cfg)
    model, tokenizer, model_path, fp, cache_dir = target_and_cache(cfg, device, model, tokenizer,
                                                                  model_path)
    eos = tokenizer.eos_token_ids[0] if getattr(tokenizer, "eos_token_ids", None) else None
    _log(f"[train] mlp-speculator: target {model_path or 'in-memory'}; device {device}; world "
         f"{dist.world_size()}; cache {cache_dir}")

    # ---- stage 1: corpus rows
    rows1 = tokenize_chunks(tokenizer, cfg.data, cfg.seq_len, "train", cfg.max_tokens,
                            cfg.heldout_pct, eos) if cfg.data else None
    held_rows = None
    try:
        held_rows = tokenize_chunks(tokenizer, cfg.data, cfg.seq_len, "heldout",
                                    cfg.heldout_tokens, cfg.heldout_pct, eos)
    except DataError:
        _log("[train] no held-out documents in the corpus data (too few files?)")
    if rows1 is not None:
        _log(f"[train] stage 1 data: {rows1.shape[0]} rows x {cfg.seq_len} "
             f"({int((rows1 != PAD).sum())} tokens) from {cfg.data}")

    # ---- stage 2: the target continues short corpus prompts (and --self-distill prompts)
    s2_len = cfg.stage2_prompt_len + cfg.stage2_new_tokens
    s2 = {"train": ([], []), "heldout": ([], [])}  # split -> (sequences, prompt lengths)
    if cfg.stage2_steps > 0:
        gen = dict(max_new_tokens=cfg.stage2_new_tokens, cache_dir=cache_dir, fingerprint=fp,
                   temperature=cfg.distill_temperature, batch_size=cfg.distill_batch_size,
                   seed=cfg.seed, tokenizer=tokenizer)
        sources = [("train", rows1, cfg.stage2_prompts),
                   ("heldout", held_rows, max(1, cfg.stage2_prompts // 8))]
        for split, rows, count in sources:
            if rows is None:
                continue
            prompts = corpus_prompts(rows, cfg.stage2_prompt_len, count)
            for ids in generate_continuations(model, prompts, **gen):
                s2[split][0].append(ids)
                s2[split][1].append(cfg.stage2_prompt_len)
        if cfg.self_distill:
            from .distill import prompt_ids, self_distill
            from .trainer import _distill_prompts

            prompts = _distill_prompts(cfg.self_distill, cfg)
            out = self_distill(model, tokenizer, prompts, cache_dir, fingerprint=fp,
                               max_new_tokens=cfg.distill_max_new_tokens,
                               temperature=cfg.distill_temperature,
                               batch_size=cfg.distill_batch_size, seed=cfg.seed,
                               time_budget=cfg.distill_time_budget, log=_log)
            for text, chat, ids in out:
                split = "train" if split_of("distill:" + text, cfg.heldout_pct) == "train" \
                    else "heldout"
                s2[split][0].append(ids)
                s2[split][1].append(len(prompt_ids(tokenizer, text, chat)))
        if not s2["train"][0]:
            raise DataError("stage 2: the target wrote no training sequences")
        s2_len = max(s2_len, min(max(len(x) for x in s2["train"][0]), 2 * s2_len))
        _log(f"[train] stage 2 data: {len(s2['train'][0])} target-written sequences "
             f"({sum(len(x) - p for x, p in zip(*s2['train']))} generated tokens), "
             f"{len(s2['heldout'][0])} held out")

    # ---- vocabulary, method, hidden states
    all_rows = [r for r in (rows1,) if r is not None]
    if s2["train"][0]:
        all_rows.append(pad_rows(s2["train"][0], s2_len))
    token_map = build_token_map(all_rows, model.config.vocab_size, cfg.train_vocab)
    method = MLPSpeculatorMethod(model, n_predict=cfg.n_predict, inner_dim=cfg.inner_dim,
                                 tie_weights=cfg.tie_weights, scale_input=cfg.scale_input,
                                 token_map=token_map, init=cfg.init, seed=cfg.seed,
                                 device=device)

    def hc(rows, name):
        return compute_hidden_cache(model, rows, cache_dir, fingerprint=fp, name=name,
                                    dtype=cfg.hidden_dtype,
                                    tokens_per_batch=cfg.hidden_batch_tokens, device=device,
                                    log=_log)

    caches = [hc(rows1, "stage 1") if (rows1 is not None and cfg.steps > 0) else None, None]
    held = {}
    if held_rows is not None:
        held["corpus"] = hc(held_rows, "held-out corpus")
    for split in ("train", "heldout"):
        seqs, plen = s2[split]
        if not seqs:
            continue
        c = hc(pad_rows(seqs, s2_len), f"stage 2 {split}")
        if split == "train":
            caches[1] = Stage2Cache(c, np.asarray(plen), cfg.stage2_group, cfg.seed)
        else:
            held["target-written"] = Stage2Cache(c, np.asarray(plen), 1)

    module, history = train_on_rows(cfg, method, caches, device=device, log=_log)
    if module is None:
        return {"stopped_at": cfg.stop_after, "history": history}

    results, summary = heldout_summary(method, module, held, cfg.batch_size, device, history,
                                       t_start)
    if dist.rank() == 0:
        n = cfg.n_predict
        topk = cfg.top_k_tokens_per_head or [max(1, 4 - i) for i in range(n)]
        extra = {"top_k_tokens_per_head": topk[:n], "n_candidates": cfg.n_candidates,
                 "specrt_training": {
                     "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                if k not in ("stop_after", "resume")},
                     "train_vocab": None if token_map is None else int(token_map.numel()),
                     "heldout": {k: {m: r[m] for m in ("top1", "top5", "chain",
                                                       "expected_accepted", "targets")}
                                 for k, r in results.items()},
                     "target": model_path or "in-memory"}}
        method.save(getattr(module, "module", module), cfg.out, extra_config=extra,
                    dtype=getattr(torch, cfg.save_dtype))
        out = Path(cfg.out)
        curves = method.curves
        (out / "loss_curves.json").write_text(json.dumps(
            {"stage1_steps": cfg.steps, "stage2_steps": cfg.stage2_steps,
             "per_stage_ce": [[round(v, 4) for v in row] for row in curves]}) + "\n")
        plot_curves(curves, cfg.steps, out / "loss_curves.png")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _write_card(cfg, summary, token_map, rows1, s2, out)
    dist.barrier()
    summary["history"] = history
    summary["curves"] = method.curves
    return summary


def plot_curves(curves: list, stage1_steps: int, path) -> Optional[Path]:
    """Per-stage training loss (one line per speculator stage) as a PNG; None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not curves:
        return None
    a = np.asarray(curves, dtype=float)
    k = max(1, len(a) // 100)  # running mean over ~1% of the run
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in range(a.shape[1]):
        y = np.convolve(a[:, i], np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(y)) + k, y, label=f"stage {i} (token t+{i + 2})")
    if 0 < stage1_steps < len(a):
        ax.axvline(stage1_steps, color="grey", ls="--", lw=1)
        ax.text(stage1_steps, ax.get_ylim()[1], " stage 2: target-written", va="top",
                fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("MLP speculator: training loss per stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def _write_card(cfg: MLPSpecConfig, summary: dict, token_map, rows1, s2, out: Path) -> None:
    inner = cfg.inner_dim or "emb_dim"
    lines = [f"# MLP speculator for `{cfg.model}`", "",
             f"Trained with `specrt train mlp-speculator` (specrt's own trainer) on the frozen "
             f"target: {cfg.n_predict} stages, inner_dim {inner}, tie_weights "
             f"{cfg.tie_weights}, scale_input {cfg.scale_input}; fms-extras MLPSpeculator "
             "architecture and public layout (`config.json` + `model.safetensors`, weights "
             f"{cfg.save_dtype}). Loss over the {token_map.numel() if token_map is not None else 'full'} "
             "most frequent training tokens; every other head row is zero (exactly the "
             "full-vocabulary model's loss).", "", "## Data", ""]
    if rows1 is not None:
        lines.append(f"- stage 1 ({cfg.steps} steps): {', '.join(cfg.data)}, train split, "
                     f"{int((rows1 != PAD).sum())} tokens in rows of {cfg.seq_len}, batch "
                     f"{cfg.batch_size}")
    if s2["train"][0]:
        gen = sum(len(x) - p for x, p in zip(*s2["train"]))
        lines.append(f"- stage 2 ({cfg.stage2_steps} steps): {len(s2['train'][0])} sequences "
                     f"written by the target (temperature {cfg.distill_temperature}): "
                     f"{cfg.stage2_prompt_len}-token corpus prompts continued for "
                     f"{cfg.stage2_new_tokens} tokens"
                     + (f", and responses to {', '.join(cfg.self_distill)} prompts"
                        if cfg.self_distill else "")
                     + f"; {gen} generated tokens (the only labels), batch "
                     f"{cfg.batch_size} x {cfg.stage2_group} sequences")
    lines += ["", "## Held-out accuracy", "",
              "Stage i predicts token t + 2 + i, teacher-forced on the true tokens; top-1 "
              "against the held-out text (corpus) or the target's own greedy continuation "
              "(target-written: what greedy verification accepts). Chain: stages 0..i all "
              "right; their sum is the expected number of accepted drafts of a greedy "
              f"{cfg.n_predict}-token chain.", "",
              "| set | positions | " + " | ".join(f"stage {i} top-1 / top-5 / chain"
                                                  for i in range(cfg.n_predict))
              + " | expected accepted |", "|---|---|" + "---|" * cfg.n_predict + "---|"]
    for nm, r in summary["heldout"].items():
        lines.append(f"| {nm} | {r['targets'][0]} | " + " | ".join(
            f"{a:.3f} / {b:.3f} / {c:.3f}" for a, b, c in zip(r["top1"], r["top5"], r["chain"]))
            + f" | {r['expected_accepted']:.2f} |")
    lines += ["", "Training loss per stage: `loss_curves.png` (values in `loss_curves.json`).",
              "", "## Reproduce", "", "```", cfg.command or "specrt train mlp-speculator ...",
              "```", "",
              f"Seed {cfg.seed}; lr {cfg.lr} (warmup {cfg.warmup}, cosine to "
              f"{cfg.min_lr_ratio:g}x, per stage); AdamW; grad clip {cfg.grad_clip}; init "
              f"{cfg.init}. Wall time {summary['elapsed_s']:.0f} s on {cfg.device} "
              f"({os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}), "
              f"torch {torch.__version__}, Python {sys.version.split()[0]}.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    """``python -m specrt.train.mlp_speculator ...`` (the same as ``specrt train
    mlp-speculator ...``)."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="specrt train mlp-speculator",
                                 description="train an MLP speculator on a frozen target")
    add_args(ap)
    args = ap.parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in ["specrt", "train", "mlp-speculator", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
