"""Several proposers at once: per step and per sequence, one member drafts.

Text changes character within a request and across a batch: code that copies its context is
drafted best by n-gram lookup (nearly free), free prose by a trained head (Medusa, EAGLE,
MTP). :class:`ProposerSet` holds several proposers behind the one ``Proposer`` interface; the
engine's policy picks the member per sequence and step through the budget's ``source``
(:class:`specrt.policy.Budget`), each member with its own acceptance statistics and its own
calibrated drafting costs. Under ``policy="fixed"`` (budgets without a source) the members are
tried in order and the first that drafts anything wins: ``ngram|eagle`` drafts by lookup where
the text has a match and by the head elsewhere.

Every member sees every sequence and every step: ``add``, ``release``, ``propose`` (with a
zero budget where it does not draft: what it does on a plain step of the auto policy) and
``commit``, so each keeps its state (n-gram index, head caches, the last hidden state) in step
with the sequence whether or not it drafted. A member that did not draft a step gets it as its
own tree, the root alone, with nothing of it accepted and every emitted token (and hidden
state) after it: the view a cascade's strong part gets of its tail's tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..tree import DraftTree
from .base import NoProposer, Proposer

__all__ = ["ProposerSet"]


class ProposerSet(Proposer):
    """Members ``members`` (two or more proposers, distinct names); member ``k`` drafts the
    sequences whose view has ``source == k``; ``source == -1``: the members in order, the
    first with a draft.

    Per-request ``draft_options`` are keyed by member name (``{"lookahead": {"window":
    4}}``). ``stats[name]``: ``drafted`` (sequence-steps it drafted), ``accepted`` (its tokens
    accepted).
    """

    def __init__(self, members: Sequence[Proposer]):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"a proposer set needs two or more members, got {len(members)}")
        for m in members:
            if not isinstance(m, Proposer) or isinstance(m, (NoProposer, ProposerSet)):
                raise ValueError(f"a proposer set's members are drafting proposers, got "
                                 f"{getattr(m, 'name', m)!r}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"a proposer set's members need distinct names, got {names}")
        self.members = members
        self.name = "|".join(names)
        self.needs_hidden = any(m.needs_hidden for m in members)
        self.hidden_layers = tuple(sorted({l for m in members for l in m.hidden_layers}))
        self.prompt_hidden = ("all" if any(m.needs_hidden and m.prompt_hidden == "all"
                                           for m in members) else "last")
        self.uses_aux_rows = any(m.uses_aux_rows for m in members)
        self.drafts_trees = any(m.drafts_trees for m in members)
        limits = [getattr(m, "max_nodes", None) for m in members]
        if all(isinstance(x, int) for x in limits):
            self.max_nodes = max(limits)
        self.stats = {n: {"drafted": 0, "accepted": 0} for n in names}
        self._by: dict = {}  # seq_id -> (member whose tree is verified this step or -1, its depth)
        self._calls: dict = {}  # member -> its views of this step's propose

    # -- what the engine reads ------------------------------------------------------------
    @property
    def max_depth(self) -> Optional[int]:
        from .cascade import _own_depth

        own = [_own_depth(m) for m in self.members]
        return None if any(d is None for d in own) else max(own)

    @property
    def wants_costs(self) -> bool:
        return any(getattr(m, "wants_costs", False) for m in self.members)

    def budget_menu(self, max_depth: int, max_nodes: int) -> list:
        """Plain decoding and every member's own menu, tagged with the member's index."""
        from ..policy import PLAIN

        menu = {PLAIN}
        for k, m in enumerate(self.members):
            for b in m.budget_menu(max_depth, max_nodes):
                if b.depth > 0:
                    menu.add(dataclasses.replace(b, source=k))
        return sorted(menu, key=lambda b: (b.nodes, b.depth, b.source))

    def cost_signature(self) -> dict:
        from ..calibrate import proposer_signature

        return {"name": self.name, "class": type(self).__name__,
                "members": [proposer_signature(m) for m in self.members]}

    def set_costs(self, costs) -> None:
        for k, m in enumerate(self.members):
            m.set_costs(costs.for_member(k))

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, model, cache) -> None:
        for m in self.members:
            m.attach(model, cache)

    def _view(self, m: Proposer, seq, **kw):
        return dataclasses.replace(seq, options=seq.options.get(m.name) or {}, **kw)

    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        for m in self.members:
            v = self._view(m, seq)
            if not m.needs_hidden:
                m.add(v)
                continue
            h, aux = hidden, {l: x for l, x in (aux_hidden or {}).items()
                              if l in m.hidden_layers}
            if h is not None and m.prompt_hidden != "all" and self.prompt_hidden == "all":
                h, aux = h[-1:], {l: x[-1:] for l, x in aux.items()}
            m.add(v, hidden=h, aux_hidden=aux)

    def release(self, seq_id: int) -> None:
        self._by.pop(seq_id, None)
        for m in self.members:
            m.release(seq_id)

    def check_options(self, options: dict, max_tree_nodes: int) -> None:
        names = {m.name: m for m in self.members}
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"proposer set {self.name!r}: draft_options are keyed by member "
                             f"name ({sorted(names)}), got {unknown}")
        for name, opts in options.items():
            if not isinstance(opts, dict):
                raise ValueError(f"draft_options[{name!r}] must be a dict")
        for m in self.members:
            m.check_options(dict(options.get(m.name) or {}), max_tree_nodes)

    # -- drafting --------------------------------------------------------------------------
    def propose(self, seqs):
        n, M = len(seqs), len(self.members)
        trees: list = [None] * n
        by = [-1] * n
        for s in seqs:
            if s.source >= M:
                raise ValueError(f"budget source {s.source} names no member of {self.name!r}")
        want = [s.max_draft > 0 and s.max_nodes > 1 for s in seqs]
        self._calls = {}
        for k, m in enumerate(self.members):
            # Every member proposes for every sequence every step (a zero budget where it
            # does not draft): a proposer's per-step state (what it drafted, its caches'
            # catch-up) always describes the step it is committed.
            mine = [want[i] and trees[i] is None and seqs[i].source in (k, -1)
                    for i in range(n)]
            views = [self._view(m, s) if mine[i] else self._view(m, s, max_draft=0, max_nodes=1)
                     for i, s in enumerate(seqs)]
            out = m.propose(views)
            self._calls[k] = views
            for i, t in enumerate(out):
                if mine[i] and (seqs[i].source == k or t.max_depth > 0):
                    trees[i], by[i] = t, k
        for i, s in enumerate(seqs):
            if trees[i] is None:
                trees[i] = DraftTree.single(s.token_ids[-1])
            self._by[s.seq_id] = (by[i], trees[i].max_depth)
        return trees

    def aux_rows(self, seqs):
        out = [None] * len(seqs)
        for k, views in self._calls.items():
            m = self.members[k]
            if not m.uses_aux_rows:
                continue
            for i, a in enumerate(m.aux_rows(views)):
                if self._by.get(seqs[i].seq_id, (-1, 0))[0] == k:
                    out[i] = a
        return out

    def commit(self, seqs, results) -> None:
        by = [self._by.get(s.seq_id, (-1, 0)) for s in seqs]
        for k, m in enumerate(self.members):
            views = [self._view(m, s) for s in seqs]
            res = []
            for (b, depth), r in zip(by, results):
                if r.aux_hidden and set(r.aux_hidden) != set(m.hidden_layers):
                    r = dataclasses.replace(r, aux_hidden={
                        l: x for l, x in r.aux_hidden.items() if l in m.hidden_layers} or None)
                if b == k:
                    if depth > 0:
                        st = self.stats[m.name]
                        st["drafted"] += 1
                        st["accepted"] += max(r.num_accepted, 0)
                    res.append(r)
                elif r.num_accepted < 0:
                    res.append(r)
                else:  # not its tree: its root alone, every emitted token after it
                    res.append(dataclasses.replace(r, path=[0], num_accepted=0,
                                                   aux_tokens=None))
            m.commit(views, res)
