"""Calibration of the cost model of :class:`specrt.policy.AutoPolicy`: seconds, cached.

Measured per engine (device, model, dtype, page size, proposer and its settings):

- **verify**: the target forward over ``n`` tree rows for each of ``B`` sequences with a
  128-token context (and, since version 7, the shapes of up to 16 rows again at 512, or as
  long as the engine's ``max_seq_len`` allows, skipped below 256: the table interpolates in
  the batch's mean context), on a grid of batch sizes (1, 2, 4, ... up to ``max_batch_size``) and rows
  per sequence (1 .. ``max_tree_nodes``), coarse grid first, then refined while the time
  budget lasts; total rows are capped (the table extrapolates linearly past them). Each shape
  is timed as a ratio to the 1-row forward of its batch size timed just before it (a drifting
  machine speed cancels out), the small shapes most often;
- **drafting and host overhead**: short engine runs with the proposer at fixed budgets (plain,
  a depth-1 chain, the deepest chain, the widest tree) on synthetic prompts (random tokens
  with a repeated stretch, so n-gram style proposers find matches), at batch 1 and at a larger
  batch; the engine's own step timings give the proposer's ``propose`` time and the rest of
  the step. The host overhead is the rest of a plain step; drafting time, with the host time a
  drafted step adds beyond that, is fitted as ``a + per_level * depth + per_node * draft
  nodes``. For a proposer set, the set's plain steps are timed, then each member's budgets
  alone: one fit per member (``CostTable.members``).

The table is cached as JSON under ``$SPECRT_CACHE_DIR/costs`` (default
``~/.cache/specrt/costs``) in a file named by a hash of everything it depends on (the key is
stored beside the table and compared on load): another device, model, dtype, torch version,
thread count or proposer setting gives another file, i.e. a fresh calibration. Nothing here
runs on the decode path: the engine calibrates once, before its first step, and the policy
reads the table only.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from . import ops
from ._ext import load_extension
from .kv_cache import PagedKVCache, build_metadata
from .models import llama
from .policy import PLAIN, Budget, CostTable
from .tree import DraftTree, batch_trees

__all__ = ["cache_dir", "cost_key", "calibrate", "load_or_calibrate", "device_name",
           "proposer_signature"]

_NODE_COARSE = (1, 2, 4, 8, 16, 32, 64)
_NODE_FINE = (3, 5, 6, 10, 12, 24, 48)
_PREFIX = 128
_LONG = 512
_ROW_CAP = 512
_VERSION = 7  # 7: verify grid also at a long context; 2: row-major grid; 3: CPU GEMM (ops.linear); 4: interleaved passes, isotonic;
#              5: each shape timed as a ratio to the 1-row shape timed just before it;
#              6: host time of plain steps; drafted steps' extra host time in the draft fit


def cache_dir() -> Path:
    root = os.environ.get("SPECRT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "specrt"
    return base / "costs"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def proposer_signature(proposer) -> dict:
    """The proposer's name and its scalar settings (what its drafting cost depends on)."""
    sig = getattr(proposer, "cost_signature", None)
    if callable(sig):
        return sig()
    out = {"name": proposer.name, "class": type(proposer).__name__}
    for k, v in sorted(vars(proposer).items()):
        if k.startswith("_"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)) and len(v) <= 64 and all(
                isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
    return out


def cost_key(engine) -> dict:
    """Everything the cost table depends on."""
    from .proposers.self_spec import model_fingerprint

    dev = engine.device
    return {
        "version": _VERSION,
        "device": device_name(dev), "device_type": dev.type,
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "torch": torch.__version__,
        # The native kernels (any rebuild), the CPU GEMM path and its row limit change every
        # verify cost.
        "native": _native_hash(),
        "cpu_linear": ([ops.linear_isa(engine.dtype), llama.CPU_LINEAR_MAX_ROWS]
                       if dev.type == "cpu" else None),
        "model": model_fingerprint(engine.model),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "page_size": engine.cache.page_size,
        "max_batch_size": engine.max_batch_size,
        "max_tree_nodes": engine.max_tree_nodes,
        "max_draft": engine.max_draft,
        "max_seq_len": engine.max_seq_len,  # the long-context grid needs room
        "proposer": proposer_signature(engine.proposer),
    }


_NATIVE_HASH: list = []


def _native_hash() -> str:
    """Hash of the loaded extension binary (specrt._C): a rebuilt kernel invalidates every
    cost table measured with the old one."""
    if not _NATIVE_HASH:
        try:
            _NATIVE_HASH.append(hashlib.sha1(Path(load_extension().__file__).read_bytes())
                                .hexdigest()[:16])
        except (OSError, AttributeError, TypeError):
            _NATIVE_HASH.append("unknown")
    return _NATIVE_HASH[0]


def _key_hash(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_calibrate(engine, menu, *, budget_s: float = 20.0, refresh: bool = False,
                      path: Optional[Path] = None) -> CostTable:
    """The cached table of ``engine`` if its key matches, else a fresh calibration (saved)."""
    key = cost_key(engine)
    path = path or cache_dir() / f"{_key_hash(key)}.json"
    if not refresh and path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("key") == json.loads(json.dumps(key, default=str)):
                t = CostTable.from_dict(d["table"])
                t.meta["cached"] = str(path)
                return t
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale: calibrate again
    table = calibrate(engine, menu, budget_s=budget_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "table": table.as_dict()}, default=str, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the table still serves this engine
    return table


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_grid(max_batch: int) -> list:
    g, b = [], 1
    while b < max_batch:
        g.append(b)
        b *= 2
    g.append(max_batch)
    return g


def _isotonic(ys: list) -> list:
    """The non-decreasing sequence closest to ``ys`` in least squares (pool adjacent
    violators): a verify step never gets cheaper with more rows, whatever a noisy timing says."""
    blocks: list = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    out: list = []
    for m, c in blocks:
        out += [m] * c
    return out


@torch.no_grad()
def _time_verify(model, device, dtype, batch_sizes, node_sizes, deadline: float,
                 reps: int = 3, small_reps: int = 9, small: int = 8,
                 prefix: int = _PREFIX) -> dict:
    """``{(B, n): seconds}`` for B sequences of n rows each with ``prefix`` cached tokens,
    after one untimed forward per shape (a new GEMM shape's first call pays for its setup).

    A shared machine's speed drifts by tens of percent within seconds, more than the cost of a
    few extra rows, so each shape with n > 1 is timed right after the 1-row shape of its batch
    size and recorded as the ratio of the two: ``t(B, n) = median t(B, 1) x median ratio``.
    Passes over the grid are interleaved (a slow spell touches every shape alike); the first
    covers a coarse grid, later ones run while time remains: up to ``reps`` timings of every
    shape, then up to ``small_reps`` of the shapes with ``n <= small`` (what the policy chooses
    among on a CPU). The result is made non-decreasing in the row count per batch size."""
    cfg = model.config
    max_b, max_n = max(batch_sizes), max(node_sizes)
    page = 16
    per_seq = -(-(prefix + max_n) // page)
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page,
                         max_b * per_seq + 1, dtype, device)
    for s in range(max_b):
        cache.add_sequence(s)
        cache.reserve(s, prefix + max_n)
        cache.commit(s, prefix)
    base: dict = {B: [] for B in batch_sizes}  # t(B, 1) samples
    ratios: dict = {}  # (B, n) -> [t(B, n) / t(B, 1) timed just before]

    def run(B, n):
        tree = DraftTree([1] * n, [-1] + [(i - 1) // 2 for i in range(1, n)])
        tb = batch_trees([tree] * B, [prefix] * B, device=device)
        meta = build_metadata(cache, list(range(B)), tb, device)
        _sync(device)
        t = time.perf_counter()
        model(tb.tokens.long(), tb.positions, cache.kv, meta)
        _sync(device)
        return time.perf_counter() - t

    def sample(B, n):
        ref = run(B, 1)
        base[B].append(ref)
        ratios.setdefault((B, n), []).append(1.0 if n == 1 else run(B, n) / ref)

    run(1, 1)  # warm-up
    coarse = [n for n in _NODE_COARSE if n < max_n] + [max_n]
    fine = [n for n in _NODE_FINE if n < max_n and n not in coarse]
    # Row counts outer, batch sizes inner: every batch size gets its small trees (what the
    # policy chooses among most often) before any gets its large ones; past the deadline a
    # batch size still gets up to three points.
    for grid in (coarse, fine):
        for n in grid:
            for B in batch_sizes:
                if (B, n) in ratios or n not in node_sizes:
                    continue
                if B * n > _ROW_CAP and n != 1:
                    continue
                if time.perf_counter() > deadline and sum(k[0] == B for k in ratios) >= 3:
                    continue
                run(B, n)
                sample(B, n)
    for shapes, count in ((list(ratios), reps), ([k for k in ratios if k[1] <= small], small_reps)):
        while time.perf_counter() <= deadline and min(len(ratios[k]) for k in shapes) < count:
            for shape in shapes:
                if len(ratios[shape]) < count:
                    sample(*shape)
    out: dict = {}
    for B in batch_sizes:
        ns = sorted(n for b, n in ratios if b == B)
        t1 = statistics.median(base[B]) if base[B] else 0.0
        for n, t in zip(ns, _isotonic([t1 * statistics.median(ratios[(B, n)]) for n in ns])):
            out[(B, n)] = t
    return out


class _OneBudget:
    """A policy that hands every sequence the same budget (calibration runs)."""

    name = "calibration"

    def __init__(self, b: Budget):
        self.b = b

    def reset(self):
        pass

    def plan(self, sids, limits):
        return [Budget(min(self.b.depth, lim), self.b.nodes, self.b.source) for lim in limits]

    def observe(self, sid, b, accepted, drafted=None, nodes=None, verified=None):
        pass

    def release(self, sid):
        pass


def _synthetic_prompts(vocab: int, count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    hi = max(2, min(vocab, 32000))
    prompts = []
    for _ in range(count):
        part = [rng.randrange(1, hi) for _ in range(24)]
        prompts.append(part + [rng.randrange(1, hi) for _ in range(16)] + part)
    return prompts


def _time_steps(engine, menu, batch_sizes, deadline: float, steps: int = 6,
                plain: bool = True) -> dict:
    """Per calibration batch size, the engine's step log at a few fixed budgets (plain
    decoding among them unless ``plain=False``)."""
    from .engine import SamplingParams

    deep = max((b.depth for b in menu), default=0)
    picks = [PLAIN] if plain else []
    for b in menu:  # depth-1 chain, deepest chain, widest tree
        if b.depth == 1 and b.nodes == 2 and b not in picks:
            picks.append(b)
    chains = [b for b in menu if b.depth == deep and b.nodes == deep + 1 and b not in picks]
    picks += chains[:1]
    widest = max(menu, key=lambda b: (b.nodes, b.depth))
    if widest not in picks:
        picks.append(widest)
    saved = engine.policy
    logs: dict = {}
    vocab = engine.model.config.vocab_size
    try:
        for B in batch_sizes:
            rows = []
            for b in picks:
                if time.perf_counter() > deadline and len(rows) >= 2 * steps:
                    break
                engine.policy = _OneBudget(b)
                engine._step_log = []
                params = SamplingParams(temperature=0.0, max_new_tokens=steps + 1,
                                        ignore_eos=True)
                engine.generate(_synthetic_prompts(vocab, B), params)
                rows += engine._step_log[1:]  # the first step pays one-off costs
            logs[B] = rows
    finally:
        engine.policy = saved
        engine._step_log = None
    return logs


def _host(r) -> float:
    """A step's time outside drafting and the target forward (verification, rollback, host
    bookkeeping, the proposer's commit)."""
    return max(0.0, r[5] - r[3] - r[4])


def _plain_host(rows) -> float:
    """The host time of plain steps (of all steps when there are none)."""
    plain = [_host(r) for r in rows if r[1] == 0] or [_host(r) for r in rows]
    return statistics.median(plain) if plain else 0.0


def _fit_draft(rows) -> tuple:
    """``(t0, a, per_level, per_node)`` from step-log rows ``(B, depth, draft_nodes,
    propose_s, forward_s, step_s)``. A drafted step's cost beyond plain decoding includes the
    host time its tree adds (verifying more rows, tree bookkeeping; ~0.1-0.15 ms per row on
    the 2-core CPU), so that is fitted along with the drafting time."""
    import numpy as np

    plain = [r[3] for r in rows if r[1] == 0]
    t0 = statistics.median(plain) if plain else 0.0
    pts = [r for r in rows if r[1] > 0]
    if not pts:
        return (t0, t0, 0.0, 0.0)
    h0 = _plain_host(rows)
    X = np.array([[1.0, r[1], r[2]] for r in pts])
    y = np.array([r[3] + max(0.0, _host(r) - h0) for r in pts])
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    a, per_level, per_node = (float(c) for c in coef)
    if per_level < 0 or per_node < 0 or a < 0:  # noisy or degenerate: the simplest fit
        per_level = max(per_level, 0.0)
        per_node = max(per_node, 0.0)
        a = max(0.0, float(np.mean(y - per_level * X[:, 1] - per_node * X[:, 2])))
    return (t0, a, per_level, per_node)


def calibrate(engine, menu, *, budget_s: float = 20.0) -> CostTable:
    """Measure ``engine``'s cost table (module docstring); about ``budget_s`` seconds (the
    verify grid gets 60% of it, the engine runs the rest; a coarse grid and one engine run
    per budget always complete)."""
    t_start = time.perf_counter()
    dev, model = engine.device, engine.model
    batch_sizes = _batch_grid(engine.max_batch_size)
    nodes = sorted({n for n in (*_NODE_COARSE, *_NODE_FINE) if n <= engine.max_tree_nodes}
                   | {max(1, engine.max_tree_nodes)})
    ver = _time_verify(model, dev, engine.dtype, batch_sizes, nodes,
                       t_start + 0.42 * budget_s)
    # the same shapes (up to 16 rows) at a long context: extra rows cost more there
    long_ctx = min(_LONG, engine.max_seq_len - engine.max_tree_nodes - 1)
    ver_long = (_time_verify(model, dev, engine.dtype, batch_sizes,
                             [n for n in nodes if n <= 16] + [nodes[-1]],
                             t_start + 0.6 * budget_s, reps=2, small_reps=5, prefix=long_ctx)
                if long_ctx > 2 * _PREFIX else {})
    cal_b = sorted({1, min(8, engine.max_batch_size)})
    members = getattr(engine.proposer, "members", None) or ()
    fits, hosts = {}, {}
    mfits = [{} for _ in members]
    if members:
        # A proposer set: its plain steps (no member runs), then each member's own budgets
        # (source k) alone; each member's fit shares the plain steps.
        plain = _time_steps(engine, [PLAIN], cal_b, t_start + 0.65 * budget_s)
        for B, rows in plain.items():
            fits[B] = _fit_draft(rows)
            hosts[B] = _plain_host(rows)
        for k in range(len(members)):
            own = [b for b in menu if b.source == k]
            logs = _time_steps(engine, own, cal_b,
                               t_start + budget_s * (0.65 + 0.35 * (k + 1) / len(members)),
                               plain=False)
            for B, rows in logs.items():
                mfits[k][B] = _fit_draft(plain.get(B, []) + rows)
    else:
        logs = _time_steps(engine, menu, cal_b, t_start + budget_s)
        for B, rows in logs.items():
            fits[B] = _fit_draft(rows)
            hosts[B] = _plain_host(rows)

    def interp(B, table):
        ks = sorted(table)
        if B <= ks[0]:
            return table[ks[0]]
        if B >= ks[-1]:
            return table[ks[-1]]
        lo = max(k for k in ks if k <= B)
        hi = min(k for k in ks if k >= B)
        if lo == hi:
            return table[lo]
        f = (B - lo) / (hi - lo)
        a, b = table[lo], table[hi]
        if isinstance(a, tuple):
            return tuple(x + (y - x) * f for x, y in zip(a, b))
        return a + (b - a) * f

    bs, rows, vs, hs, ds = [], [], [], [], []
    long_rows, long_vs = [], []
    ms = [[] for _ in members]
    for B in batch_sizes:
        pts = sorted((B * n, t) for (b, n), t in ver.items() if b == B)
        if len(pts) < 1:
            continue
        lpts = sorted((B * n, t) for (b, n), t in ver_long.items() if b == B)
        long_rows.append([r for r, _ in lpts] or [r for r, _ in pts])
        long_vs.append([t for _, t in lpts] or [t for _, t in pts])
        bs.append(B)
        rows.append([r for r, _ in pts])
        vs.append([t for _, t in pts])
        hs.append(interp(B, hosts))
        ds.append(list(interp(B, fits)))
        for k, f in enumerate(mfits):
            ms[k].append(list(interp(B, f)))
    meta = {"device": device_name(dev), "dtype": str(engine.dtype).replace("torch.", ""),
            "proposer": engine.proposer.name,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "calibration_s": round(time.perf_counter() - t_start, 3),
            "menu": [[b.depth, b.nodes] + ([b.source] if b.source >= 0 else []) for b in menu]}
    long = ({"context": long_ctx, "base": _PREFIX, "rows": long_rows, "verify_s": long_vs}
            if ver_long else None)
    return CostTable(bs, rows, vs, hs, ds, meta, ms if members else None, long)
