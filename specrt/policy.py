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
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

__all__ = ["Budget", "PLAIN", "CostTable", "AcceptanceModel", "NodeAcceptance", "choose",
           "confidence_order", "default_menu", "width_class", "FixedPolicy", "AutoPolicy"]


@dataclass(frozen=True, order=True, slots=True)
class Budget:
    """A sequence's draft budget for one step: at most ``depth`` draft levels and ``nodes``
    rows in its verify forward (tree nodes, root included, plus auxiliary rows). ``source``:
    which member of a :class:`specrt.proposers.ProposerSet` drafts it (``-1``: the engine's
    only proposer, or the set's own fixed order)."""

    depth: int
    nodes: int
    source: int = -1

    def __post_init__(self):
        if self.depth < 0 or self.nodes < 1 or (self.depth > 0 and self.nodes < self.depth + 1) \
                or self.source < -1:
            raise ValueError(f"invalid budget depth={self.depth}, nodes={self.nodes}, "
                             f"source={self.source}")


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
    long : dict or None
        The verify grid timed again at a longer context: ``{"context": L, "base": B0, "rows":
        [...], "verify_s": [...]}`` (per batch size, like ``rows`` / ``verify_s``, which hold
        context ``B0``). :meth:`verify` then interpolates linearly in the context (attention
        reads every key once per row), extrapolating up to 3x the gap past ``L``.
    members : list or None
        For a :class:`specrt.proposers.ProposerSet`: per member, per batch size, its own
        ``[t0, a, per_level, per_node]`` (``draft`` then holds the set's plain steps). A step
        where several members draft pays ``t0 + sum over them of (a - t0_m + per_level * their
        deepest + per_node * their nodes)``.
    """

    batch_sizes: list
    rows: list
    verify_s: list
    host_s: list
    draft: list
    meta: dict = field(default_factory=dict)
    members: Optional[list] = None
    long: Optional[dict] = None

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
        lg = self.long
        if lg is not None and (len(lg.get("rows", ())) != n or len(lg.get("verify_s", ())) != n
                               or not lg.get("context", 0) > lg.get("base", 0)):
            raise ValueError("CostTable: long = {context > base, rows and verify_s per batch "
                             "size}")
        for m in self.members or ():
            if len(m) != n or any(len(d) != 4 for d in m):
                raise ValueError("CostTable: each member has [t0, a, per_level, per_node] per "
                                 "batch size")

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

    def verify(self, batch: int, rows: int, context: Optional[float] = None) -> float:
        """Target forward over ``rows`` query rows of ``batch`` sequences (with ``context``
        cached tokens each, on average, when the table has a second context)."""
        t = self._by_batch(batch, lambda i: _interp(self.rows[i], self.verify_s[i], rows))
        lg = self.long
        if context is None or not lg:
            return t
        f = (context - lg["base"]) / (lg["context"] - lg["base"])
        f = min(max(f, 0.0), 3.0)
        if f == 0.0:
            return t
        t2 = self._by_batch(batch, lambda i: _interp(lg["rows"][i], lg["verify_s"][i], rows))
        return max(t + (t2 - t) * f, 0.0)

    def host(self, batch: int) -> float:
        return self._by_batch(batch, lambda i: self.host_s[i])

    def drafting(self, batch: int, depth: int, draft_nodes: int) -> float:
        def f(i):
            t0, a, per_level, per_node = self.draft[i]
            return t0 if depth <= 0 else a + per_level * depth + per_node * draft_nodes
        return self._by_batch(batch, f)

    def draft_coef(self, batch: int, source: int = -1) -> tuple:
        """``(t0, a, per_level, per_node)`` at ``batch`` of member ``source`` (-1 or a table
        without members: ``draft``)."""
        table = self.draft if source < 0 or not self.members else self.members[source]
        return tuple(self._by_batch(batch, lambda i, k=k: table[i][k]) for k in range(4))

    def for_member(self, source: int) -> "CostTable":
        """The table as member ``source`` alone would see it (its drafting costs)."""
        if not self.members:
            return self
        return CostTable(self.batch_sizes, self.rows, self.verify_s, self.host_s,
                         self.members[source], dict(self.meta, member=source), None, self.long)

    def step(self, batch: int, depth: int, rows: int) -> float:
        """A whole verify step: host + drafting + forward (``rows`` includes the roots)."""
        return self.host(batch) + self.drafting(batch, depth, rows - batch) + self.verify(batch, rows)

    def at_batch(self, batch: int, max_rows: int, context: Optional[float] = None):
        """``(host, draft coefficients, verify times for rows 0..max_rows)`` at ``batch``
        (and ``context``, in steps of 32 tokens), cached: what :func:`choose` evaluates many
        times per step."""
        if context is not None and self.long:
            context = 32 * round(context / 32)
        else:
            context = None
        key = (batch, max_rows, context)
        cache = self.__dict__.setdefault("_at_batch", {})
        hit = cache.get(key)
        if hit is None:
            coef = list(self.draft_coef(batch))
            ver = [self.verify(batch, max(r, 1), context) for r in range(max_rows + 1)]
            hit = cache[key] = (self.host(batch), coef, ver)
        return hit

    # -- persistence ----------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "rows": [list(r) for r in self.rows],
                "verify_s": [list(v) for v in self.verify_s], "host_s": list(self.host_s),
                "draft": [list(d) for d in self.draft], "meta": dict(self.meta),
                "members": None if self.members is None else
                [[list(d) for d in m] for m in self.members],
                "long": None if self.long is None else dict(self.long)}

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(d["batch_sizes"], d["rows"], d["verify_s"], d["host_s"], d["draft"],
                   d.get("meta", {}), d.get("members"), d.get("long"))

    @classmethod
    def synthetic(cls, verify, *, host: float = 0.0, draft=(0.0, 0.0, 0.0, 0.0),
                  batch_sizes=(1,), max_rows: int = 512, members=None,
                  long_verify=None, long_context: int = 512) -> "CostTable":
        """A table from a function ``verify(batch, rows) -> seconds`` (tests, what-if);
        ``members``: per member of a proposer set, its ``(t0, a, per_level, per_node)``;
        ``long_verify``: the same at ``long_context`` (``verify`` is at 128)."""
        grid = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                       max_rows})
        rows, ver = [], []
        for b in batch_sizes:
            r = [x for x in grid if b <= x <= max(max_rows, b)]
            rows.append(r)
            ver.append([float(verify(b, x)) for x in r])
        n = len(batch_sizes)
        mem = None if members is None else [[list(m)] * n for m in members]
        long = None if long_verify is None else {
            "context": long_context, "base": 128, "rows": rows,
            "verify_s": [[float(long_verify(b, x)) for x in r] for b, r in zip(batch_sizes, rows)]}
        return cls(list(batch_sizes), rows, ver, [host] * n, [list(draft)] * n,
                   {"synthetic": True}, mem, long)


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


class NodeAcceptance:
    """Per proposer: the probability that a tree node ends up on the accepted path, from the
    proposer's own confidence in it (``DraftTree.node_logp``, ``q = exp(logp)``): verified
    nodes are counted per bin of ``q`` (``bins`` equal bins, exponentially decayed by
    ``decay`` per tree), each bin's rate shrunk towards ``q`` itself with weight
    ``prior_weight`` (a new proposer is taken at its word). Proposer-wide only: a sequence's
    own text shows in its confidences."""

    def __init__(self, bins: int = 10, prior_weight: float = 8.0, decay: float = 0.998):
        if bins < 1 or prior_weight <= 0 or not (0 < decay <= 1):
            raise ValueError("NodeAcceptance: bins >= 1, prior_weight > 0, 0 < decay <= 1")
        self.bins, self.prior_weight, self.decay = bins, prior_weight, decay
        self.reset()

    def reset(self) -> None:
        self.succ = [0.0] * self.bins
        self.trials = [0.0] * self.bins

    def _bin(self, q: float) -> int:
        return min(self.bins - 1, max(0, int(q * self.bins)))

    def prob(self, logp: float) -> float:
        q = math.exp(logp)
        b = self._bin(q)
        return (self.succ[b] + self.prior_weight * q) / (self.trials[b] + self.prior_weight)

    def observe(self, logps: Sequence[float], accepted: Sequence[bool]) -> None:
        """One verified tree: each non-root node's confidence and whether it was accepted."""
        d = self.decay
        if d < 1:
            self.succ = [x * d for x in self.succ]
            self.trials = [x * d for x in self.trials]
        for lp, hit in zip(logps, accepted):
            b = self._bin(math.exp(lp))
            self.trials[b] += 1.0
            self.succ[b] += 1.0 if hit else 0.0


def confidence_order(tree) -> list:
    """Non-root nodes of a tree with ``node_logp``, likeliest first (a node's confidence
    capped at its parent's, ties in node order): every prefix is ancestor-closed."""
    lp, par = tree.node_logp, tree.parents.tolist()
    eff = [0.0] * len(lp)
    for i in range(1, len(lp)):
        eff[i] = min(lp[i], eff[par[i]])
    return sorted(range(1, len(lp)), key=lambda i: (-eff[i], i)), eff


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


class _Drafting:
    """Drafting time of one step from the budgets picked so far, per member (``source``):
    ``t0`` when nothing drafts, else ``t0 + sum over drafting members of (a - t0_m +
    per_level * deepest + per_node * draft nodes)`` (one member: ``a + ...``, the single
    proposer's formula)."""

    __slots__ = ("t0", "coef", "deep", "nodes", "count")

    def __init__(self, t0: float, coef: dict):
        self.t0, self.coef = t0, coef
        self.deep = dict.fromkeys(coef, 0)
        self.nodes = dict.fromkeys(coef, 0.0)
        self.count = dict.fromkeys(coef, 0)

    def add(self, b: Budget, x: float, sign: int = 1) -> None:
        s = b.source
        self.count[s] += sign
        self.nodes[s] += sign * x
        if sign > 0 and b.depth > self.deep[s]:
            self.deep[s] = b.depth  # kept on removal: an upper bound the exact pass corrects

    def cost(self) -> float:
        c = self.t0
        for s, n in self.count.items():
            if n > 0:
                t0, a, per_level, per_node = self.coef[s]
                c += a - t0 + per_level * self.deep[s] + per_node * self.nodes[s]
        return c


def choose(menus: Sequence[Sequence[Budget]], gains: Sequence[Sequence[float]],
           costs: CostTable, extra: Optional[Sequence[Sequence[float]]] = None,
           drafting: bool = True, base_rows: Optional[int] = None,
           context: Optional[float] = None):
    """Budgets maximising ``sum E / step time`` for one batch.

    ``menus[i]``: sequence i's budgets (of one proposer, or of several members of a proposer
    set, told apart by ``Budget.source``); ``gains[i][k]``: expected emitted tokens under
    ``menus[i][k]`` (plain gives 1); ``extra[i][k]``: the verify rows it adds beyond the root
    (expected; default ``nodes - 1``). ``drafting=False``: the drafts exist already (their
    cost is spent; only verification counts). ``base_rows``: rows every choice has (default
    B: the roots; plus auxiliary rows). ``context``: the batch's mean cached length (verify
    costs grow with it where the table has a second context). Returns ``(chosen budgets,
    expected rate in tokens/s)``.

    Drafting cost grows with each member's deepest budget, so for every combination of depth
    caps (one per member whose cost grows per level) each sequence's budgets are reduced to
    their concave hull of extra rows vs gain, the hull steps of all sequences are taken best
    gain-per-row first, and the best prefix over all caps wins; then a coordinate ascent over
    single sequences' exact alternatives (menus of up to 512 budgets in all). Ties go to
    fewer rows.
    """
    B = len(menus)
    if B == 0:
        return [], 0.0
    if extra is None:
        extra = [[b.nodes - 1 for b in m] for m in menus]
    base = B if base_rows is None else base_rows
    base_gain = float(B)
    max_rows = base + int(math.ceil(sum(max(x, default=0) for x in extra))) + 1
    host, _, ver = costs.at_batch(B, max_rows, context)
    sources = sorted({b.source for m in menus for b in m if b.depth > 0})
    if drafting:
        t0 = costs.draft_coef(B)[0]
        coef = {s: costs.draft_coef(B, s) for s in sources}
    else:
        t0, coef = 0.0, {s: (0.0, 0.0, 0.0, 0.0) for s in sources}

    def verify(r: float) -> float:
        i = int(r)
        return ver[i] if i + 1 >= len(ver) else ver[i] + (ver[i + 1] - ver[i]) * (r - i)

    best_rate = base_gain / (host + t0 + verify(base))
    best_pick = [None] * B  # menu index per sequence, None = plain
    # depth caps: every depth (and 0: not drafting) for a member whose cost grows per level,
    # its deepest or 0 for the others (with several members: a member's fixed cost is paid
    # once, so leaving one out entirely must be tried as a whole)
    options = []
    for s in sources:
        deep = sorted({b.depth for m in menus for b in m if b.source == s and b.depth > 0})
        options.append([0, *deep] if coef[s][2] > 0 else
                       deep[-1:] if len(sources) == 1 else [0, deep[-1]])
    combos = list(itertools.product(*options))
    if len(combos) > 256:  # many costly members: caps at each one's deepest or nothing
        combos = list(itertools.product(*[sorted({0, o[-1]}) for o in options]))
    memo: dict = {}
    for combo in combos:
        cap = dict(zip(sources, combo))
        if not any(combo):
            continue
        steps = []
        for i, (menu, g, x) in enumerate(zip(menus, gains, extra)):
            key = (id(menu), tuple(g), tuple(x), combo)
            inc = memo.get(key)
            if inc is None:
                pts = [(xi, gi - 1.0, k) for k, (b, gi, xi) in enumerate(zip(menu, g, x))
                       if 0 < b.depth <= cap.get(b.source, 0) and gi > 1.0 and xi > 0]
                inc = memo[key] = _hull(pts)
            for dr, dg, k in inc:
                steps.append((-dg / dr, i, dr, dg, k))
        if not steps:
            continue
        steps.sort()
        pick = [None] * B
        rows, gain = float(base), base_gain
        draft = _Drafting(t0, coef)
        for _, i, dr, dg, k in steps:
            if pick[i] is not None:
                draft.add(menus[i][pick[i]], extra[i][pick[i]], -1)
            pick[i] = k
            draft.add(menus[i][k], extra[i][k])
            rows += dr
            gain += dg
            rate = gain / (host + draft.cost() + verify(rows))
            if rate > best_rate * (1 + 1e-12):
                best_rate = rate
                best_pick = [pick[j] for j in range(B)]
    # Coordinate ascent from the greedy choice (small problems): the hull steps treat rows as
    # divisible; one sequence's exact alternatives can still do better.
    idx = best_pick
    if sum(len(m) for m in menus) <= 512:
        idx, best_rate = _ascend(idx, menus, gains, extra, base, base_gain, host, t0, coef,
                                 verify)
    return [menus[j][idx[j]] if idx[j] is not None else PLAIN for j in range(B)], best_rate


def _ascend(idx, menus, gains, extra, base, base_gain, host, t0, coef, verify):
    """Coordinate ascent over single sequences' exact alternatives from the assignment
    ``idx`` (menu index per sequence, None = plain); each alternative is evaluated from the
    batch's totals less the sequence's own share. Returns ``(idx, exact rate)``."""
    B = len(menus)

    def totals(ks):
        g, r = base_gain, float(base)
        per = {s: [0, 0.0, []] for s in coef}  # source -> [count, nodes, depths (depth, i)]
        for i, k in enumerate(ks):
            if k is not None:
                b = menus[i][k]
                g += gains[i][k] - 1.0
                r += extra[i][k]
                p = per[b.source]
                p[0] += 1
                p[1] += extra[i][k]
                p[2].append((b.depth, i))
        for p in per.values():
            p[2] = sorted(p[2], reverse=True)[:2]  # the two deepest (one may be replaced)
        return g, r, per

    def rate(g, r, per, i=None, old=None, old_x=0.0, new=None, new_x=0.0):
        c = t0
        for s, (n, nodes, top) in per.items():
            deep = next((d for d, j in top if j != i), 0)
            if old is not None and old.source == s:
                n -= 1
                nodes -= old_x
            if new is not None and new.source == s:
                n += 1
                nodes += new_x
                deep = max(deep, new.depth)
            if n > 0:
                t0s, a, per_level, per_node = coef[s]
                c += a - t0s + per_level * deep + per_node * nodes
        return g / (host + c + verify(r))

    g, r, per = totals(idx)
    cur = rate(g, r, per)
    for _ in range(2):
        improved = False
        for i in range(B):
            k0 = idx[i]
            old = menus[i][k0] if k0 is not None else None
            old_x = extra[i][k0] if k0 is not None else 0.0
            old_g = gains[i][k0] - 1.0 if k0 is not None else 0.0
            for k in range(len(menus[i])):
                new = menus[i][k] if menus[i][k].depth > 0 else None
                kk = k if new is not None else None
                if kk == k0:
                    continue
                new_x = extra[i][k] if new is not None else 0.0
                new_g = gains[i][k] - 1.0 if new is not None else 0.0
                rr = rate(g - old_g + new_g, r - old_x + new_x, per, i, old, old_x, new, new_x)
                if rr > cur * (1 + 1e-12):
                    idx = list(idx)
                    idx[i] = kk
                    g, r, per = totals(idx)
                    cur, improved = rate(g, r, per), True
                    k0, old = kk, new
                    old_x, old_g = new_x, new_g
        if not improved:
            break
    return idx, cur


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
        ``budget_menu``), within the engine's limits. A :class:`specrt.proposers.ProposerSet`
        offers each member's budgets tagged with its ``source``: the policy then also chooses,
        per sequence and step, which member drafts, each with its own acceptance model and
        drafting costs (``costs.members``).
    acceptance : AcceptanceModel, optional
        The (first) member's model; the others get fresh ones.
    probe_every : int
        A sequence that decoded plainly this many steps in a row drafts once at depth 1.
    self_sizing : set[int]
        Sources whose proposer sizes its own trees from node confidences (EAGLE-2's
        ``total_tokens="auto"``): their trees are verified as drafted.

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
                 memory: bool = True, cheap_draft: float = 0.02, self_sizing=()):
        if PLAIN not in menu:
            menu = [PLAIN, *menu]
        self.costs = costs
        self.menu = sorted(set(menu), key=lambda b: (b.nodes, b.depth, b.source))
        self.sources = sorted({b.source for b in self.menu if b.depth > 0}) or [-1]
        if len(self.sources) > 1 and (-1 in self.sources or not costs.members
                                      or max(self.sources) >= len(costs.members)):
            raise ValueError("AutoPolicy: a menu of several sources needs every budget tagged "
                             "with its member and per-member costs (CostTable.members)")
        self._w = {b: width_class(b) for b in self.menu}
        self._max_w = {s: max(self._w[b] for b in self.menu if b.source == s or b.depth == 0)
                       for s in self.sources}
        self._max_d = {s: max(b.depth for b in self.menu if b.source == s or b.depth == 0)
                       for s in self.sources}
        self.models = {s: AcceptanceModel() for s in self.sources}
        if acceptance is not None:
            self.models[self.sources[0]] = acceptance
        self.node_models = {s: NodeAcceptance() for s in self.sources}
        self.probe_every = probe_every
        self.memory, self.cheap_draft = memory, cheap_draft
        self.self_sizing = set(self_sizing)
        self._plain_run: dict = {}
        self._probing: set = set()
        self._planned: dict = {}  # sid -> the budget plan() gave it this step
        self.context: Optional[float] = None  # the batch's mean cached length this step

    @property
    def acceptance(self) -> AcceptanceModel:
        """The acceptance model of the (first) proposer."""
        return self.models[self.sources[0]]

    def reset(self) -> None:
        """Start of an ``Engine.stream`` call: per-sequence state goes; the proposer-wide
        acceptance statistics stay unless the policy was built with ``memory=False``."""
        if not self.memory:
            for m in (*self.models.values(), *self.node_models.values()):
                m.reset()
        self._plain_run.clear()
        self._planned.clear()

    def forget(self) -> None:
        """Drop every statistic (as a freshly built policy)."""
        for m in (*self.models.values(), *self.node_models.values()):
            m.reset()
        self._plain_run.clear()
        self._planned.clear()

    def set_context(self, mean_len: Optional[float]) -> None:
        """The batch's mean cached length, set by the engine before each step: verify costs
        are read at it (a table measured at two contexts interpolates)."""
        self.context = mean_len

    def _largest(self, source: int, lim: int) -> Budget:
        return max((b for b in self.menu if b.depth <= lim and (b.source == source or
                                                                 b.depth == 0)),
                   key=lambda b: (b.depth, b.nodes))

    def plan(self, sids: Sequence[int], limits: Sequence[int]) -> list:
        """Budgets for the batch ``sids`` before drafting; ``limits[i]``: the deepest draft
        sequence i may take (tokens left, ``max_draft``). A budget's rows are counted as the
        proposer is expected to fill them (its availability per level)."""
        cheap = self._cheap_sources(len(sids))
        self._probing = set()
        if len(self.sources) == 1 and cheap:
            # Drafting the largest budget costs next to nothing (n-gram lookup, Lookahead's
            # pool, one head pass): draft it and let trim() decide on the real drafts (and
            # probe there: trim resets the count when it verifies a draft).
            out = []
            for sid, lim in zip(sids, limits):
                run = self._plain_run.get(sid, 0)
                if self.probe_every and run >= self.probe_every:
                    self._probing.add(sid)
                self._plain_run[sid] = run + 1
                out.append(self._largest(self.sources[0], lim))
            self._planned = dict(zip(sids, out))
            return out
        menus, gains, extra = [], [], []
        by_lim: dict = {}
        for sid, lim in zip(sids, limits):
            m = by_lim.get(lim)
            if m is None:
                m = by_lim[lim] = [b for b in self.menu if b.depth <= lim]
            tables = {}
            for s in self.sources:
                tables[s] = self.models[s].expected_table(sid, self._max_w[s],
                                                          min(lim, self._max_d[s]))
            g, x = [], []
            for b in m:
                if b.depth == 0:
                    g.append(1.0)
                    x.append(0.0)
                    continue
                E, R = tables[b.source]
                w = self._w[b]
                g.append(E[w][b.depth])
                x.append((b.nodes - 1) / b.depth * R[w][b.depth])
            menus.append(m)
            gains.append(g)
            extra.append(x)
        pick, _ = choose(menus, gains, self.costs, extra, context=self.context)
        out = []
        for i, (sid, lim, b) in enumerate(zip(sids, limits, pick)):
            run = self._plain_run.get(sid, 0)
            if cheap and lim > 0 and (b.depth == 0 or b.source in cheap):
                # a member whose drafting is nearly free drafts its largest budget (the one
                # expected to give most) and trim() cuts it on the real drafts
                if b.depth == 0:
                    b = max((self._largest(s, lim) for s in cheap),
                            key=lambda c: gains[i][menus[i].index(c)])
                    if self.probe_every and run >= self.probe_every:
                        self._probing.add(sid)
                    self._plain_run[sid] = run + 1
                else:
                    b = self._largest(b.source, lim)
                    self._plain_run[sid] = 0
                out.append(b)
                continue
            if b.depth == 0 and lim > 0 and self.probe_every and run >= self.probe_every:
                # probe the member that looks best at depth 1
                ones = [(g, c) for c, g in zip(menus[i], gains[i]) if c.depth == 1]
                if ones:
                    src = max(ones, key=lambda gc: gc[0])[1].source
                    b = min((c for _, c in ones if c.source == src), key=lambda c: c.nodes)
                    self._probing.add(sid)
            self._plain_run[sid] = run + 1 if b.depth == 0 else 0
            out.append(b)
        self._planned = dict(zip(sids, out))
        return out

    def _cheap_sources(self, batch: int) -> set:
        """Sources whose largest budget costs at most ``cheap_draft`` of a plain step to
        draft."""
        hit = self.__dict__.setdefault("_cheap", {}).get(batch)
        if hit is None:
            c = self.costs
            plain = c.step(batch, 0, batch)
            hit = set()
            for s in self.sources:
                top = self._largest(s, 1 << 30)
                t0, a, per_level, per_node = c.draft_coef(batch, s)
                extra = (a + per_level * top.depth + per_node * batch * (top.nodes - 1) - t0
                         if top.depth else 0.0)
                if extra <= self.cheap_draft * plain:
                    hit.add(s)
            self._cheap[batch] = hit
        return hit

    def trim(self, sids: Sequence[int], trees: Sequence, aux_rows: Sequence[int]) -> list:
        """After drafting: cut each tree to the depth that maximises the batch's rate now that
        the drafts (and their real sizes) are known; their cost is spent, only verification
        counts. A tree keeps every node down to the chosen depth (:meth:`DraftTree.truncation`).
        Returns per tree ``(tree, kept node indices or None when unchanged)``."""
        menus, gains, orders = [], [], []
        for sid, t in zip(sids, trees):
            D = t.max_depth
            src = self._planned.get(sid, PLAIN).source
            orders.append(None)
            if D == 0 or src in self.self_sizing:
                b = Budget(D, t.num_nodes, src) if D else PLAIN
                menus.append([b])
                gains.append([1.0])
                continue
            if t.node_logp is not None:
                # node by node, likeliest first: prefix n keeps the n most confident nodes
                order, eff = confidence_order(t)
                nm = self.node_models.get(src) or next(iter(self.node_models.values()))
                depths = t.depths.tolist()
                opts, g = ([] if sid in self._probing else [PLAIN]), []
                e, deep = 1.0, 0
                if opts:
                    g.append(1.0)
                for n, node in enumerate(order, 1):
                    e += nm.prob(eff[node])
                    deep = max(deep, depths[node])
                    opts.append(Budget(deep, n + 1, src))
                    g.append(e)
                menus.append(opts)
                gains.append(g)
                orders[-1] = order
                continue
            acc = self.models.get(src, self.acceptance)
            counts = [0] * (D + 1)
            for d in t.depths.tolist():
                counts[d] += 1
            # a probe is verified as drafted (at least its first level): that is its purpose
            opts, n = ([] if sid in self._probing else [PLAIN]), 1
            for d in range(1, D + 1):
                n += counts[d]
                opts.append(Budget(d, n, src))
            ws = [width_class(b) for b in opts]
            E, _ = acc.expected_table(sid, max(ws), D, drafted=True)
            menus.append(opts)
            gains.append([E[w][b.depth] for b, w in zip(opts, ws)])
        base = len(trees) + sum(aux_rows)
        pick, _ = choose(menus, gains, self.costs, drafting=False, base_rows=base,
                         context=self.context)
        B = len(trees)
        for i, (sid, b) in enumerate(zip(sids, pick)):
            if b.depth == 0 and sid in self._probing and menus[i][0].depth > 0:
                # a probe verifies its draft: the level count that costs least per token
                pick[i] = b = max(zip(menus[i], gains[i]), key=lambda bg: bg[1] / self.costs.verify(
                    B, base + bg[0].nodes - 1, self.context))[0]
            if b.depth > 0:
                self._plain_run[sid] = 0
        out = []
        for t, b, order in zip(trees, pick, orders):
            if order is not None:
                if b.nodes >= t.num_nodes:
                    out.append((t, None))
                else:
                    keep = sorted([0, *order[:b.nodes - 1]])
                    out.append((t.select(keep), keep))
            else:
                out.append(t.truncation(b.depth, b.nodes) if b.depth < t.max_depth
                           else (t, None))
        return out

    def observe(self, sid: int, b: Budget, accepted: int, drafted: Optional[int] = None,
                nodes: Optional[int] = None, verified: Optional[int] = None) -> None:
        m = self.models.get(b.source)
        if m is not None:
            m.observe(sid, b, accepted, drafted, nodes, verified)

    def observe_nodes(self, sid: int, tree, path: Sequence[int]) -> None:
        """A verified tree with confidences (``tree.node_logp``) and its accepted path (node
        indices, root first)."""
        src = self._planned.get(sid, PLAIN).source
        nm = self.node_models.get(src)
        if nm is None or tree.node_logp is None or tree.num_nodes < 2:
            return
        on = set(path)
        _, eff = confidence_order(tree)
        nm.observe(eff[1:], [i in on for i in range(1, tree.num_nodes)])

    def release(self, sid: int) -> None:
        for m in self.models.values():
            m.release(sid)
        self._plain_run.pop(sid, None)
        self._planned.pop(sid, None)
