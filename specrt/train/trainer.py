"""The training pipeline: data -> hidden-state cache -> two-stage training -> evaluation ->
checkpoint in the method's public layout + a model card.

Determinism: the rows of global step ``i`` of a stage are a function of (seed, stage, i) only
(an epoch-wise permutation), the heads start from a fixed initialisation, and checkpoints hold
the module, optimizer, scheduler and RNG states, so ``--resume`` reproduces the uninterrupted
run's weights. Distributed: every rank takes its slice ``r::world`` of each global batch; the
loss is normalised by the global target counts, so the gradient DDP averages is that of the
whole global batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import dist
from .data import (CHAT_PROMPTS, DataError, PAD, load_prompts, pad_rows, split_of,
                   stdlib_def_prompts, tokenize_chunks)
from .hidden import HiddenCache, compute_hidden_cache, default_cache_dir, model_fingerprint

__all__ = ["TrainConfig", "run", "train_on_rows", "latest_checkpoint"]


@dataclass
class TrainConfig:
    method: str = "medusa"
    model: str = "smollm2-135m"
    data: list = field(default_factory=lambda: ["stdlib"])
    self_distill: list = field(default_factory=list)
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab: int = 8192
    labels: str = "text"
    seq_len: int = 512
    steps: int = 1000
    stage2_steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    stage2_lr: Optional[float] = None
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    out: str = "medusa-heads"
    resume: bool = False
    max_tokens: Optional[int] = None
    heldout_tokens: int = 32768
    heldout_pct: float = 5.0
    cache_dir: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    hidden_dtype: str = "float16"
    hidden_batch_tokens: int = 4096
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    layout: str = "resblock"
    save_dtype: str = "float16"
    fsdp: bool = False
    distill_max_prompts: int = 256
    distill_max_new_tokens: int = 256
    distill_temperature: float = 0.0
    distill_batch_size: int = 8
    distill_time_budget: Optional[float] = None
    stop_after: Optional[int] = None  # testing: leave after this many steps, as if killed
    command: Optional[str] = None
    # EAGLE
    length: int = 4  # EAGLE-3 training-time-test steps
    eval_length: int = 0  # steps scored in evaluation (0: max(length, 5))
    noise: float = 0.2  # EAGLE-1 uniform feature noise (the reference's std)

#: TrainConfig fields that only EAGLE runs read (left out of Medusa checkpoints' fingerprint)
_EAGLE_FIELDS = ("length", "eval_length", "noise")


def _log(*a):
    if dist.rank() == 0:
        print(*a, flush=True)


def _fingerprint(cfg: TrainConfig) -> str:
    """What a checkpoint must agree on to be resumed."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("resume", "out", "cache_dir", "stop_after", "command", "ckpt_every",
                         "keep_checkpoints", "log_every", "device", "hidden_batch_tokens",
                         "layout", "save_dtype", "fsdp", "distill_time_budget", "eval_length")
            and not (cfg.method == "medusa" and k in _EAGLE_FIELDS)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# schedule and batches
# --------------------------------------------------------------------------------------------


def _lr_factor(step: int, stages: list, warmup: int, min_ratio: float, lr_scales: list) -> float:
    """Linear warmup + cosine decay, restarted for each stage."""
    start = 0
    for n, scale in zip(stages, lr_scales):
        if step < start + n:
            t = step - start
            w = min(warmup, max(1, n // 5))
            if t < w:
                return scale * (t + 1) / w
            frac = (t - w) / max(1, n - w)
            return scale * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        start += n
    return lr_scales[-1] * min_ratio


def _global_rows(seed: int, stage: int, step: int, batch: int, n: int) -> np.ndarray:
    """Row indices of global batch ``step`` of a stage over ``n`` rows (epoch permutations)."""
    j = np.arange(step * batch, (step + 1) * batch, dtype=np.int64)
    out = np.empty(batch, dtype=np.int64)
    for ep in np.unique(j // n):
        perm = np.random.default_rng([seed, stage, int(ep)]).permutation(n)
        sel = (j // n) == ep
        out[sel] = perm[j[sel] % n]
    return out


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def latest_checkpoint(out_dir) -> Optional[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return None
    c = sorted(d.glob("step_*.pt"))
    return c[-1] if c else None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _save_checkpoint(out_dir, step: int, module, opt, sched, fp: str, keep: int,
                     data_pos: Optional[dict] = None) -> Path:
    """Module, optimizer, scheduler, RNG states and the data position after ``step`` steps
    (the position is informative: batches are a function of the step)."""
    d = Path(out_dir) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "module": module.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "fingerprint": fp,
                "data_position": data_pos or {}}, tmp)
    os.replace(tmp, path)
    for old in sorted(d.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


# --------------------------------------------------------------------------------------------
# training on prepared hidden-state caches
# --------------------------------------------------------------------------------------------


def _unwrap(m):
    return getattr(m, "module", m)


@torch.no_grad()
def evaluate(method, module, cache: HiddenCache, batch_rows: int, device) -> dict:
    """Method counters over a cache, sharded by rank and summed over ranks."""
    rank, world = dist.rank(), dist.world_size()
    counters: dict = {}
    idx = np.arange(rank, len(cache), world)
    for i in range(0, len(idx), batch_rows):
        c = method.eval_counters(_unwrap(module), cache.batch(idx[i:i + batch_rows], device))
        for k, v in c.items():
            counters[k] = counters.get(k, 0) + v.double()
    if not counters:  # this rank had no rows: zero counters of the right shape
        c = method.eval_counters(_unwrap(module), cache.batch([0], device))
        counters = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in c.items()}
    for k in sorted(counters):
        counters[k] = dist.all_reduce_sum(counters[k])
    return counters


def train_on_rows(cfg: TrainConfig, method, stage_caches: list, *, device="cpu",
                  log=_log) -> tuple:
    """The optimisation loop over prepared caches (one per stage, with its step count in
    ``cfg.steps`` / ``cfg.stage2_steps``). Returns ``(module, history)`` with ``history`` a
    list of per-step global losses; ``(None, history)`` when stopped by ``cfg.stop_after``."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    module = method.build()
    world = dist.world_size()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = torch.device(device)
        module = DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                     broadcast_buffers=False)
    stages = [cfg.steps, cfg.stage2_steps]
    scales = [1.0, (cfg.stage2_lr if cfg.stage2_lr is not None else cfg.lr) / cfg.lr]
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, stages, cfg.warmup, cfg.min_lr_ratio, scales))
    fp = _fingerprint(cfg)
    start = 0
    if cfg.resume:
        ck = latest_checkpoint(cfg.out)
        if ck is None:
            log(f"[train] --resume: no checkpoint in {cfg.out}/checkpoints, starting afresh")
        else:
            state = torch.load(ck, map_location=device, weights_only=False)
            if state["fingerprint"] != fp:
                raise ValueError(f"{ck}: checkpoint of a run with other settings (data, "
                                 "schedule, heads...); resume with the same arguments")
            _unwrap(module).load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start = int(state["step"])
            log(f"[train] resumed from {ck} at step {start}")
    weights = method.term_weights().to(device)
    total = sum(stages)
    rank = dist.rank()
    history: list = []
    win: dict = {}
    t0 = time.perf_counter()
    ntok = 0
    module.train()
    for step in range(start, total):
        stage = 0 if step < stages[0] else 1
        cache = stage_caches[stage]
        local = step - (0 if stage == 0 else stages[0])
        rows = _global_rows(cfg.seed, stage, local, cfg.batch_size, len(cache))
        batch = cache.batch(rows[rank::world], device)
        tok = batch["tokens"]
        sums, counts, metrics = method.loss_terms(module, batch)
        g = dist.all_reduce_sum(counts.detach().clone())
        loss = (weights * sums / g.clamp(min=1)).sum() * world
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        lv = dist.all_reduce_sum(loss.detach().double() / world).item()
        history.append(lv)
        ntok += int((tok != PAD).sum()) * world
        for k, v in metrics.items():
            win[k] = win.get(k, 0) + dist.all_reduce_sum(v.detach().clone())
        done = step + 1
        if done % cfg.log_every == 0 or done == total or done == stages[0]:
            dt = time.perf_counter() - t0
            log(f"[train] step {done}/{total} stage {stage + 1} loss {lv:.4f} "
                f"{method.format_metrics(win)} lr {sched.get_last_lr()[0]:.2e} "
                f"{ntok / max(dt, 1e-9):.0f} tok/s")
            win = {}
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < total:
            if rank == 0:
                _save_checkpoint(cfg.out, done, _unwrap(module), opt, sched, fp,
                                 cfg.keep_checkpoints,
                                 {"stage": stage + 1, "stage_step": local + 1,
                                  "rows_seen": (local + 1) * cfg.batch_size,
                                  "stage_rows": len(cache)})
            dist.barrier()
        if cfg.stop_after is not None and done >= cfg.stop_after and done < total:
            log(f"[train] stopping after step {done} (stop_after)")
            return None, history
    module.eval()
    return module, history


# --------------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------------


def _load_target(cfg: TrainConfig, device: str):
    from ..hub import resolve_model
    from ..models import load_model

    path = resolve_model(cfg.model)
    model, tok = load_model(path, dtype=getattr(torch, cfg.dtype), device=device)
    return model.eval().requires_grad_(False), tok, str(path)


def target_and_cache(cfg: TrainConfig, device: str, model=None, tokenizer=None,
                     model_path: Optional[str] = None) -> tuple:
    """``(model, tokenizer, model_path, fingerprint, cache_dir)``: the frozen target (loaded
    from ``cfg.model`` unless given), its fingerprint and the hidden-state cache folder."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if model is None:
        model, tokenizer, model_path = _load_target(cfg, device)
    return model, tokenizer, model_path, model_fingerprint(model, model_path), cache_dir


def _fsdp_wrap(model, device: str):
    """Shard the frozen target's decoder layers with FSDP2 (``fully_shard``)."""
    if not dist.is_dist():
        raise ValueError("--fsdp needs a distributed launch (torchrun --nproc-per-node N)")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - old torch
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (FSDP2): {e}")
    dev = torch.device(device)
    mesh = init_device_mesh(dev.type, (dist.world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return model


def _distill_prompts(specs: list, cfg: TrainConfig) -> list:
    prompts: list = []
    for spec in specs:
        if spec == "stdlib-defs":
            prompts += [(p, False) for p in stdlib_def_prompts(cfg.distill_max_prompts,
                                                               cfg.heldout_pct)]
        elif spec == "chat":
            prompts += load_prompts(str(CHAT_PROMPTS))
        else:
            prompts += load_prompts(spec)
    return prompts


def check_stages(cfg: TrainConfig) -> None:
    """The stage and batch-size rules every training pipeline shares."""
    if cfg.steps < 0 or cfg.stage2_steps < 0 or cfg.steps + cfg.stage2_steps < 1:
        raise ValueError("need --steps + --stage2-steps >= 1 (and neither negative)")
    if cfg.batch_size < dist.world_size():
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the number of "
                         f"processes ({dist.world_size()})")
    if cfg.stage2_steps > 0 and not cfg.self_distill:
        raise ValueError("--stage2-steps trains on self-distilled data: give --self-distill")
    if cfg.self_distill and cfg.stage2_steps == 0:
        raise ValueError("--self-distill data is used in stage 2: give --stage2-steps > 0")
    if cfg.steps > 0 and not cfg.data:
        raise ValueError("stage 1 (--steps > 0) needs --data")
    if cfg.self_distill and getattr(cfg, "fsdp", False):
        raise ValueError("self-distillation under --fsdp is not supported (ranks would "
                         "generate different numbers of steps); generate once without "
                         "--fsdp (the result is cached) or train without --fsdp")


def load_stage_data(cfg: TrainConfig, model, tokenizer, cache_dir, fingerprint) -> tuple:
    """``(stage_rows, heldout)``: stage 1 rows from ``cfg.data`` (when ``cfg.steps > 0``) with
    the corpus's held-out rows, stage 2 rows from self-distillation (``cfg.self_distill``) with
    its held-out share."""
    eos = (tokenizer.eos_token_ids[0] if getattr(tokenizer, "eos_token_ids", None) else None)
    stage_rows, heldout = [None, None], {}
    if cfg.steps > 0:
        stage_rows[0] = tokenize_chunks(tokenizer, cfg.data, cfg.seq_len, "train",
                                        cfg.max_tokens, cfg.heldout_pct, eos)
        _log(f"[train] stage 1 data: {stage_rows[0].shape[0]} rows x {cfg.seq_len} "
             f"({int((stage_rows[0] != PAD).sum())} tokens) from {cfg.data}")
        try:
            heldout["corpus"] = tokenize_chunks(tokenizer, cfg.data, cfg.seq_len, "heldout",
                                                cfg.heldout_tokens, cfg.heldout_pct, eos)
        except DataError:
            _log("[train] no held-out documents in the corpus data (too few files?)")
    if cfg.self_distill:
        from .distill import self_distill

        prompts = _distill_prompts(cfg.self_distill, cfg)
        if not prompts:
            raise DataError("--self-distill gave no prompts")
        gen = self_distill(model, tokenizer, prompts, cache_dir, fingerprint=fingerprint,
                           max_new_tokens=cfg.distill_max_new_tokens,
                           temperature=cfg.distill_temperature,
                           batch_size=cfg.distill_batch_size, seed=cfg.seed,
                           time_budget=cfg.distill_time_budget, log=_log)
        tr = [ids for text, _, ids in gen if split_of("distill:" + text, cfg.heldout_pct) == "train"]
        ho = [ids for text, _, ids in gen if split_of("distill:" + text, cfg.heldout_pct) != "train"]
        if not tr:
            raise DataError("self-distillation produced no training sequences")
        stage_rows[1] = pad_rows(tr, cfg.seq_len)
        if ho:
            heldout["distill"] = pad_rows(ho, cfg.seq_len)
        _log(f"[train] stage 2 data: {len(tr)} self-distilled sequences "
             f"({int((stage_rows[1] != PAD).sum())} tokens), {len(ho)} held out")
    return stage_rows, heldout


def heldout_summary(method, module, held: dict, batch_rows: int, device, history: list,
                    t_start: float) -> tuple:
    """``(results, summary)``: the method's held-out figures per cache (logged), and the run
    summary (held-out figures, final loss, elapsed time)."""
    results = {k: method.summarize(evaluate(method, module, c, max(1, batch_rows), device))
               for k, c in held.items()}
    for k, r in results.items():
        _log(f"[train] held-out {k}: top1 {r['top1']} chain {r['chain']} expected accepted "
             f"{r['expected_accepted']} ({r['targets'][0]} targets)")
    summary = {"heldout": results, "final_loss": history[-1] if history else None,
               "elapsed_s": round(time.perf_counter() - t_start, 1)}
    return results, summary


def run(cfg: TrainConfig, model=None, tokenizer=None, model_path: Optional[str] = None) -> dict:
    """Run the whole pipeline; returns the evaluation summary (also in ``cfg.out``)."""
    t_start = time.perf_counter()
    device = dist.init(cfg.device)
    from . import METHODS

    if cfg.method not in METHODS:
        raise ValueError(f"unknown training method {cfg.method!r} (known: {', '.join(METHODS)})")
    medusa = cfg.method == "medusa"
    if medusa and cfg.num_heads < 1:
        raise ValueError(f"--num-heads must be >= 1, got {cfg.num_heads}")
    if medusa and cfg.seq_len < cfg.num_heads + 2:
        raise ValueError(f"--seq-len {cfg.seq_len} is too small: every Medusa head needs a "
                         f"target inside the row (seq_len >= num_heads + 2 = {cfg.num_heads + 2})")
    if not medusa:
        if cfg.length < 1:
            raise ValueError(f"--length must be >= 1, got {cfg.length}")
        if cfg.seq_len < cfg.length + 2:
            raise ValueError(f"--seq-len {cfg.seq_len} is too small: every training-time-test "
                             f"step needs a target inside the row (seq_len >= length + 2 = "
                             f"{cfg.length + 2})")
    check_stages(cfg)
    model, tokenizer, model_path, fingerprint, cache_dir = target_and_cache(
        cfg, device, model, tokenizer, model_path)
    _log(f"[train] target {model_path or 'in-memory'}; device {device}; world "
         f"{dist.world_size()}; cache {cache_dir}")

    # ---- data
    stage_rows, heldout = load_stage_data(cfg, model, tokenizer, cache_dir, fingerprint)
    if cfg.fsdp:
        _fsdp_wrap(model, device)

    # ---- method
    from .medusa import MedusaMethod, build_token_map

    cfgm = model.config
    token_map = None
    if cfg.method != "eagle":  # EAGLE-1 predicts through the target's full LM head
        token_map = build_token_map([r for r in stage_rows if r is not None],
                                    cfgm.vocab_size, cfg.draft_vocab)
    if medusa:
        method = MedusaMethod(cfgm.hidden_size, cfgm.vocab_size, model.lm_head,
                              num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                              token_map=token_map, labels=cfg.labels, device=device)
    elif cfg.method == "eagle3":
        from .eagle import Eagle3Method

        method = Eagle3Method(model, token_map, length=cfg.length,
                              eval_length=cfg.eval_length or None, device=device)
    else:
        from .eagle import Eagle1Method

        method = Eagle1Method(model, noise=cfg.noise, eval_length=cfg.eval_length or 5,
                              device=device)
    if token_map is not None:
        cover = _coverage(stage_rows, token_map)
        _log(f"[train] draft vocabulary {token_map.numel()} of {cfgm.vocab_size} tokens "
             f"covers {cover:.2%} of training tokens")

    # ---- hidden states
    kind = getattr(method, "cache_kind", "final_norm")
    layers = tuple(getattr(method, "feature_layers", ()))
    if kind != "final_norm":
        _log(f"[train] hidden-state cache kind {kind}: target feature layers {list(layers)}")

    def hc(rows, name):
        return compute_hidden_cache(model, rows, cache_dir, fingerprint=fingerprint, name=name,
                                    dtype=cfg.hidden_dtype,
                                    tokens_per_batch=cfg.hidden_batch_tokens, device=device,
                                    log=_log, kind=kind, feature_layers=layers)

    caches = [hc(r, n) if r is not None else None
              for r, n in zip(stage_rows, ("stage 1", "stage 2"))]
    held = {k: hc(v, f"held-out {k}") for k, v in heldout.items()}

    module, history = train_on_rows(cfg, method, caches, device=device)
    if module is None:
        return {"stopped_at": cfg.stop_after, "history": history}
    if not medusa:
        return _finish_eagle(cfg, method, module, held, history, token_map, stage_rows,
                             model_path, device, t_start)

    # ---- evaluation and output
    # accuracy against the held-out text, and (labels "target") against the target's own
    # greedy predictions on it, which is what greedy verification accepts
    modes = ["text"] + (["target"] if cfg.labels == "target" else [])
    results = {}
    for mode in modes:
        method.labels = mode
        for k, c in held.items():
            name = k if mode == "text" else f"{k}, target's greedy"
            results[name] = method.summarize(evaluate(method, module, c,
                                                      max(1, cfg.batch_size), device))
    method.labels = cfg.labels
    for k, r in results.items():
        _log(f"[train] held-out {k}: top1 {r['top1']} top5 {r['top5']} ({r['targets'][0]} "
             "targets)")
    summary = {"heldout": results, "final_loss": history[-1] if history else None,
               "elapsed_s": round(time.perf_counter() - t_start, 1)}
    if dist.rank() == 0:
        calib = {k: r for k, r in results.items() if k.endswith("target's greedy")} or results
        rank_acc = _rank_accuracy(calib, cfg.num_heads)
        extra = {"medusa_rank_accuracy": rank_acc,
                 "specrt_training": {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                                if k not in ("stop_after", "resume")},
                                     "heldout": {k: {m: r[m] for m in ("top1", "top5",
                                                                       "targets")}
                                                 for k, r in results.items()},
                                     "target": model_path or "in-memory"}}
        method.save(_unwrap(module), cfg.out, extra_config=extra, layout=cfg.layout,
                    dtype=getattr(torch, cfg.save_dtype))
        _write_card(cfg, summary, token_map, stage_rows, model_path)
        (Path(cfg.out) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    summary["history"] = history
    return summary


def _finish_eagle(cfg: TrainConfig, method, module, held: dict, history: list, token_map,
                  stage_rows, model_path, device, t_start) -> dict:
    """Held-out evaluation, the head in the SafeAILab layout and the card (EAGLE runs)."""
    results, summary = heldout_summary(method, module, held, cfg.batch_size, device, history,
                                       t_start)
    if dist.rank() == 0:
        extra = {"heldout_step_accuracy": {k: {m: r[m] for m in ("top1", "top5", "chain",
                                                                 "expected_accepted",
                                                                 "targets")}
                                           for k, r in results.items()},
                 "training": {"config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                         if k not in ("stop_after", "resume")},
                              "target": model_path or "in-memory"}}
        method.save(_unwrap(module), cfg.out, extra_config=extra,
                    dtype=getattr(torch, cfg.save_dtype))
        _write_eagle_card(cfg, method, summary, token_map, stage_rows)
        (Path(cfg.out) / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    summary["history"] = history
    return summary


def _write_eagle_card(cfg: TrainConfig, method, summary: dict, token_map, stage_rows) -> None:
    c = method.cfg
    v3 = c.variant == "eagle3"
    name = "EAGLE-3" if v3 else "EAGLE-1"
    lines = [f"# {name} head for `{cfg.model}`", "",
             f"Trained with `specrt train {cfg.method}` (specrt's own trainer) on the frozen "
             "target. One decoder layer (hidden "
             f"{c.hidden_size}, {c.num_heads} query / {c.num_kv_heads} kv heads, MLP "
             f"{c.intermediate_size}); the target's token embedding. "]
    if v3:
        lines[-1] += (
            f"Features: the inputs of target layers {list(c.feature_layers)} (fused 3H -> H by "
            f"`fc`); own LM head over a draft vocabulary of {c.draft_vocab_size} tokens "
            f"(`d2t` / `t2d`: the most frequent training tokens"
            + (f", {_coverage(stage_rows, token_map):.2%} of them" if token_map is not None
               else "") + "), initialised from the target's rows. Training-time test over "
            f"{cfg.length} steps (step weight 0.8^s), loss: cross-entropy against the target's "
            "distribution over the draft vocabulary.")
    else:
        lines[-1] += ("Feature: the target's final-normed last hidden state; logits through the "
                      "target's LM head. Loss: smooth-L1 to the next feature + 0.1 x "
                      "cross-entropy against the target's distribution; uniform feature noise "
                      f"{cfg.noise}.")
    lines += ["", f"Layout: SafeAILab {name} (`config.json` + `model.safetensors`), weights "
              f"{cfg.save_dtype}; load with `EagleProposer(target, path)`.", "", "## Data", ""]
    lines += _data_lines(cfg, stage_rows)
    k = method.eval_length
    lines += ["", "## Held-out accuracy", "",
              "Step s: the head's draft at depth s + 1 below a position, fed the true tokens "
              "and its own earlier outputs (training-time test); top-1 against the target's "
              "own greedy token (what greedy verification accepts; a token outside the draft "
              "vocabulary is a miss). Chain: steps 0..s all right; their sum is the expected "
              f"number of accepted drafts of a greedy {k}-token chain.", "",
              "| set | positions | " + " | ".join(f"step {s} top-1 / chain" for s in range(k))
              + " | expected accepted |",
              "|---|---|" + "---|" * k + "---|"]
    for nm, r in summary["heldout"].items():
        lines.append(f"| {nm} | {r['targets'][0]} | " + " | ".join(
            f"{a:.3f} / {b:.3f}" for a, b in zip(r["top1"], r["chain"]))
            + f" | {r['expected_accepted']:.2f} |")
    cmd = cfg.command or f"specrt train {cfg.method} ..."
    lines += _reproduce_lines(cfg, cmd, summary)
    (Path(cfg.out) / "README.md").write_text("\n".join(lines))


def _reproduce_lines(cfg: TrainConfig, cmd: str, summary: dict) -> list:
    """The card's "Reproduce" section."""
    return ["", "## Reproduce", "", "```", cmd, "```", "",
            f"Seed {cfg.seed}; batch {cfg.batch_size} rows; lr {cfg.lr} (warmup {cfg.warmup}, "
            f"cosine to {cfg.min_lr_ratio:g}x, per stage); AdamW; grad clip {cfg.grad_clip}. "
            f"Wall time {summary['elapsed_s']:.0f} s on {cfg.device} "
            f"({os.cpu_count()} CPUs visible), torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}.", ""]


def _data_lines(cfg: TrainConfig, stage_rows) -> list:
    """The card's "Data" bullet points."""
    out = []
    if stage_rows[0] is not None:
        out.append(f"- stage 1 ({cfg.steps} steps): {', '.join(cfg.data)}, train split "
                   f"({100 - cfg.heldout_pct:g}% of documents by a stable hash of their path), "
                   f"{int((stage_rows[0] != PAD).sum())} tokens in rows of {cfg.seq_len}")
    if stage_rows[1] is not None:
        out.append(f"- stage 2 ({cfg.stage2_steps} steps): self-distillation, the target's "
                   f"own greedy (temperature {cfg.distill_temperature}) responses to prompts "
                   f"from {', '.join(cfg.self_distill)}: {stage_rows[1].shape[0]} sequences, "
                   f"{int((stage_rows[1] != PAD).sum())} tokens")
    return out


def _coverage(stage_rows, token_map) -> float:
    inmap = np.zeros(int(token_map.max()) + 1, dtype=bool)
    inmap[token_map.numpy()] = True
    hit = tot = 0
    for r in stage_rows:
        if r is None:
            continue
        v = r[r != PAD]
        tot += v.size
        hit += int(inmap[v[v < inmap.size]].sum())
    return hit / max(tot, 1)


def _rank_accuracy(results: dict, k_: int) -> list:
    """Per-rank accuracies for the calibrated tree: target-weighted over the held-out sets."""
    if not results:
        return []
    acc = np.zeros((k_, len(next(iter(results.values()))["rank_accuracy"][0])))
    w = np.zeros(k_)
    for r in results.values():
        n = np.asarray(r["targets"], dtype=float)
        acc += np.asarray(r["rank_accuracy"]) * n[:, None]
        w += n
    acc /= np.maximum(w, 1)[:, None]
    # non-increasing in rank (sparse_choices needs it for ancestor-closed trees)
    acc = np.minimum.accumulate(acc, axis=1)
    return [[round(float(v), 5) for v in row] for row in acc]


def _write_card(cfg: TrainConfig, summary: dict, token_map, stage_rows, model_path) -> None:
    lines = [f"# Medusa heads for `{cfg.model}`", "",
             f"Trained with `specrt train medusa` (specrt's own trainer): {cfg.num_heads} heads "
             f"x {cfg.num_layers} residual block(s) on the frozen target's final-normed hidden "
             "state; logits through the target's LM head"
             + (f" restricted to a draft vocabulary of {token_map.numel()} tokens (`token_map`)"
                if token_map is not None else "") + f". Layout: `{cfg.layout}`, weights "
             f"{cfg.save_dtype}.", "",
             "## Data", ""]
    lines += _data_lines(cfg, stage_rows)
    lines += ["", "## Held-out accuracy", "",
              "Top-k: the true token is among head k's k best candidates (a token outside the "
              "draft vocabulary counts as a miss). \"target's greedy\" rows score against the "
              "target's own argmax (over the draft vocabulary) given the held-out prefix: what "
              f"greedy verification accepts. Training labels: {cfg.labels}.", "",
              "| set | targets (head 0) | " + " | ".join(
                  f"head {k} top-1 / top-5" for k in range(cfg.num_heads)) + " |",
              "|---|---|" + "---|" * cfg.num_heads]
    for name, r in summary["heldout"].items():
        lines.append(f"| {name} | {r['targets'][0]} | " + " | ".join(
            f"{a:.3f} / {b:.3f}" for a, b in zip(r["top1"], r["top5"])) + " |")
    cmd = cfg.command or "specrt train medusa ..."
    lines += _reproduce_lines(cfg, cmd, summary)
    (Path(cfg.out) / "README.md").write_text("\n".join(lines))


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["specrt", *sys.argv[1:]])
