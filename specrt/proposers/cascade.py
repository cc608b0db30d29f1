"""Cascade speculative drafting (Chen et al. 2023) as composition of existing proposers.

- **Horizontal** (:class:`HorizontalCascade`): the first, likely draft positions come from a
  strong proposer (draft model, Medusa, EAGLE), the later, unlikely ones from a cheap one: the
  strong proposer drafts up to ``strong_depth`` tokens, then the cheap proposer's
  side-effect-free continuation (``NgramProposer.continuation``) extends its chain, or the
  leaves of its tree, towards the step's ``max_draft``. A strong chain that carries draft
  probabilities (a sampled draft model) keeps them for its own part; each cheap token gets a
  one-hot row at itself (it is a deterministic function of the prefix), so the whole chain
  verifies exactly by the op's draft-probability rule.
- **Vertical** (:func:`vertical_cascade`): the cheap proposer drafts *for* the draft model
  inside its autoregressive loop (``AutoregressiveDrafter`` with ``inner``): the same drafts
  with fewer draft forwards.

Both compose: ``HorizontalCascade(vertical_cascade(draft, NgramProposer()), NgramProposer(),
2)`` is the full cascade of the paper. :func:`from_spec` builds one from a CLI string.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from ..tree import DraftTree
from .base import Proposer

__all__ = ["HorizontalCascade", "vertical_cascade", "from_spec", "SPEC_HELP"]

SPEC_HELP = ("STRONG[@D]+ngram: medusa+ngram, eagle+ngram (horizontal: the strong proposer's "
             "first D levels, default its own depth, then n-gram); draft+ngram, "
             "self-spec+ngram (vertical: n-gram drafts inside the draft's loop); draft@D+ngram "
             "(both)")


def _own_depth(p) -> Optional[int]:
    """Deepest level a proposer drafts by itself, when it says (None: any)."""
    if hasattr(p, "k_max"):  # draft model / self-spec
        return p.k_max
    heads = getattr(p, "heads", None)
    if heads is not None and hasattr(heads, "num_heads"):  # Medusa
        return heads.num_heads
    d = getattr(p, "max_depth", None)  # EAGLE, cascades
    return d if isinstance(d, int) else None


def _need_continuation(p, role: str) -> None:
    if not callable(getattr(p, "continuation", None)):
        raise ValueError(f"the {role} proposer {getattr(p, 'name', p)!r} has no side-effect-free "
                         "continuation(seq_id, tokens, committed_len, depth) (NgramProposer has)")


def vertical_cascade(drafter, inner):
    """The draft model ``drafter`` (an ``AutoregressiveDrafter``: draft model or self-spec)
    drafted by ``inner`` inside its own loop; returns ``drafter`` itself, now cascaded.

    The drafts (tokens and probabilities) are those of ``drafter`` alone; only the number of
    draft forwards drops (``drafter.forwards_saved``, ``drafter.stats``). Refused for
    ``tree_width > 1`` drafters (greedy trees are drafted level by level).
    """
    from .draft_model import AutoregressiveDrafter

    if not isinstance(drafter, AutoregressiveDrafter):
        raise ValueError(f"a vertical cascade needs an autoregressive drafter (draft model, "
                         f"self-spec), got {getattr(drafter, 'name', drafter)!r}")
    _need_continuation(inner, "inner")
    drafter.set_inner(inner)
    drafter.name = f"{drafter.name}+{inner.name}"
    return drafter


class HorizontalCascade(Proposer):
    """Strong proposer for the first ``strong_depth`` levels, cheap continuation after.

    Parameters
    ----------
    strong : Proposer
        Any proposer (chains with or without draft probabilities, or trees).
    cheap : Proposer
        A proposer with ``continuation(seq_id, tokens, committed_len, depth)`` (``NgramProposer``).
    strong_depth : int
        Levels drafted by ``strong`` (``1 <= strong_depth``, at most the strong proposer's own
        depth where it has one).
    tail : int, optional
        Most cheap tokens after one strong leaf (default ``cheap.k``, else 4); each tail also
        stops at the step's ``max_draft``.
    tail_nodes : int, optional
        Cheap nodes per tree in all (default ``tail``: one full tail; on a CPU every verified
        node costs, on a GPU more are nearly free). Leaves get tails in order: the leaf of the
        tree's first chain (the one verification tries first), then the other leaves in node
        order, while the budget lasts.
    tail_min_n : int, optional
        Shortest n-gram match that earns a tail (``continuation(..., min_n=)``); default the
        cheap proposer's own. A unigram match nearly always exists and is rarely right: each
        tail node it adds is verified, and paid for, anyway.

    Attributes
    ----------
    stats : dict
        ``steps`` (sequence-steps), ``tail_steps`` (sequence-steps whose tree had a cheap
        tail), ``tail_nodes`` (cheap nodes proposed), ``tail_accepted`` (cheap tokens accepted).

    Notes
    -----
    ``commit`` forwards to ``strong`` the accepted path clamped to its own nodes (the tail
    nodes are numbered after all of the strong tree's, so that part is a prefix), with
    ``num_accepted`` its length - 1; ``emitted`` and the target's hidden states stay those of
    the whole accepted path (Medusa reads the last one, EAGLE every one: they track the
    sequence, not the tree). ``cheap`` gets the results unchanged.
    """

    def __init__(self, strong: Proposer, cheap: Proposer, strong_depth: int,
                 tail: Optional[int] = None, tail_nodes: Optional[int] = None,
                 tail_min_n: Optional[int] = None):
        if not isinstance(strong_depth, int) or isinstance(strong_depth, bool) or strong_depth < 1:
            raise ValueError(f"strong_depth must be an integer >= 1, got {strong_depth!r}")
        own = _own_depth(strong)
        if own is not None and strong_depth > own:
            raise ValueError(f"strong_depth {strong_depth} is deeper than the strong proposer "
                             f"{strong.name!r} drafts ({own})")
        _need_continuation(cheap, "cheap")
        if getattr(strong, "uses_aux_rows", False):
            raise ValueError(f"proposer {strong.name!r} adds auxiliary verify rows: not "
                             "supported as the strong part of a cascade")
        tail = tail if tail is not None else getattr(cheap, "k", 4)
        if tail < 1:
            raise ValueError(f"tail must be >= 1, got {tail}")
        tail_nodes = tail if tail_nodes is None else tail_nodes
        if tail_nodes < 1:
            raise ValueError(f"tail_nodes must be >= 1, got {tail_nodes}")
        if tail_min_n is not None and tail_min_n < 1:
            raise ValueError(f"tail_min_n must be >= 1, got {tail_min_n}")
        self.tail_min_n = tail_min_n
        self.strong, self.cheap = strong, cheap
        self.strong_depth, self.tail, self.tail_nodes = strong_depth, tail, tail_nodes
        self.name = f"{strong.name}@{strong_depth}+{cheap.name}"
        self.needs_hidden = strong.needs_hidden
        self.hidden_layers = tuple(strong.hidden_layers)
        self.prompt_hidden = strong.prompt_hidden
        limit = getattr(strong, "max_nodes", None)
        if limit is not None:
            self.max_nodes = limit + tail_nodes
        self._sizes: dict = {}  # seq_id -> node count of the strong tree this step
        self.stats = {"steps": 0, "tail_steps": 0, "tail_nodes": 0, "tail_accepted": 0}

    @property
    def max_depth(self) -> int:
        """Deepest level drafted: ``strong_depth + tail`` (the CLI's default ``max_draft``)."""
        return self.strong_depth + self.tail

    # -- lifecycle: both parts ----------------------------------------------------------------
    def attach(self, model, cache) -> None:
        self.strong.attach(model, cache)
        self.cheap.attach(model, cache)

    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        if self.strong.needs_hidden:
            self.strong.add(seq, hidden=hidden, aux_hidden=aux_hidden)
        else:
            self.strong.add(seq)
        self.cheap.add(seq)

    def release(self, seq_id: int) -> None:
        self._sizes.pop(seq_id, None)
        self.strong.release(seq_id)
        self.cheap.release(seq_id)

    def _strong_views(self, seqs):
        return [dataclasses.replace(s, max_draft=min(s.max_draft, self.strong_depth)) for s in seqs]

    @property
    def drafts_trees(self) -> bool:
        return self.strong.drafts_trees

    # -- drafting -----------------------------------------------------------------------------
    def propose(self, seqs):
        trees = self.strong.propose(self._strong_views(seqs))
        return [self._extend(s, t) for s, t in zip(seqs, trees)]

    def _leaves(self, tree: DraftTree) -> list:
        """Leaves in tail order: the first chain's leaf, then the others by node index."""
        if tree.is_chain:
            return [tree.num_nodes - 1]
        kids = [tree.children(i) for i in range(tree.num_nodes)]
        first = 0
        while kids[first]:
            first = kids[first][0]
        return [first] + [i for i in range(tree.num_nodes) if not kids[i] and i != first]

    def _extend(self, seq, tree: DraftTree) -> DraftTree:
        sid = seq.seq_id
        self._sizes[sid] = tree.num_nodes
        self.stats["steps"] += 1
        toks = tree.tokens.tolist()
        parents = tree.parents.tolist()
        depths = tree.depths.tolist()
        budget = min(self.tail_nodes, seq.max_nodes - tree.num_nodes)
        added = 0
        for leaf in self._leaves(tree):
            room = min(self.tail, seq.max_draft - depths[leaf], budget)
            if room < 1:
                continue
            path = tree.path_to(leaf)
            ctx = seq.token_ids + [toks[n] for n in path[1:]]
            if self.tail_min_n is None:
                ext = self.cheap.continuation(sid, ctx, seq.committed_len, room)
            else:
                ext = self.cheap.continuation(sid, ctx, seq.committed_len, room,
                                              min_n=self.tail_min_n)
            at = leaf
            for t in ext[:room]:
                toks.append(int(t))
                parents.append(at)
                at = len(toks) - 1
            budget -= len(ext[:room])
            added += len(ext[:room])
            if tree.is_chain or budget < 1:
                break
        if not added:
            return tree
        self.stats["tail_steps"] += 1
        self.stats["tail_nodes"] += added
        if tree.draft_probs is None:
            return DraftTree(toks, parents)
        # A chain with the strong part's q: its rows up to the old leaf, then one-hot rows
        # at each cheap token (the distribution a deterministic draft is "drawn" from).
        q = tree.draft_probs[:tree.num_nodes - 1]
        q = torch.cat([q, _one_hot_rows(toks[tree.num_nodes:], q)])
        return DraftTree.chain(toks[0], toks[1:], draft_probs=q)

    # -- commit: each part sees its own share --------------------------------------------------
    def commit(self, seqs, results) -> None:
        strong_res = []
        for s, r in zip(seqs, results):
            n = self._sizes.pop(s.seq_id, None)
            if n is None or r.num_accepted < 0:
                strong_res.append(r)
                continue
            own = [j for j in r.path if j < n]  # a prefix: tail nodes come after the tree's
            self.stats["tail_accepted"] += len(r.path) - len(own)
            strong_res.append(dataclasses.replace(r, path=own, num_accepted=len(own) - 1))
        self.strong.commit(self._strong_views(seqs), strong_res)
        self.cheap.commit(seqs, results)


def _one_hot_rows(tokens: list, like: torch.Tensor) -> torch.Tensor:
    """float [len(tokens), V] on ``like``'s device: row ``j`` one-hot at ``tokens[j]``."""
    vocab = like.shape[1]
    if max(tokens) >= vocab:
        raise ValueError(f"cheap draft token {max(tokens)} is outside the draft probabilities' "
                         f"vocabulary ({vocab})")
    rows = torch.zeros(len(tokens), vocab, dtype=like.dtype, device=like.device)
    rows[torch.arange(len(tokens), device=like.device),
         torch.tensor(tokens, dtype=torch.long, device=like.device)] = 1.0
    return rows


# STRONG may carry the caller's own options after colons (bench/e2e.py's "medusa:16").
_SPEC = re.compile(r"^(?P<strong>[a-z][a-z-]*)(?P<opts>(?::[a-z0-9.]+)*)(?:@(?P<depth>\d+))?"
                   r"\+(?P<cheap>[a-z][a-z-]*)$")


def from_spec(spec: str, make: Callable[[str], Proposer]) -> Proposer:
    """A cascade from a CLI string (:data:`SPEC_HELP`); ``make(name)`` builds one part by its
    proposer name (``proposers.create``'s names).

    ``medusa+ngram`` / ``eagle+ngram``: horizontal, the strong part's own depth then n-gram;
    ``medusa@2+ngram``: strong depth 2. ``draft+ngram`` / ``self-spec+ngram``: vertical.
    ``draft@2+ngram``: vertical, then horizontal after depth 2 (n-gram in both roles).
    """
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"bad cascade spec {spec!r}: expected {SPEC_HELP}")
    strong, cheap, depth = m["strong"], m["cheap"], m["depth"]
    if cheap != "ngram":
        raise ValueError(f"cascade spec {spec!r}: the cheap part must be 'ngram' (the proposer "
                         "with a side-effect-free continuation)")
    if strong not in ("medusa", "eagle", "draft", "self-spec", "layer-skip"):
        raise ValueError(f"cascade spec {spec!r}: unknown strong proposer {strong!r} (medusa, "
                         "eagle, draft, self-spec)")
    if depth is not None and int(depth) < 1:
        raise ValueError(f"cascade spec {spec!r}: strong depth must be >= 1")
    if strong in ("draft", "self-spec", "layer-skip"):
        p = vertical_cascade(make(strong + m["opts"]), make(cheap))
        return p if depth is None else HorizontalCascade(p, make(cheap), int(depth))
    p = make(strong + m["opts"])
    own = _own_depth(p)
    return HorizontalCascade(p, make(cheap), int(depth) if depth is not None else own or 4)
