"""Self-distillation: the target writes its own training text.

Each prompt is run through specrt's :class:`~specrt.engine.Engine` (batched; greedy unless a
temperature is given) and ``prompt ids + response ids`` becomes one training sequence, so the
heads learn the distribution they will be asked to predict at inference. Results are cached
as JSONL under the cache directory, keyed by the target, the prompts and the generation
parameters. A time budget stops submitting new prompts once spent (the cache then records how
many prompts were done, and a later run with the same settings reuses them as they are).
Under ``torch.distributed`` every rank generates its share of the prompts.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from . import dist

__all__ = ["prompt_ids", "self_distill"]


def prompt_ids(tokenizer, text: str, chat: bool) -> list:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return [int(t) for t in tokenizer.encode(text)]


def _key(fingerprint: str, prompts, params: dict) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    for text, chat in prompts:
        h.update(f"{int(chat)}:{len(text)}:".encode())
        h.update(text.encode())
    return h.hexdigest()[:24]


def self_distill(model, tokenizer, prompts: Sequence[tuple], cache_dir, *, fingerprint: str,
                 max_new_tokens: int = 256, temperature: float = 0.0, batch_size: int = 8,
                 seed: int = 0, time_budget: Optional[float] = None, log=print) -> list:
    """Generate responses; returns ``[(prompt_text, chat, token_ids)]`` with ``token_ids`` =
    prompt + response, in prompt order (prompts cut by the time budget are absent)."""
    from ..engine import Engine, SamplingParams

    prompts = [(str(t), bool(c)) for t, c in prompts]
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "time_budget": time_budget}
    path = Path(cache_dir) / f"distill-{_key(fingerprint, prompts, params)}.jsonl"
    if path.is_file():
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        log(f"[train] self-distillation: {len(recs)} cached sequences from {path}")
        return [(r["prompt"], r["chat"], r["ids"]) for r in recs]
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(prompts), world))
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    t0 = time.perf_counter()
    done: list = []
    ntok = 0
    group = batch_size * 2
    for g in range(0, len(mine), group):
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            log(f"[train] self-distillation: rank {rank} time budget of {time_budget:.0f}s "
                f"spent after {len(done)} of {len(mine)} prompts")
            break
        idx = mine[g:g + group]
        for chat in (True, False):
            sel = [i for i in idx if prompts[i][1] == chat]
            if not sel:
                continue
            ids = [prompt_ids(tokenizer, prompts[i][0], chat) for i in sel]
            sp = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed * 1_000_003 + i) for i in sel]
            outs = engine.generate(ids, sp)
            for i, p, o in zip(sel, ids, outs):
                if getattr(o, "error", None):
                    log(f"[train] self-distillation: prompt {i} failed: {o.error}")
                    continue
                done.append((i, p + [int(t) for t in o.token_ids]))
                ntok += len(o.token_ids)
        dt = time.perf_counter() - t0
        if rank == 0:
            log(f"[train] self-distillation: {len(done) * world}/{len(prompts)} prompts, "
                f"{ntok * world} new tokens, {ntok / max(dt, 1e-9) * world:.1f} tok/s")
    gathered = [x for part in dist.all_gather_objects(done) for x in part]
    gathered.sort(key=lambda x: x[0])
    out = [(prompts[i][0], prompts[i][1], ids) for i, ids in gathered]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for text, chat, ids in out:
                f.write(json.dumps({"prompt": text, "chat": chat, "ids": ids}) + "\n")
        tmp.replace(path)
    dist.barrier()
    return out
