"""Cost-aware speculation: per step, the draft budget of every sequence of the batch.

The right draft depth and tree size depend on the device (on a 2-core CPU each verify row past
about four costs time; on a GPU dozens cost about one), on the model and on the text (code
repeats itself, chat does not). :class:`AutoPolicy` decides them per step from two models:

- a **cost model** (:class:`CostTable`): verify-forward time as a function of batch size and
  total rows, the proposer's drafting time as a function of batch size, depth and draft nodes,
  and the engine's fixed per-step overhead; measured once by :mod:`specrt.calibrate` (seconds,
  cached per device, model, dtype and proposer settings) and **fixed for a run**;
- an **acceptance model** (:class:`AcceptanceModel`): per depth ``j``, the probability that
  draft ``j`` is accepted given that draft ``j - 1`` was, per proposer and per sequence, by
  tree-width class; updated online from verification results.

Per step it chooses, for every sequence, one :class:`Budget` (depth and node count) out of the
proposer's menu, maximising the batch's expected emitted tokens per second (:func:`choose`):

    rate = sum_i E_i(budget_i) / (host(B) + draft(B, max depth, draft nodes) + verify(B, rows))

with ``E_i = 1 + sum_{j<=depth} prod_{k<=j} alpha_{i,k}``. Plain decoding (``Budget(0, 1)``,
E = 1) is always on the menu, so where speculation cannot pay the policy decodes plainly (and
probes a depth-1 draft every ``probe_every`` plain steps of a sequence, to notice text that
starts to pay).

This module is pure Python: no torch, no timing. Its decisions depend only on the cost table
and the acceptance statistics, never on live timings, so a run is reproducible for a given
table (see :class:`AutoPolicy` for exactly what a sampled output depends on). Losslessness
never depends on it: every budget is verified exactly.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = ["Budget", "PLAIN", "CostTable", "AcceptanceModel", "choose", "default_menu",
           "width_class", "FixedPolicy", "AutoPolicy"]


@dataclass(frozen=True, order=True, slots=True)
class Budget:
    """A sequence's draft budget for one step: at most ``depth`` draft levels and ``nodes``
    rows in its verify forward (tree nodes, root included, plus auxiliary rows)."""

    depth: int
    nodes: int

    def __post_init__(self):
        if self.depth < 0 or self.nodes < 1 or (self.depth > 0 and self.nodes < self.depth + 1):
            raise ValueError(f"invalid budget depth={self.depth}, nodes={self.nodes}")


PLAIN = Budget(0, 1)


def width_class(b: Budget) -> int:
    """0 for a chain (``nodes <= depth + 1``), else ceil(log2(draft nodes per level)), capped
    at 6: budgets of one class share acceptance statistics."""
    if b.depth == 0 or b.nodes - 1 <= b.depth:
        return 0
    return min(6, max(1, math.ceil(math.log2((b.nodes - 1) / b.depth) - 1e-9)))


def default_menu(max_depth: int, max_nodes: int, tree: bool) -> list:
    """Budgets a proposer can honour: plain, every chain up to ``max_depth``, and, for a
    proposer that drafts trees, node counts 2x, 4x, ... of the depth up to ``max_nodes``."""
    menu = {PLAIN}
    for d in range(1, max_depth + 1):
        if d + 1 <= max_nodes:
            menu.add(Budget(d, d + 1))
        if tree:
            w = 2
            while d * w + 1 <= max_nodes:
                menu.add(Budget(d, d * w + 1))
                w *= 2
            if max_nodes > d + 1:
                menu.add(Budget(d, max_nodes))
    return sorted(menu, key=lambda b: (b.nodes, b.depth))


# ---------------------------------------------------------------------------------- costs
def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly past both ends (flat below one
    point)."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    if i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1


@dataclass
class CostTable:
    """Measured costs of one engine (seconds).

    Attributes
    ----------
    batch_sizes : list[int]
        Batch sizes of the grid, increasing.
    rows : list[list[int]]
        Per batch size, the total verify rows measured (increasing).
    verify_s : list[list[float]]
        Per batch size, the target forward time at those rows.
    host_s : list[float]
        Per batch size, the engine's per-step time outside drafting and the forward (sampling,
        rollback, host bookkeeping).
    draft : list[list[float]]
        Per batch size ``[t0, a, per_level, per_node]``: drafting time ``t0`` when every budget
        is plain, else ``a + per_level * depth + per_node * draft nodes`` (depth: the deepest
        budget of the batch; draft nodes: summed over the batch, roots excluded).
    meta : dict
        Where and how it was measured (device, model, dtype, proposer, date, command).
    """

    batch_sizes: list
    rows: list
    verify_s: list
    host_s: list
    draft: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.batch_sizes)
        if not n or any(len(x) != n for x in (self.rows, self.verify_s, self.host_s, self.draft)):
            raise ValueError("CostTable: one entry per batch size in every field")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)):
            raise ValueError("CostTable: batch sizes must be increasing")
        for r, v in zip(self.rows, self.verify_s):
            if not r or len(r) != len(v) or list(r) != sorted(set(r)):
                raise ValueError("CostTable: rows must be increasing, one time per row count")
        if any(len(d) != 4 for d in self.draft):
            raise ValueError("CostTable: draft entries are [t0, a, per_level, per_node]")

    # -- lookup ---------------------------------------------------------------------------
    def _by_batch(self, batch: int, f):
        bs = self.batch_sizes
        if batch <= bs[0]:
            return f(0)
        if batch >= bs[-1]:
            if len(bs) == 1:
                return f(0)
            # extrapolate linearly in the batch size from the last two grid points
            y0, y1 = f(len(bs) - 2), f(len(bs) - 1)
            return max(y1, y1 + (y1 - y0) * (batch - bs[-1]) / (bs[-1] - bs[-2]))
        i = bisect.bisect_left(bs, batch)
        if bs[i] == batch:
            return f(i)
        y0, y1 = f(i - 1), f(i)
        return y0 + (y1 - y0) * (batch - bs[i - 1]) / (bs[i] - bs[i - 1])

    def verify(self, batch: int, rows: int) -> float:
        """Target forward over ``rows`` query rows of ``batch`` sequences."""
        return self._by_batch(batch, lambda i: _interp(self.rows[i], self.verify_s[i], rows))

    def host(self, batch: int) -> float:
        return self._by_batch(batch, lambda i: self.host_s[i])

    def drafting(self, batch: int, depth: int, draft_nodes: int) -> float:
        def f(i):
            t0, a, per_level, per_node = self.draft[i]
            return t0 if depth <= 0 else a + per_level * depth + per_node * draft_nodes
        return self._by_batch(batch, f)

    def step(self, batch: int, depth: int, rows: int) -> float:
        """A whole verify step: host + drafting + forward (``rows`` includes the roots)."""
        return self.host(batch) + self.drafting(batch, depth, rows - batch) + self.verify(batch, rows)

    def at_batch(self, batch: int, max_rows: int):
        """``(host, draft coefficients, verify times for rows 0..max_rows)`` at ``batch``,
        cached: what :func:`choose` evaluates many times per step."""
        key = (batch, max_rows)
        cache = self.__dict__.setdefault("_at_batch", {})
        hit = cache.get(key)
        if hit is None:
            coef = [self._by_batch(batch, lambda i, k=k: self.draft[i][k]) for k in range(4)]
            ver = [self.verify(batch, max(r, 1)) for r in range(max_rows + 1)]
            hit = cache[key] = (self.host(batch), coef, ver)
        return hit

    # -- persistence ----------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "rows": [list(r) for r in self.rows],
                "verify_s": [list(v) for v in self.verify_s], "host_s": list(self.host_s),
                "draft": [list(d) for d in self.draft], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(d["batch_sizes"], d["rows"], d["verify_s"], d["host_s"], d["draft"],
                   d.get("meta", {}))

    @classmethod
    def synthetic(cls, verify, *, host: float = 0.0, draft=(0.0, 0.0, 0.0, 0.0),
                  batch_sizes=(1,), max_rows: int = 512) -> "CostTable":
        """A table from a function ``verify(batch, rows) -> seconds`` (tests, what-if)."""
        grid = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                       max_rows})
        rows, ver = [], []
        for b in batch_sizes:
            r = [x for x in grid if b <= x <= max(max_rows, b)]
            rows.append(r)
            ver.append([float(verify(b, x)) for x in r])
        n = len(batch_sizes)
        return cls(list(batch_sizes), rows, ver, [host] * n, [list(draft)] * n, {"synthetic": True})


# ----------------------------------------------------------------------------- acceptance
class _Counts:
    __slots__ = ("succ", "trials")

    def __init__(self):
        self.succ: dict = {}
        self.trials: dict = {}


class AcceptanceModel:
    """Per proposer (all its sequences) and per sequence, by tree-width class ``w`` and depth
    ``j``:

    - acceptance ``alpha[w][j] = P(draft j accepted | draft j - 1 accepted and draft j
      drafted)``, counted on the trees actually verified;
    - availability ``avail[w][j] = P(the proposer drafts level j | its budget allows it and it
      drafted level j - 1)``: an n-gram proposer with no match, a Medusa tree cut short by its
      own node budget, Lookahead without a pooled n-gram draft less than their budget, and
      rows they do not draft cost nothing.

    Every estimate is also conditioned on the sequence's last verified draft (state 1: it
    accepted at least one token, 0: it accepted none), since acceptance comes in runs: text
    that copies its context keeps copying. A sequence's estimate shrinks its own
    (exponentially decayed) counts towards the proposer-wide estimate with weight
    ``seq_weight``; the proposer-wide estimate shrinks
    towards a prior with weight ``prior_weight``: ``prior`` (acceptance) or ``prior_avail``
    for chains, and for a wider class the next narrower class's estimate lifted by ``widen`` of
    its shortfall (wider trees accept at least as often).
    """

    def __init__(self, prior: float = 0.5, prior_weight: float = 2.0, seq_weight: float = 4.0,
                 decay: float = 0.95, widen: float = 0.25, prior_avail: float = 0.9,
                 optimism: float = 0.5):
        if not (0 < prior < 1) or prior_weight <= 0 or seq_weight <= 0 or not (0 < decay <= 1) \
                or not (0 < prior_avail <= 1):
            raise ValueError("AcceptanceModel: 0 < prior < 1, 0 < prior_avail <= 1, positive "
                             "weights, 0 < decay <= 1")
        self.prior, self.prior_weight, self.seq_weight = prior, prior_weight, seq_weight
        self.decay, self.widen, self.prior_avail = decay, widen, prior_avail
        self.optimism = optimism
        self.reset()

    def reset(self) -> None:
        """Forget everything (proposer-wide and per-sequence statistics)."""
        self._all = _Counts()
        self._seq: dict = {}
        self._state: dict = {}  # sid -> 1 if its last verified draft accepted a token, else 0
        self._global: dict = {}  # (kind, w, j, state) -> proposer-wide estimate, until observe

    def release(self, sid: int) -> None:
        self._seq.pop(sid, None)
        self._state.pop(sid, None)

    def _global_est(self, kind: str, w: int, j: int, st: int = 0) -> float:
        key = (kind, w, j, st)
        g = self._global.get(key)
        if g is None:
            if w == 0:
                prior = self.prior if kind == "a" else self.prior_avail
            else:
                prior = self._global_est(kind, w - 1, j, st)
                prior += (1.0 - prior) * (self.widen if kind == "a" else 0.0)
            c = self._all
            s, t = c.succ.get(key, 0.0), c.trials.get(key, 0.0)
            g = self._global[key] = (s + self.prior_weight * prior) / (t + self.prior_weight)
        return g

    def _est(self, kind: str, sid: int, w: int, j: int) -> float:
        """The sequence's estimate, plus an exploration bonus of ``optimism`` standard errors
        that shrinks as the sequence's own observations grow (acceptance only): a few early
        misses do not stop a sequence from drafting for good."""
        st = self._state.get(sid, 0)
        g = self._global_est(kind, w, j, st)
        c = self._seq.get(sid)
        key = (kind, w, j, st)
        s, t = (0.0, 0.0) if c is None else (c.succ.get(key, 0.0), c.trials.get(key, 0.0))
        m = (s + self.seq_weight * g) / (t + self.seq_weight)
        if kind == "a" and self.optimism:
            m += self.optimism * math.sqrt(m * (1.0 - m) / (t + self.seq_weight))
        return min(m, 1.0)

    def global_alpha(self, w: int, j: int, state: int = 0) -> float:
        return self._global_est("a", w, j, state)

    def alpha(self, sid: int, w: int, j: int) -> float:
        return self._est("a", sid, w, j)

    def availability(self, sid: int, w: int, j: int) -> float:
        return self._est("v", sid, w, j)

    def expected_table(self, sid: int, max_w: int, max_depth: int, drafted: bool = False):
        """``(E, R)``: ``E[w][d]`` expected tokens emitted by one step of width class ``w``
        and depth budget ``d`` (``E[w][0] = 1``), ``R[w][d]`` the expected number of levels
        drafted. ``drafted=True``: for a tree already drafted to depth ``d`` (availability 1)."""
        E, R = [], []
        for w in range(max_w + 1):
            e, p, q, r = 1.0, 1.0, 1.0, 0.0
            er, rr = [1.0], [0.0]
            for j in range(1, max_depth + 1):
                v = 1.0 if drafted else self.availability(sid, w, j)
                q *= v
                p *= v * self.alpha(sid, w, j)
                e += p
                r += q
                er.append(e)
                rr.append(r)
            E.append(er)
            R.append(rr)
        return E, R

    def expected(self, sid: int, b: Budget) -> float:
        """Expected tokens emitted by one step under budget ``b``."""
        w = width_class(b)
        return self.expected_table(sid, w, b.depth)[0][w][b.depth]

    def observe(self, sid: int, b: Budget, accepted: int, drafted: Optional[int] = None,
                nodes: Optional[int] = None, verified: Optional[int] = None) -> None:
        """A step under budget ``b``: the proposer drafted ``drafted`` levels (availability;
        default the budget's depth), the policy verified ``verified`` of them (default all) in
        a tree of ``nodes`` nodes, and ``accepted`` drafts were accepted."""
        if b.depth <= 0 or accepted < 0:
            return
        drafted = b.depth if drafted is None else min(drafted, b.depth)
        verified = drafted if verified is None else min(verified, drafted)
        wb = width_class(b)
        wt = (width_class(Budget(verified, max(nodes or b.nodes, verified + 1)))
              if verified else 0)
        c = self._seq.get(sid)
        if c is None:
            c = self._seq[sid] = _Counts()
        d = self.decay
        if d < 1:
            for k in c.trials:
                c.trials[k] *= d
                c.succ[k] *= d
        self._global.clear()
        st = self._state.get(sid, 0)
        obs = [(("v", wb, j, st), drafted >= j) for j in range(1, min(drafted + 1, b.depth) + 1)]
        obs += [(("a", wt, j, st), accepted >= j)
                for j in range(1, min(accepted + 1, verified) + 1)]
        if verified:
            self._state[sid] = 1 if accepted >= 1 else 0
        for key, hit in obs:
            for cc in (c, self._all):
                cc.trials[key] = cc.trials.get(key, 0.0) + 1.0
                cc.succ[key] = cc.succ.get(key, 0.0) + (1.0 if hit else 0.0)


# -------------------------------------------------------------------------------- decision
def _hull(points):
    """Upper concave hull of ``(extra rows, gain, index)`` points, starting at (0, 0); returns
    its increments ``(d_rows, d_gain, index)``, in order of decreasing gain per row."""
    best: dict = {}
    for x, y, k in points:
        if x not in best or y > best[x][0]:
            best[x] = (y, k)
    hull = [(0, 0.0, -1)]
    for x in sorted(best):
        y, k = best[x]
        if y <= hull[-1][1]:
            continue
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (y1 - y0) * (x - x0) <= (y - y0) * (x1 - x0):  # hull[-1] not above the chord
                hull.pop()
            else:
                break
        hull.append((x, y, k))
    return [(x1 - x0, y1 - y0, k1) for (x0, y0, _), (x1, y1, k1) in zip(hull, hull[1:])]


def choose(menus: Sequence[Sequence[Budget]], gains: Sequence[Sequence[float]],
           costs: CostTable, extra: Optional[Sequence[Sequence[float]]] = None,
           drafting: bool = True, base_rows: Optional[int] = None):
    """Budgets maximising ``sum E / step time`` for one batch.

    ``menus[i]``: sequence i's budgets; ``gains[i][k]``: expected emitted tokens under
    ``menus[i][k]`` (plain gives 1); ``extra[i][k]``: the verify rows it adds beyond the root
    (expected; default ``nodes - 1``). ``drafting=False``: the drafts exist already (their cost
    is spent; only verification counts). ``base_rows``: rows every choice has (default B: the
    roots; plus auxiliary rows). Returns ``(chosen budgets, expected rate in tokens/s)``.

    For every depth cap D (drafting cost grows with the batch's deepest budget) each sequence's
    budgets are reduced to their concave hull of extra rows vs gain, the hull steps of all
    sequences are taken best gain-per-row first, and the best prefix over all D wins; then a
    coordinate ascent over single sequences' exact alternatives (menus of up to 512 budgets in
    all). Ties go to fewer rows.
    """
    B = len(menus)
    if B == 0:
        return [], 0.0
    if extra is None:
        extra = [[b.nodes - 1 for b in m] for m in menus]
    base = B if base_rows is None else base_rows
    base_gain = float(B)
    depths = sorted({b.depth for m in menus for b in m} | {0})
    max_rows = base + int(math.ceil(sum(max(x, default=0) for x in extra))) + 1
    host, (t0, a, per_level, per_node), ver = costs.at_batch(B, max_rows)
    if not drafting:
        t0 = a = per_level = per_node = 0.0

    def verify(r: float) -> float:
        i = int(r)
        return ver[i] if i + 1 >= len(ver) else ver[i] + (ver[i + 1] - ver[i]) * (r - i)

    best_rate = base_gain / (host + t0 + verify(base))
    best_pick = [None] * B  # menu index per sequence, None = plain
    if per_level <= 0:
        depths = depths[-1:]  # drafting cost does not grow with depth: one pass, no cap
    memo: dict = {}
    for D in depths:
        if D == 0:
            continue
        steps = []
        for i, (menu, g, x) in enumerate(zip(menus, gains, extra)):
            key = (id(menu), tuple(g), tuple(x), D)
            inc = memo.get(key)
            if inc is None:
                pts = [(xi, gi - 1.0, k) for k, (b, gi, xi) in enumerate(zip(menu, g, x))
                       if 0 < b.depth <= D and gi > 1.0 and xi > 0]
                inc = memo[key] = _hull(pts)
            for dr, dg, k in inc:
                steps.append((-dg / dr, i, dr, dg, k))
        if not steps:
            continue
        steps.sort()
        pick = [None] * B
        rows, gain, deep = float(base), base_gain, 0
        for _, i, dr, dg, k in steps:
            pick[i] = k
            rows += dr
            gain += dg
            deep = max(deep, menus[i][k].depth)
            rate = gain / (host + a + per_level * deep + per_node * (rows - base) + verify(rows))
            if rate > best_rate * (1 + 1e-12):
                best_rate = rate
                best_pick = [pick[j] for j in range(B)]
    # Coordinate ascent from the greedy choice (small problems): the hull steps treat rows as
    # divisible; one sequence's exact alternatives can still do better.
    idx = best_pick
    if sum(len(m) for m in menus) <= 512:
        def state_rate(ks):
            g, r, dp = base_gain, float(base), 0
            for i, k in enumerate(ks):
                if k is not None:
                    g += gains[i][k] - 1.0
                    r += extra[i][k]
                    dp = max(dp, menus[i][k].depth)
            if dp == 0:
                return g / (host + t0 + verify(r))
            return g / (host + a + per_level * dp + per_node * (r - base) + verify(r))
        cur = state_rate(idx)
        for _ in range(2):
            improved = False
            for i in range(B):
                for k in range(len(menus[i])):
                    trial = list(idx)
                    trial[i] = k if menus[i][k].depth > 0 else None
                    if trial[i] == idx[i]:
                        continue
                    r = state_rate(trial)
                    if r > cur * (1 + 1e-12):
                        idx, cur, improved = trial, r, True
            if not improved:
                break
        best_rate = max(best_rate, cur)
    return [menus[j][idx[j]] if idx[j] is not None else PLAIN for j in range(B)], best_rate


# -------------------------------------------------------------------------------- policies
class FixedPolicy:
    """Every sequence drafts with the engine's limits (``max_draft``, ``max_tree_nodes``) and
    the proposer's own settings, every step: the behaviour before cost-aware speculation."""

    name = "fixed"

    def __init__(self, max_draft: int, max_nodes: int):
        self.max_draft, self.max_nodes = max_draft, max_nodes

    def reset(self) -> None:
        pass

    def plan(self, sids: Sequence[int], limits: Sequence[int]) -> list:
        # a tree of depth d has at least d + 1 nodes: the node limit caps the depth too
        return [Budget(min(d, self.max_nodes - 1), self.max_nodes) for d in limits]

    def trim(self, sids, trees, aux_rows) -> list:
        return [(t, None) for t in trees]

    def observe(self, sid: int, b: Budget, accepted: int, drafted: Optional[int] = None,
                nodes: Optional[int] = None, verified: Optional[int] = None) -> None:
        pass

    def release(self, sid: int) -> None:
        pass


class AutoPolicy:
    """Cost-aware budgets (module docstring).

    Parameters
    ----------
    costs : CostTable
        Fixed for the run.
    menu : list[Budget]
        The budgets the proposer offers (from :func:`default_menu` or the proposer's
        ``budget_menu``), within the engine's limits.
    acceptance : AcceptanceModel, optional
    probe_every : int
        A sequence that decoded plainly this many steps in a row drafts once at depth 1.

    Reproducibility: a sampled request's tokens (fixed seed) depend on the trees it was
    verified with, hence on this policy's choices: on the cost table (cached per device, model,
    dtype and proposer settings; a recalibration may change it) and on the acceptance
    statistics of the run (its own steps and, through the proposer-wide estimate, those of the
    requests it ran with). The statistics are reset at the start of every ``Engine.stream``
    call, so the same requests on the same engine give the same tokens; no decision reads a
    clock.
    """

    name = "auto"

    def __init__(self, costs: CostTable, menu: Sequence[Budget],
                 acceptance: Optional[AcceptanceModel] = None, probe_every: int = 16,
                 memory: bool = True, cheap_draft: float = 0.02):
        if PLAIN not in menu:
            menu = [PLAIN, *menu]
        self.costs = costs
        self.menu = sorted(set(menu), key=lambda b: (b.nodes, b.depth))
        self._w = {b: width_class(b) for b in self.menu}
        self._max_w = max(self._w.values())
        self._max_d = max(b.depth for b in self.menu)
        self.acceptance = acceptance or AcceptanceModel()
        self.probe_every = probe_every
        self.memory, self.cheap_draft = memory, cheap_draft
        self._plain_run: dict = {}
        self._probing: set = set()

    def reset(self) -> None:
        """Start of an ``Engine.stream`` call: per-sequence state goes; the proposer-wide
        acceptance statistics stay unless the policy was built with ``memory=False``."""
        if not self.memory:
            self.acceptance.reset()
        self._plain_run.clear()

    def forget(self) -> None:
        """Drop every statistic (as a freshly built policy)."""
        self.acceptance.reset()
        self._plain_run.clear()

    def plan(self, sids: Sequence[int], limits: Sequence[int]) -> list:
        """Budgets for the batch ``sids`` before drafting; ``limits[i]``: the deepest draft
        sequence i may take (tokens left, ``max_draft``). A budget's rows are counted as the
        proposer is expected to fill them (its availability per level)."""
        acc = self.acceptance
        if self._drafting_is_cheap(len(sids)):
            # Drafting the largest budget costs next to nothing (n-gram lookup, Lookahead's
            # pool, one head pass): draft it and let trim() decide on the real drafts (and
            # probe there: trim resets the count when it verifies a draft).
            self._probing = set()
            for sid in sids:
                run = self._plain_run.get(sid, 0)
                if self.probe_every and run >= self.probe_every:
                    self._probing.add(sid)
                self._plain_run[sid] = run + 1
            return [max((b for b in self.menu if b.depth <= lim), key=lambda b: (b.depth, b.nodes))
                    for lim in limits]
        menus, gains, extra = [], [], []
        by_lim: dict = {}
        for sid, lim in zip(sids, limits):
            m = by_lim.get(lim)
            if m is None:
                m = by_lim[lim] = [b for b in self.menu if b.depth <= lim]
            E, R = acc.expected_table(sid, self._max_w, min(lim, self._max_d))
            menus.append(m)
            gains.append([E[self._w[b]][b.depth] for b in m])
            extra.append([(b.nodes - 1) / b.depth * R[self._w[b]][b.depth] if b.depth else 0.0
                          for b in m])
        pick, _ = choose(menus, gains, self.costs, extra)
        out = []
        self._probing = set()
        for sid, lim, b in zip(sids, limits, pick):
            run = self._plain_run.get(sid, 0)
            if b.depth == 0 and lim > 0 and self.probe_every and run >= self.probe_every:
                b = min((x for x in self.menu if x.depth == 1), default=b, key=lambda x: x.nodes)
                self._probing.add(sid)
            self._plain_run[sid] = run + 1 if b.depth == 0 else 0
            out.append(b)
        return out

    def _drafting_is_cheap(self, batch: int) -> bool:
        hit = self.__dict__.setdefault("_cheap", {}).get(batch)
        if hit is None:
            c = self.costs
            plain = c.step(batch, 0, batch)
            top = max(self.menu, key=lambda b: (b.depth, b.nodes))
            extra = c.drafting(batch, top.depth, batch * (top.nodes - 1)) - c.drafting(batch, 0, 0)
            hit = self._cheap[batch] = extra <= self.cheap_draft * plain
        return hit

    def trim(self, sids: Sequence[int], trees: Sequence, aux_rows: Sequence[int]) -> list:
        """After drafting: cut each tree to the depth that maximises the batch's rate now that
        the drafts (and their real sizes) are known; their cost is spent, only verification
        counts. A tree keeps every node down to the chosen depth (:meth:`DraftTree.truncation`).
        Returns per tree ``(tree, kept node indices or None when unchanged)``."""
        acc = self.acceptance
        menus, gains = [], []
        for sid, t in zip(sids, trees):
            D = t.max_depth
            if D == 0:
                menus.append([PLAIN])
                gains.append([1.0])
                continue
            counts = [0] * (D + 1)
            for d in t.depths.tolist():
                counts[d] += 1
            # a probe is verified as drafted (at least its first level): that is its purpose
            opts, n = ([] if sid in self._probing else [PLAIN]), 1
            for d in range(1, D + 1):
                n += counts[d]
                opts.append(Budget(d, n))
            ws = [width_class(b) for b in opts]
            E, _ = acc.expected_table(sid, max(ws), D, drafted=True)
            menus.append(opts)
            gains.append([E[w][b.depth] for b, w in zip(opts, ws)])
        base = len(trees) + sum(aux_rows)
        pick, _ = choose(menus, gains, self.costs, drafting=False, base_rows=base)
        B = len(trees)
        for i, (sid, b) in enumerate(zip(sids, pick)):
            if b.depth == 0 and sid in self._probing and menus[i][0].depth > 0:
                # a probe verifies its draft: the level count that costs least per token
                pick[i] = b = max(zip(menus[i], gains[i]), key=lambda bg: bg[1] / self.costs.verify(
                    B, base + bg[0].nodes - 1))[0]
            if b.depth > 0:
                self._plain_run[sid] = 0
        return [t.truncation(b.depth, b.nodes) if b.depth < t.max_depth else (t, None)
                for t, b in zip(trees, pick)]

    def observe(self, sid: int, b: Budget, accepted: int, drafted: Optional[int] = None,
                nodes: Optional[int] = None, verified: Optional[int] = None) -> None:
        self.acceptance.observe(sid, b, accepted, drafted, nodes, verified)

    def release(self, sid: int) -> None:
        self.acceptance.release(sid)
        self._plain_run.pop(sid, None)
