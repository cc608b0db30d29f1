"""Calibration: search the sublayer skip set (and chain length ``k``) of self-speculation.

A calibration tool, not inference code: it imports the engine and the proposers, and nothing
on the inference path imports it.

Objective (per unit of time, batch 1)::

    speed(S, k) = E[tokens emitted per step | S, k] / (k * t_draft(S) + t_verify(k + 1))

with ``E = 1 + sum_{d=1..k} P(accepted >= d)`` read from the depth histogram of real greedy
drafting through :class:`specrt.engine.Engine`, and ``t_draft`` / ``t_verify`` measured
forward times (median of repeated batch-1 forwards at the calibration context length).

Search (bounded by ``budget_s``; each phase checks the clock):

1. calibration: greedy continuations of the calibration prompts by the full model (plain
   engine run, which also times plain decoding), then the full model's argmax at every
   position of prompt + continuation;
2. proxy ranking: teacher-forced top-1 agreement between the skipped model and the full
   model over that text, one forward per candidate; every single sublayer is ranked alone;
3. greedy growth: starting from the empty set, add the sublayer (among the next ``window``
   best-ranked ones) whose addition keeps the agreement highest, giving nested sets of
   growing size; stop at ``min_agreement`` or when the phase's share of the budget is spent;
4. estimate the speed of every nested set from its agreement (as a per-token acceptance) and
   a per-sublayer cost model fitted to three measured forwards; keep the ``finalists`` best;
5. real drafting and measured draft-step times for the finalists; :func:`choose` picks the
   set and ``k`` of the highest speed (a pure function of the tables, tested on synthetic
   ones).
"""
from __future__ import annotations

import datetime as _dt
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .engine import Engine, SamplingParams
from .kv_cache import PagedKVCache, build_metadata
from .models.llama import SkipSet
from .proposers.self_spec import SelfSpecConfig, SelfSpecProposer, model_fingerprint

__all__ = ["Finalist", "choose", "expected_emitted", "default_prompts", "proxy_agreement",
           "time_forward", "tune_self_spec"]


# ------------------------------------------------------------------------------ the decision
@dataclass
class Finalist:
    """One candidate of the final round: its skip set, measured draft-step time (s) and
    ``accept_ge[d - 1] = P(accepted >= d)`` for d = 1..k_max from real drafting."""

    skip: SkipSet
    t_draft: float
    accept_ge: list
    agreement: float = 0.0
    extra: dict = field(default_factory=dict)


def expected_emitted(accept_ge: Sequence[float], k: int) -> float:
    """Tokens emitted per verify step with chains of ``k`` drafts: 1 + sum_{d<=k} P(acc >= d)."""
    return 1.0 + sum(accept_ge[:k])


def accept_ge_from_hist(hist: Sequence[int]) -> list:
    """P(accepted >= d), d = 1..len(hist) - 1, from a depth histogram (hist[d] = steps that
    accepted exactly d drafts)."""
    n = sum(hist)
    if not n:
        return []
    return [sum(hist[d:]) / n for d in range(1, len(hist))]


def choose(finalists: Sequence[Finalist], t_verify: dict, ks: Sequence[int]):
    """The (finalist index, k, speed) of the highest ``speed = E / (k t_draft + t_verify[k+1])``
    (tokens per second); ties go to the earlier finalist and the smaller k. ``t_verify`` maps
    a row count to seconds; a ``k`` beyond a finalist's measured depths counts as not
    accepted deeper."""
    best = None
    for i, f in enumerate(finalists):
        for k in ks:
            speed = expected_emitted(f.accept_ge, k) / (k * f.t_draft + t_verify[k + 1])
            if best is None or speed > best[2] + 1e-12:
                best = (i, k, speed)
    if best is None:
        raise ValueError("choose needs at least one finalist and one k")
    return best


# ------------------------------------------------------------------------------ measurements
def _prefill(model, cache: PagedKVCache, seqs: Sequence[Sequence[int]], skip=None):
    """Teacher-forced forward of whole sequences (fresh positions 0..n-1 each, causal);
    float32 logits [sum(n), V]. The cache's sequences 0..B-1 are reused across calls."""
    dev = cache.kv.device
    for i in range(len(seqs)):
        if not cache.has(i):
            cache.add_sequence(i)
    meta = build_metadata(cache, list(range(len(seqs))), [len(s) for s in seqs], dev)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=dev)
    pos = torch.cat([torch.arange(len(s)) for s in seqs]).to(dev)
    return model(ids, pos, cache.kv, meta, skip=skip).logits


def proxy_agreement(model, cache, seqs, labels: torch.Tensor, rows: torch.Tensor,
                    skip: SkipSet) -> float:
    """Fraction of ``rows`` where the skipped model's argmax equals ``labels`` (the full
    model's argmax), teacher-forced on ``seqs``."""
    logits = _prefill(model, cache, seqs, skip)
    return float((logits[rows].argmax(-1) == labels).float().mean())


def time_forward(model, rows: int, skip: Optional[SkipSet] = None, context: int = 128,
                 reps: int = 9, logits_rows: Optional[int] = None) -> float:
    """Median seconds of one batch-1 forward of ``rows`` new tokens (causal chain) after
    ``context`` cached positions; logits for the last ``logits_rows`` rows (default all)."""
    c = model.config
    dev = next(model.parameters()).device
    ps = 16
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, ps,
                         (context + rows) // ps + 2, next(model.parameters()).dtype, dev)
    cache.add_sequence(0)
    cache.reserve(0, context)
    cache.commit(0, context)
    ids = torch.randint(0, c.vocab_size, (rows,), generator=torch.Generator().manual_seed(0)).to(dev)
    pos = torch.arange(context, context + rows, device=dev)
    lr = torch.arange(rows - (logits_rows or rows), rows, device=dev)
    times = []
    for r in range(reps + 2):  # two warm-up runs
        meta = build_metadata(cache, [0], [rows], dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, pos, cache.kv, meta, logits_rows=lr, skip=skip)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if r >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------ prompts
def default_prompts(n_code: int = 3, n_chat: int = 3, seed: int = 0) -> list:
    """[(text, chat)]: HumanEval-like ``def`` + docstring prompts from the standard library
    (train split of ``specrt.train.data``; the HumanEval set itself is left to the benchmark)
    and chat prompts shipped with specrt, chosen by ``seed``."""
    from .train.data import CHAT_PROMPTS, load_prompts, stdlib_def_prompts

    rng = random.Random(seed)
    code = stdlib_def_prompts(max(4 * n_code, 8))
    code = [(p if isinstance(p, str) else p[0]) for p in code]
    chat = [t for t, _ in load_prompts(str(CHAT_PROMPTS))]
    out = [(t, False) for t in rng.sample(code, min(n_code, len(code)))]
    out += [(t, True) for t in rng.sample(chat, min(n_chat, len(chat)))]
    return out


def _encode(tokenizer, prompts) -> list:
    out = []
    for p in prompts:
        if isinstance(p, (list, tuple)) and p and isinstance(p[0], int):
            out.append(list(p))
            continue
        text, chat = p if isinstance(p, tuple) else (p, False)
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        out.append(list(tokenizer.encode(text)))
    return out


# ------------------------------------------------------------------------------ the search
def _run_and_hist(model, tokenizer, proposer, prompts, max_new, k):
    """Greedy batch-1 generation of every prompt; (outputs, depth histogram, generated, wall)."""
    eng = Engine(model, tokenizer, proposer=proposer, page_size=16, max_batch_size=1, max_draft=k,
                 num_pages=sum(-(-(len(p) + max_new + k + 2) // 16) for p in prompts) + 8)
    params = SamplingParams(max_new_tokens=max_new)
    hist, gen, outs = [], 0, []
    t = time.perf_counter()
    for p in prompts:
        outs.append(eng.generate([p], params)[0].token_ids)
        m = eng.metrics
        gen += m.generated
        for d, c in enumerate(m.depth_hist):
            hist += [0] * (d + 1 - len(hist))
            hist[d] += c
    return outs, hist, gen, time.perf_counter() - t


def tune_self_spec(model, tokenizer=None, prompts=None, *, budget_s: float = 300.0,
                   k_max: int = 6, seed: int = 0, new_tokens: int = 48, window: int = 3,
                   min_agreement: float = 0.3, max_skip_frac: float = 0.8, finalists: int = 3,
                   proxy_tokens: int = 384,
                   log: Optional[Callable[[str], None]] = print) -> SelfSpecConfig:
    """Choose the skip set and ``k`` of :class:`SelfSpecProposer` for ``model``.

    Parameters
    ----------
    model : LlamaModel (any dtype / device; timings are for that setting)
    tokenizer : needed for string prompts (default prompts are strings)
    prompts : list of str, (str, chat) or token-id lists; default :func:`default_prompts`
    budget_s : wall-clock budget of the whole search (the phases share it; the last phase
        always runs its finalists, so it may overrun by about one engine run)
    k_max : largest chain length considered (k = 1..k_max)
    seed : picks the default prompts (everything else is deterministic)
    new_tokens : greedy tokens generated per calibration prompt
    window : greedy growth tries the next ``window`` best-ranked sublayers at each step
    min_agreement : growth stops below this teacher-forced agreement
    max_skip_frac : growth stops at this fraction of all sublayers skipped
    finalists : candidates measured by real drafting
    proxy_tokens : calibration tokens scored by the proxy (each forward's length)

    Returns
    -------
    SelfSpecConfig, whose ``search`` holds the measured figures.
    """
    t_start = time.perf_counter()
    deadline = t_start + budget_s
    say = log or (lambda s: None)
    L = model.config.num_layers
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    def elapsed():
        return time.perf_counter() - t_start

    def note(msg):
        say(f"[tune {elapsed():6.1f}s] {msg}")

    # 1. calibration text and the plain baseline
    if prompts is None:
        prompts = default_prompts(seed=seed)
    ids = _encode(tokenizer, prompts)
    plain_outs, plain_hist, plain_gen, plain_wall = _run_and_hist(model, tokenizer, None, ids, new_tokens, 1)
    seqs = [p + o for p, o in zip(ids, plain_outs)]
    note(f"calibration: {len(seqs)} prompts, {sum(map(len, seqs))} tokens; plain decoding "
         f"{plain_gen / plain_wall:.1f} tok/s")
    # the proxy scores at most ``proxy_tokens`` tokens (each sequence cut to its share)
    ctx = max(16, int(statistics.mean(len(s) for s in seqs)))  # typical context of a step
    n_calib = sum(map(len, seqs))
    share = max(8, proxy_tokens // len(seqs))
    seqs = [s[-share:] if len(s) > share else s for s in seqs]
    c = model.config
    pages = sum(-(-len(s) // 16) for s in seqs) + 1
    cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, 16, pages, dtype, dev)
    # rows scored: every position from the 4th on (the first few have little context)
    rows = torch.cat([torch.arange(3, len(s) - 1) + off for s, off in
                      zip(seqs, [0] + list(torch.tensor([len(s) for s in seqs]).cumsum(0)[:-1].tolist()))])
    rows = rows.to(dev)
    labels = _prefill(model, cache, seqs)[rows].argmax(-1)
    memo: dict = {}

    def agree(s: SkipSet) -> float:
        if s not in memo:
            memo[s] = proxy_agreement(model, cache, seqs, labels, rows, s)
        return memo[s]

    # 2. rank single sublayers
    subs = [("attn", i) for i in range(L)] + [("mlp", i) for i in range(L)]

    def with_sub(s: SkipSet, sub) -> SkipSet:
        kind, i = sub
        return SkipSet(s.attn + (i,), s.mlp) if kind == "attn" else SkipSet(s.attn, s.mlp + (i,))

    # phases 2-3 share what calibration left: ranking up to 30%, growth up to 65% of it
    t_phase = time.perf_counter()
    rest = max(0.0, deadline - t_phase)
    single = {}
    for sub in subs:
        single[sub] = agree(with_sub(SkipSet(), sub))
        if time.perf_counter() > t_phase + 0.3 * rest:
            note("ranking cut short by the budget")
            break
    ranked = sorted(single, key=lambda s: (-single[s], s[0], s[1]))
    note(f"ranked {len(single)} sublayers alone; best {ranked[:6]}")

    # 3. greedy growth of nested sets
    cur = SkipSet()
    nested = []  # (skip, agreement)
    left = list(ranked)
    growth_end = t_phase + 0.65 * rest
    max_size = int(max_skip_frac * 2 * L)
    while left and len(cur) < max_size and time.perf_counter() < growth_end:
        tries = [(agree(with_sub(cur, sub)), -n, sub) for n, sub in enumerate(left[:window])]
        a, _, sub = max(tries)
        if a < min_agreement:
            break
        cur = with_sub(cur, sub)
        left.remove(sub)
        nested.append((cur, a))
    note(f"growth: {len(nested)} nested sets, last agreement "
         f"{nested[-1][1] if nested else float('nan'):.3f}")
    if not nested:
        raise ValueError("no sublayer can be skipped above min_agreement="
                         f"{min_agreement}: self-speculation does not fit this model")

    # 4. estimated speed of each nested set -> finalists
    t_full = time_forward(model, 1, None, ctx, logits_rows=1)
    t_noattn = time_forward(model, 1, SkipSet(range(L), ()), ctx, logits_rows=1)
    t_nomlp = time_forward(model, 1, SkipSet((), range(L)), ctx, logits_rows=1)
    ca, cm = max(0.0, (t_full - t_noattn) / L), max(0.0, (t_full - t_nomlp) / L)
    t_verify = {n: time_forward(model, n, None, ctx) for n in range(1, k_max + 2)}
    note(f"costs: full step {1e3 * t_full:.2f} ms, attention {1e3 * ca:.3f} ms and MLP "
         f"{1e3 * cm:.3f} ms per sublayer; verify " +
         ", ".join(f"{n}:{1e3 * t:.1f}" for n, t in t_verify.items()) + " ms")

    def est(s: SkipSet, a: float) -> float:
        td = t_full - ca * len(s.attn) - cm * len(s.mlp)
        a = min(a, 0.999)
        return max((1 - a ** (k + 1)) / (1 - a) / (k * td + t_verify[k + 1])
                   for k in range(1, k_max + 1))

    scored = sorted(nested, key=lambda sa: -est(*sa))
    picks = [s for s, _ in scored[:finalists]]
    note("finalists (estimate): " + "; ".join(
        f"{len(s)} skipped, agreement {memo[s]:.3f}, est {est(s, memo[s]):.1f} tok/s"
        for s in picks))

    # 5. real drafting + measured draft-step time
    final = []
    for s in picks:
        _, hist, gen, wall = _run_and_hist(model, tokenizer, SelfSpecProposer(model, s, k=k_max), ids,
                                           new_tokens, k_max)
        f = Finalist(s, time_forward(model, 1, s, ctx, logits_rows=1), accept_ge_from_hist(hist),
                     memo[s], {"depth_hist": hist, "engine_tokens_per_s": gen / wall})
        final.append(f)
        note(f"  {len(s)} skipped: depth histogram {hist}, draft step {1e3 * f.t_draft:.2f} ms, "
             f"engine {gen / wall:.1f} tok/s at k={k_max}")
        if time.perf_counter() > deadline and len(final) >= 1:
            note("finalists cut short by the budget")
            break
    i, k, speed = choose(final, t_verify, range(1, k_max + 1))
    best = final[i]
    e_len = expected_emitted(best.accept_ge, k)
    plain_speed = 1.0 / t_verify[1]
    note(f"chosen: {best.skip} (k={k}): expected {e_len:.2f} tokens/step, "
         f"{speed:.1f} tok/s by the model vs plain {plain_speed:.1f} "
         f"(x{speed / plain_speed:.2f})" + ("" if speed > plain_speed else
                                             "; plain decoding is faster on this device"))
    search = {
        "objective": "E[emitted/step] / (k*t_draft + t_verify(k+1)), batch 1, greedy",
        "acceptance": sum(best.accept_ge[:k]) / k,
        "mean_accepted_length": e_len,
        "accept_ge": [round(x, 4) for x in best.accept_ge],
        "depth_hist_k_max": best.extra["depth_hist"],
        "k_max": k_max,
        "t_draft_ms": round(1e3 * best.t_draft, 3),
        "t_verify_ms": {str(n): round(1e3 * t, 3) for n, t in t_verify.items()},
        "model_tokens_per_s": round(speed, 2),
        "model_speedup_vs_plain": round(speed * t_verify[1], 3),
        # False: on this device plain decoding is faster than the best set found
        "beats_plain": bool(speed > plain_speed),
        "engine_plain_tokens_per_s": round(plain_gen / plain_wall, 2),
        "engine_tokens_per_s_at_k_max": round(best.extra["engine_tokens_per_s"], 2),
        "teacher_forced_agreement": round(best.agreement, 4),
        "skipped_sublayers": len(best.skip),
        "finalists": [{"skip": f.skip.as_dict(), "agreement": round(f.agreement, 4),
                       "t_draft_ms": round(1e3 * f.t_draft, 3),
                       "accept_ge": [round(x, 4) for x in f.accept_ge]} for f in final],
        "calibration": {"prompts": len(ids), "tokens": n_calib,
                        "proxy_tokens": sum(map(len, seqs)),
                        "new_tokens": new_tokens, "seed": seed},
        "budget_s": budget_s,
        "elapsed_s": round(elapsed(), 1),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_name(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return SelfSpecConfig(best.skip, k, model_fingerprint(model), search)


def _device_name(dev) -> str:
    from .calibrate import device_name

    if dev.type == "cuda":
        return device_name(dev)
    return f"cpu ({device_name(dev)}, {torch.get_num_threads()} threads)"
