"""The proposer interface: every drafting method (draft model, n-gram, layer skip, Medusa,
EAGLE, MTP, Lookahead) sits behind these two calls, and the engine knows nothing else of it.

A proposer never touches CUDA directly; it may run models and specrt ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..tree import DraftTree


@dataclass(slots=True)
class SeqView:
    """What a proposer may read of one running sequence.

    Attributes
    ----------
    seq_id : int
    token_ids : list[int]
        Prompt followed by every emitted token; the last one is the root of the next tree.
    num_prompt_tokens : int
    committed_len : int
        Target-cache positions already holding K/V (``len(token_ids) - 1``).
    temperature, top_k, top_p : sampling parameters the target will verify with.
    seed : int
        Per-request Philox seed (a proposer that samples uses it with its own offsets).
    step : int
        Verify steps this sequence has run (a fresh Philox offset per step).
    max_draft : int
        Largest number of draft tokens (depth) the engine will accept for it this step: the
        depth of the step's budget (:mod:`specrt.policy`).
    options : dict
        The request's ``draft_options``.
    max_nodes : int
        The step's node budget: tree nodes (root included) plus auxiliary rows. Every proposer
        honours it (a tree cut with :meth:`DraftTree.truncated` does); at most the engine's
        ``max_tree_nodes``.
    source : int
        The step's budget source (:class:`specrt.policy.Budget`): which member of a
        :class:`~specrt.proposers.ProposerSet` drafts (-1: the set's own order); a single
        proposer ignores it.
    """

    seq_id: int
    token_ids: list
    num_prompt_tokens: int
    committed_len: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int
    max_draft: int
    options: dict = field(default_factory=dict)
    max_nodes: int = 1 << 30
    source: int = -1


@dataclass(frozen=True, slots=True)
class AuxRows:
    """Auxiliary query rows a proposer adds to one sequence's verify forward (Lookahead's
    Jacobi window). They are computed in the same target forward as the draft tree, their
    greedy predictions come back in :attr:`StepResult.aux_tokens`, and their K/V never become
    part of the sequence: they sit in cache slots past the tree's, which the step's rollback
    and trim leave outside the committed length.

    Attributes
    ----------
    tokens : tuple[int]
        Input token of each row.
    offsets : tuple[int]
        Position of each row relative to the root (the root sits at ``committed_len``, offset
        0); ``>= 1``.
    sees : tuple[int]
        Per row, a bitset over the aux rows it attends to (bit ``a`` = row ``a``); it must
        include the row itself and only earlier rows. Every aux row also sees the committed
        cache and the tree's root, and no other tree node.
    """

    tokens: tuple
    offsets: tuple
    sees: tuple

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.offsets) != n or len(self.sees) != n:
            raise ValueError(f"AuxRows: {n} tokens, {len(self.offsets)} offsets, "
                             f"{len(self.sees)} visibility rows")
        for a, (o, m) in enumerate(zip(self.offsets, self.sees)):
            if o < 1:
                raise ValueError(f"AuxRows: offset {o} of row {a} is not after the root")
            if not (m >> a) & 1 or m >> (a + 1) or m < 0:
                raise ValueError(f"AuxRows: row {a} must see itself and only earlier rows")

    @property
    def num_rows(self) -> int:
        return len(self.tokens)


@dataclass(slots=True)
class StepResult:
    """What verification decided for one sequence, handed back through ``commit``.

    Attributes
    ----------
    path : list[int]
        Accepted node indices of the tree, starting with the root 0.
    emitted : list[int]
        Tokens emitted this step (accepted drafts, then the correction / bonus token), before
        stop truncation.
    num_accepted : int
    hidden : Tensor [len(path), H] or None
        Target hidden states (last layer, pre-norm) at the accepted path's nodes, for
        proposers with ``needs_hidden``.
    aux_hidden : dict[int, Tensor] or None
        Chosen intermediate layers' hidden states at the accepted path.
    aux_tokens : list[int] or None
        The target's argmax at each of the step's :class:`AuxRows` (proposers with
        ``uses_aux_rows``), in row order.
    """

    path: list
    emitted: list
    num_accepted: int
    hidden: Optional[torch.Tensor] = None
    aux_hidden: Optional[dict] = None
    aux_tokens: Optional[list] = None


class Proposer:
    """Base class. Subclasses implement :meth:`propose`; stateful ones also :meth:`commit`,
    :meth:`add` and :meth:`release`."""

    #: name used by the CLI and the metrics
    name: str = "proposer"
    #: the target's hidden states of the accepted path are passed to commit()
    needs_hidden: bool = False
    #: intermediate target layers whose hidden states commit() wants (EAGLE-3)
    hidden_layers: tuple = ()
    #: prompt hidden states handed to add(): "last" (the last cached position) or "all"
    #: (every cached prompt position, for heads with their own cache such as EAGLE)
    prompt_hidden: str = "last"
    #: propose() also prepares auxiliary rows, read by the engine through aux_rows()
    uses_aux_rows: bool = False
    #: drafts trees (several branches): the cost-aware policy offers it wide node budgets
    drafts_trees: bool = False

    def budget_menu(self, max_depth: int, max_nodes: int) -> list:
        """The budgets (:class:`specrt.policy.Budget`) worth offering this proposer within the
        engine's limits: plain, every chain, and, for tree proposers, wider node counts. A
        proposer whose drafting has coarser knobs may override it."""
        from ..policy import default_menu

        depth = min(max_depth, getattr(self, "max_depth", max_depth))
        nodes = min(max_nodes, getattr(self, "max_nodes", None) or max_nodes)
        return default_menu(depth, nodes, self.drafts_trees)

    def set_costs(self, costs) -> None:
        """The engine's measured :class:`specrt.policy.CostTable` (for a proposer that sizes
        its own trees from node confidences, e.g. EAGLE-2's dynamic trees): called before the
        first step when the engine has one. Proposers never time anything themselves."""

    def attach(self, model, cache) -> None:
        """Called once by the engine with the target model and its paged cache (proposers
        that share the target's cache, e.g. layer skip, keep them)."""

    def add(self, seq: SeqView, hidden=None, aux_hidden=None) -> None:
        """A sequence joined the batch (its prompt is prefilled in the target's cache).
        Proposers with ``needs_hidden`` also get the target's hidden state [1, H] (and the
        ``hidden_layers``' in ``aux_hidden``) at the prompt's last cached position, the one that
        predicted the root, or [committed_len, H] at every cached position when
        ``prompt_hidden == "all"``; None for a one-token prompt."""

    def check_options(self, options: dict, max_tree_nodes: int) -> None:
        """Validate a request's ``SamplingParams.draft_options`` (raise ValueError); called
        at admission, so a bad request fails alone. ``max_tree_nodes``: the engine's limit on
        tree nodes plus aux rows per sequence."""
        if options:
            raise ValueError(f"proposer {self.name!r} takes no per-request draft_options, "
                             f"got {sorted(options)}")

    def propose(self, seqs: Sequence[SeqView]) -> list[DraftTree]:
        """One draft tree per sequence (root = ``seq.token_ids[-1]``), depth <= max_draft."""
        raise NotImplementedError

    def aux_rows(self, seqs: Sequence[SeqView]) -> list:
        """Only with ``uses_aux_rows``: right after :meth:`propose`, per sequence an
        :class:`AuxRows` or None. Tree nodes plus aux rows of a sequence must not exceed the
        engine's ``max_tree_nodes``."""
        return [None] * len(seqs)

    def commit(self, seqs: Sequence[SeqView], results: Sequence[StepResult]) -> None:
        """Update proposer state from what was accepted (sequences in the same order)."""

    def release(self, seq_id: int) -> None:
        """A sequence finished: free its state."""


class LastHiddenProposer(Proposer):
    """A proposer that drafts from the target's hidden state at the position that predicted
    the root (Medusa heads, the MLP speculator): it keeps that one state per sequence in
    ``self._hidden`` (seq_id -> [H]), from the prompt at :meth:`add` and from the accepted
    path's last node at :meth:`commit`; a sequence without one drafts nothing."""

    needs_hidden = True

    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        if hidden is not None and hidden.shape[0] > 0:
            self._hidden[seq.seq_id] = hidden[-1]
        else:
            self._hidden.pop(seq.seq_id, None)

    def release(self, seq_id: int) -> None:
        self._hidden.pop(seq_id, None)

    def commit(self, seqs, results) -> None:
        # the engine hands hidden states (>= 1 row, the root's) only to accepted steps
        for s, r in zip(seqs, results):
            if r.hidden is not None and r.hidden.shape[0] > 0:
                self._hidden[s.seq_id] = r.hidden[-1]
            else:
                self._hidden.pop(s.seq_id, None)


class NoProposer(Proposer):
    """Plain autoregressive decoding: one-node trees (the baseline of every speed-up)."""

    name = "none"

    def propose(self, seqs):
        return [DraftTree.single(s.token_ids[-1]) for s in seqs]
