"""Draft trees: one sequence's speculation as a rooted tree, and their ragged batch for the ops.

A :class:`DraftTree` holds ``T`` nodes in topological order. Node 0 is the root (the last
emitted token, whose K/V is not cached yet); ``parents[i] < i`` for ``i > 0``. Node ``i`` sits
at position ``committed_len + depth(i)`` and sees its ancestors and itself (docs/ops.md,
"Draft trees"). A chain is the tree with ``parents = [-1, 0, 1, ..., T-2]``.

Everything derived from the shape of a tree (depths, packed mask, children) depends on the
parent array only, so it lives in a shared, cached :class:`_Topology`: proposers that reuse one
tree shape every step (Medusa / EAGLE static trees, fixed-length chains) pay for it once.
Host-side work stays in numpy / plain Python on small arrays, which is several times cheaper
than a torch op per tree; :func:`batch_trees` then moves a handful of flat arrays at once.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "DraftTree",
    "TreeBatch",
    "batch_trees",
    "pack_mask",
    "unpack_mask",
    "accepted_tokens",
    "mask_words",
    "AuxLayout",
    "with_aux_rows",
]

IntSeq = Union[Sequence[int], np.ndarray, torch.Tensor]

_INT32_MAX = 2**31 - 1


def mask_words(num_nodes: int) -> int:
    """Number of int32 words of a packed mask row over ``num_nodes`` columns."""
    return max(1, (int(num_nodes) + 31) // 32)


# --------------------------------------------------------------------------------------------
# packed masks (any device)
# --------------------------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """Pack a boolean visibility matrix into the int32 word format of docs/ops.md.

    Parameters
    ----------
    mask : bool [R, C]
        ``mask[r, k]`` = row ``r`` may attend to new token ``k``.
    width : int, optional
        Words per row (pads with zero words, e.g. to a CUDA-graph bucket); default
        ``ceil(C / 32)`` (at least 1).

    Returns
    -------
    int32 [R, width]
        Bit ``k % 32`` of word ``k // 32`` of row ``r`` is ``mask[r, k]``, on ``mask``'s device.
    """
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"pack_mask expects a 2-D [R, C] mask, got shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    need = mask_words(cols)
    if width is None:
        width = need
    elif width < need:
        raise ValueError(f"pack_mask: width {width} words cannot hold {cols} columns "
                         f"(needs {need})")
    bits = torch.zeros(rows, width * 32, dtype=torch.int64, device=mask.device)
    bits[:, :cols] = mask.to(torch.bool)
    weights = torch.ones(32, dtype=torch.int64, device=mask.device) << torch.arange(
        32, dtype=torch.int64, device=mask.device)
    words = (bits.view(rows, width, 32) * weights).sum(dim=-1)  # [R, W] in [0, 2^32)
    # NOTE: int64 -> int32 casts of values >= 2^31 are not guaranteed to wrap; fold bit 31
    # into the sign explicitly.
    words = torch.where(words > _INT32_MAX, words - 2**32, words)
    return words.to(torch.int32)


def unpack_mask(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: int32 ``[R, W]`` -> bool ``[R, num_cols]``."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 2:
        raise ValueError("unpack_mask expects a 2-D int32 tensor [R, W]")
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_mask expects int32 words, got {packed.dtype}")
    if num_cols < 0 or num_cols > 32 * packed.shape[1]:
        raise ValueError(f"unpack_mask: {num_cols} columns do not fit in "
                         f"{packed.shape[1]} words")
    cols = torch.arange(num_cols, device=packed.device)
    # Sign extension to int64 keeps bit 31 reachable: (-x >> 31) & 1 == 1.
    words = packed.to(torch.int64)[:, cols // 32]
    return ((words >> (cols % 32)) & 1).to(torch.bool)


# --------------------------------------------------------------------------------------------
# tree topology (shared by every tree with the same parent array)
# --------------------------------------------------------------------------------------------


class _Topology:
    """Everything that depends only on the parent array; immutable and shared."""

    __slots__ = ("parents", "parents_np", "parents_t", "num_nodes", "depths_np", "depths_t",
                 "is_chain", "max_depth", "_rows", "_masks", "_children")

    def __init__(self, parents: tuple[int, ...]):
        t = len(parents)
        if t == 0:
            raise ValueError("a draft tree needs at least one node (the root)")
        for i, p in enumerate(parents):
            if not isinstance(p, (int, np.integer)) or isinstance(p, bool):
                raise ValueError(f"parents[{i}] = {p!r} is not an integer")
        parents = tuple(int(p) for p in parents)
        if parents[0] != -1:
            raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {parents[0]}")
        depths = [0] * t
        for i in range(1, t):
            p = parents[i]
            if not 0 <= p < i:
                raise ValueError(
                    f"parents[{i}] = {p} is not a valid parent: need 0 <= parents[i] < i "
                    f"(nodes in topological order, single root at 0)")
            depths[i] = depths[p] + 1
        self.parents = parents
        self.parents_np = np.asarray(parents, dtype=np.int64)
        self.parents_t = torch.from_numpy(self.parents_np.copy())
        self.parents_np.setflags(write=False)
        self.num_nodes = t
        self.depths_np = np.asarray(depths, dtype=np.int64)
        self.depths_t = torch.from_numpy(self.depths_np.copy())
        self.depths_np.setflags(write=False)
        self.is_chain = all(parents[i] == i - 1 for i in range(1, t))
        self.max_depth = max(depths)
        self._rows = None  # ancestor bitsets as Python ints
        self._masks: dict = {}  # width -> int32 [T, width] (numpy); -1 -> own-width tensor
        self._children = None

    def ancestor_rows(self) -> list[int]:
        if self._rows is None:
            if self.is_chain:
                rows = [(1 << (i + 1)) - 1 for i in range(self.num_nodes)]
            else:
                rows = [1] * self.num_nodes
                par = self.parents
                for i in range(1, self.num_nodes):
                    rows[i] = rows[par[i]] | (1 << i)
            self._rows = rows
        return self._rows

    def mask(self, width: int) -> np.ndarray:
        """int32 [T, width] packed mask (cached per width)."""
        m = self._masks.get(width)
        if m is None:
            # Little-endian bytes of the row bitset are exactly the little-endian int32 words:
            # bit k of the integer lands in bit k % 32 of word k // 32.
            nbytes = 4 * width
            buf = b"".join(r.to_bytes(nbytes, "little") for r in self.ancestor_rows())
            m = np.frombuffer(buf, dtype="<i4").reshape(self.num_nodes, width)
            m = m.astype(np.int32)  # own, writable-flag-independent, native-endian copy
            m.setflags(write=False)
            self._masks[width] = m
        return m

    def mask_tensor(self) -> torch.Tensor:
        """The tree's own-width mask as a (shared, read-only by convention) tensor."""
        m = self._masks.get(-1)
        if m is None:
            m = torch.from_numpy(self.mask(mask_words(self.num_nodes)).copy())
            self._masks[-1] = m
        return m

    def children(self) -> tuple[tuple[int, ...], ...]:
        if self._children is None:
            kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
            for i in range(1, self.num_nodes):
                kids[self.parents[i]].append(i)
            self._children = tuple(tuple(k) for k in kids)
        return self._children


@functools.lru_cache(maxsize=4096)
def _topology(parents: tuple[int, ...]) -> _Topology:
    return _Topology(parents)


@functools.lru_cache(maxsize=1024)
def _chain_topology(num_nodes: int) -> _Topology:
    return _Topology((-1,) + tuple(range(num_nodes - 1)))


def _as_int_list(x: IntSeq, what: str) -> list[int]:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _as_int_array(x, what).tolist()
    out = x if isinstance(x, list) else list(x)
    if out and np.asarray(out).dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got {out!r}")
    return out


def _as_int_array(x: IntSeq, what: str) -> np.ndarray:
    """A fresh int64 numpy array from a list / array / tensor of integers (1-D)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer tensor, got {x.dtype}")
        # copy=True: never alias a caller's buffer that it may reuse next step.
        return x.detach().to("cpu", torch.int64, copy=True).numpy()
    arr = np.array(x)  # always a copy
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# one tree
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False, repr=False)
class DraftTree:
    """One sequence's draft tree (node 0 = root = last emitted token).

    Parameters
    ----------
    tokens : int sequence or 1-D integer tensor [T]
        Token of each node; ``tokens[0]`` is the last emitted token. Stored as an int64 CPU
        tensor (a CUDA tensor is copied to the host: one sync, do it once per batch).
    parents : int sequence or 1-D integer tensor [T]
        ``parents[0] == -1``, ``0 <= parents[i] < i``. Stored as an int64 CPU tensor.
    draft_probs : float32 [T, V] or [T-1, V], optional
        Chains only: row ``j`` is the distribution node ``j``'s child was drawn from. The row
        of the leaf is never read, so a proposer may hand only the ``T-1`` rows it sampled
        from; :func:`batch_trees` pads the leaf row with zeros. Kept on its own device.
    node_logp : float sequence [T], optional
        The proposer's confidence in each node: log-probability, by its own model, that the
        path from the root to the node is what the target produces (0 at the root; the
        policy caps a node's value at its parent's). The cost-aware policy trims such trees
        node by node, likeliest first (:mod:`specrt.policy`); verification never reads it.

    Treat a tree as immutable: derived data is cached and shared between trees of the same
    shape, and accessors return those cached tensors (do not write into them).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: Optional[torch.Tensor] = None
    node_logp: Optional[tuple] = None
    _topo: _Topology = field(init=False)
    _tokens_np: np.ndarray = field(init=False)

    def __post_init__(self):
        par = self.parents
        if not isinstance(par, _Topology):
            if isinstance(par, (torch.Tensor, np.ndarray)):
                par = _as_int_array(par, "parents").tolist()
            # Element types are checked when the shape is first seen (cache miss); a hit
            # means the values equal an already validated parent array.
            par = _topology(tuple(par))
        self._init(self.tokens, par, self.draft_probs)

    # Shared by the constructors that already hold a validated topology.
    def _init(self, tokens: IntSeq, topo: _Topology, draft_probs: Optional[torch.Tensor]):
        tok = _as_int_array(tokens, "tokens")
        if tok.shape[0] != topo.num_nodes:
            raise ValueError(f"tokens has {tok.shape[0]} entries but parents has "
                             f"{topo.num_nodes}: one token per node")
        lo, hi = _min_max(tokens, tok)
        if lo < 0:
            bad = int(np.flatnonzero(tok < 0)[0])
            raise ValueError(f"tokens[{bad}] = {int(tok[bad])} is negative")
        if hi > _INT32_MAX:
            raise ValueError(f"token id {hi} does not fit in int32")
        if draft_probs is not None:
            _check_draft_probs(draft_probs, topo)
        if self.node_logp is not None:
            lp = tuple(float(x) for x in self.node_logp)
            if len(lp) != topo.num_nodes:
                raise ValueError(f"node_logp has {len(lp)} entries for {topo.num_nodes} nodes")
            if any(not (x <= 0.0) for x in lp):  # NaN too
                raise ValueError("node_logp values must be log-probabilities (<= 0)")
            self.node_logp = lp
        self._topo = topo
        self._tokens_np = tok  # shares memory with self.tokens
        self.tokens = torch.from_numpy(tok)
        self.parents = topo.parents_t
        self.draft_probs = draft_probs

    # ---- constructors ---------------------------------------------------------------------

    @classmethod
    def _make(cls, tokens: IntSeq, topo: _Topology,
              draft_probs: Optional[torch.Tensor] = None,
              node_logp: Optional[Sequence[float]] = None) -> "DraftTree":
        # __post_init__ sees a _Topology and skips its checks
        return cls(tokens, topo, draft_probs, node_logp)

    @classmethod
    def single(cls, root_token: int) -> "DraftTree":
        """The tree with only the root: a plain decode step."""
        return cls._make([operator.index(root_token)], _chain_topology(1))

    @classmethod
    def chain(cls, root_token: int, draft_tokens: IntSeq,
              draft_probs: Optional[torch.Tensor] = None) -> "DraftTree":
        """Root followed by ``draft_tokens`` in a line (``parents = [-1, 0, ..., T-2]``)."""
        # Element types are checked once, on the joined token array, by _init.
        if isinstance(draft_tokens, (torch.Tensor, np.ndarray)):
            if draft_tokens.ndim != 1:
                raise ValueError(f"draft_tokens must be 1-D, got shape "
                                 f"{tuple(draft_tokens.shape)}")
            drafts = draft_tokens.tolist()
        else:
            drafts = list(draft_tokens)
        return cls._make([operator.index(root_token)] + drafts, _chain_topology(len(drafts) + 1),
                         draft_probs)

    @classmethod
    def from_paths(cls, root_token: int, paths: Sequence[IntSeq]) -> "DraftTree":
        """Merge token continuations into a trie rooted at ``root_token``.

        Shared prefixes become shared nodes. Nodes are numbered in insertion order (path by
        path), so sibling order (the order verification tries children in) follows the order
        in which the paths first reach them: list the most likely continuation first. Empty
        and duplicate paths add nothing.
        """
        tokens = [operator.index(root_token)]
        parents = [-1]
        kids: list[dict[int, int]] = [{}]  # per node: child token -> child node
        for path in paths:
            node = 0
            for tok in _as_int_list(path, "path"):
                nxt = kids[node].get(tok)
                if nxt is None:
                    nxt = len(tokens)
                    kids[node][tok] = nxt
                    kids.append({})
                    tokens.append(tok)
                    parents.append(node)
                node = nxt
        return cls._make(tokens, _topology(tuple(parents)))

    # ---- derived --------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return self._topo.num_nodes

    def __len__(self) -> int:
        return self._topo.num_nodes

    @property
    def is_chain(self) -> bool:
        return self._topo.is_chain

    @property
    def max_depth(self) -> int:
        return self._topo.max_depth

    @property
    def depths(self) -> torch.Tensor:
        """int64 [T]: distance of each node from the root."""
        return self._topo.depths_t

    def positions(self, committed_len: int) -> torch.Tensor:
        """int64 [T]: sequence position of each node, ``committed_len + depth``."""
        if committed_len < 0:
            raise ValueError(f"committed_len must be >= 0, got {committed_len}")
        return self.depths + int(committed_len)

    def children(self, i: int) -> tuple[int, ...]:
        """Children of node ``i`` in increasing node index (the verification order)."""
        self._check_node(i)
        return self._topo.children()[i]

    def parent(self, i: int) -> int:
        self._check_node(i)
        return self._topo.parents[i]

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root to node ``i`` (both included)."""
        self._check_node(i)
        par = self._topo.parents
        path = []
        while i >= 0:
            path.append(i)
            i = par[i]
        path.reverse()
        return path

    def first_chain(self) -> tuple["DraftTree", list[int]]:
        """The chain that follows the first child (the first one verification tries) from the
        root down, and its nodes' indices in this tree. A chain returns itself."""
        if self._topo.is_chain:
            return self, list(range(self._topo.num_nodes))
        kids = self._topo.children()
        nodes = [0]
        while kids[nodes[-1]]:
            nodes.append(kids[nodes[-1]][0])
        return self.select(nodes), nodes

    def truncated(self, max_depth: int, max_nodes: int) -> "DraftTree":
        """This tree cut to a draft budget: the nodes of depth <= ``max_depth``, the first
        ``max_nodes`` of them in node order (a node's parent comes before it and is shallower,
        so the result is a tree; a proposer that lists its likeliest nodes first keeps them).
        Returns ``self`` when it already fits."""
        return self.truncation(max_depth, max_nodes)[0]

    def truncation(self, max_depth: int, max_nodes: int) -> tuple["DraftTree", Optional[list]]:
        """:meth:`truncated` and the kept nodes' indices in this tree (None when unchanged)."""
        if self.max_depth <= max_depth and self.num_nodes <= max_nodes:
            return self, None
        depths = self.depths.tolist()
        keep = [i for i, d in enumerate(depths) if d <= max_depth][:max(1, max_nodes)]
        return self.select(keep), keep

    def select(self, keep: Sequence[int]) -> "DraftTree":
        """The tree of the nodes ``keep`` (increasing indices, the root first, every kept
        node's parent kept), renumbered in that order; draft probabilities and confidences
        follow their nodes."""
        keep = list(keep)
        where = {n: j for j, n in enumerate(keep)}
        par = self._topo.parents
        if not keep or keep[0] != 0 or any(a >= b for a, b in zip(keep, keep[1:])):
            raise ValueError("select: increasing node indices starting at the root")
        try:
            parents = [-1] + [where[par[n]] for n in keep[1:]]
        except KeyError:
            raise ValueError("select: a kept node's parent is not kept") from None
        probs = self.draft_probs
        if probs is not None:  # chains only: rows of the kept nodes (the leaf row may be absent)
            probs = probs[: min(len(keep), probs.shape[0])]
        lp = None if self.node_logp is None else [self.node_logp[n] for n in keep]
        return DraftTree(self._tokens_np[keep].tolist(), parents, probs, lp)

    def packed_mask(self) -> torch.Tensor:
        """int32 [T, ceil(T/32)]: row ``i`` has the bits of ``i``'s ancestors and ``i``."""
        return self._topo.mask_tensor()

    def _check_node(self, i: int):
        if not 0 <= i < self._topo.num_nodes:
            raise IndexError(f"node {i} out of range for a tree of {self._topo.num_nodes} nodes")

    def __repr__(self) -> str:
        probs = "" if self.draft_probs is None else f", draft_probs={tuple(self.draft_probs.shape)}"
        return (f"DraftTree(T={self.num_nodes}, tokens={self._tokens_np.tolist()}, "
                f"parents={list(self._topo.parents)}{probs})")


def _min_max(src, arr: np.ndarray) -> tuple[int, int]:
    # Python's min/max over a short list beat two numpy reductions by a wide margin.
    if isinstance(src, list):
        return min(src), max(src)
    return int(arr.min()), int(arr.max())


def _check_draft_probs(probs: torch.Tensor, topo: _Topology):
    if not isinstance(probs, torch.Tensor):
        raise ValueError("draft_probs must be a torch.Tensor")
    if not topo.is_chain:
        raise ValueError("draft_probs are only supported for chains (docs/ops.md); this tree "
                         "branches")
    if probs.dim() != 2 or probs.dtype != torch.float32:
        raise ValueError(f"draft_probs must be float32 [T, V] or [T-1, V], got {probs.dtype} "
                         f"{tuple(probs.shape)}")
    t = topo.num_nodes
    if probs.shape[0] not in (t, t - 1):
        raise ValueError(f"draft_probs has {probs.shape[0]} rows; a chain of {t} nodes needs "
                         f"{t} (or {t - 1}, leaf row omitted)")


def accepted_tokens(tree: DraftTree, path: IntSeq) -> list[int]:
    """Draft tokens accepted along ``path`` (root excluded).

    ``path`` is an accepted path as ``rejection_sample`` writes it: local node indices starting
    with 0 (the root), optionally padded with ``-1``. It must be a root-to-node path of
    ``tree``. The emitted tokens of a step are these plus the correction / bonus token.
    """
    nodes = _as_int_list(path, "path")
    if -1 in nodes:
        cut = nodes.index(-1)
        if any(v != -1 for v in nodes[cut:]):
            raise ValueError(f"path {nodes} has entries after its -1 padding")
        nodes = nodes[:cut]
    if not nodes:
        return []
    if nodes[0] != 0:
        raise ValueError(f"path must start at the root (node 0), got {nodes}")
    par = tree._topo.parents
    tok = tree._tokens_np
    out = []
    for j in range(1, len(nodes)):
        n = nodes[j]
        if not 0 < n < tree.num_nodes or par[n] != nodes[j - 1]:
            raise ValueError(f"path {nodes} is not a root-to-node path of the tree "
                             f"(node {n} at step {j})")
        out.append(int(tok[n]))
    return out


# --------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TreeBatch:
    """The ragged tensors the ops take for ``B`` trees (``N = sum(T_b)`` nodes).

    Attributes
    ----------
    tokens : int32 [N]
        Node tokens (root entries = last emitted tokens); the op's ``draft_tokens``.
    parents : int32 [N]
        Local parent index, ``-1`` at each root.
    node_indptr : int32 [B+1]
        Sequence ``b`` owns nodes ``node_indptr[b] .. node_indptr[b+1]-1`` (also the
        ``qo_indptr`` of the verify forward).
    positions : int64 [N]
        ``committed_len_b + depth``: the rotary position of each node.
    depths : int32 [N]
    mask : int32 [N, W] or None
        Packed visibility (``W = ceil(max_t / 32)``); None when every tree is a chain (causal).
    draft_probs : float32 [N, V] or None
        Set when some tree carries probabilities. A chain without probabilities gets one-hot
        rows at its draft tokens (a deterministic draft as ``q``: the op's draft-probability
        rule then verifies it exactly like a deterministic chain); leaf rows, omitted rows and
        the rows of greedy branching trees (ignored by the op) are zero.
    max_t : int
        The node bucket: ``>= max_b T_b``; sizes the mask width and the verify outputs.
    num_nodes : list[int]
        ``T_b`` per tree (host).
    committed_lens : list[int]
        The committed lengths the positions were computed from (host).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    node_indptr: torch.Tensor
    positions: torch.Tensor
    depths: torch.Tensor
    mask: Optional[torch.Tensor]
    draft_probs: Optional[torch.Tensor]
    max_t: int
    num_nodes: list[int]
    committed_lens: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.num_nodes)

    @property
    def total_nodes(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def all_chains(self) -> bool:
        return self.mask is None


def batch_trees(trees: Sequence[DraftTree], committed_lens: IntSeq,
                device: Optional[Union[str, torch.device]] = None,
                max_t: Optional[int] = None, always_mask: bool = False,
                greedy: Optional[Sequence[bool]] = None) -> TreeBatch:
    """Flatten ``B`` draft trees into the ragged layout of docs/ops.md.

    Parameters
    ----------
    trees : sequence of DraftTree, length B >= 1
    committed_lens : int [B]
        Committed KV length of each sequence (positions start there).
    device : torch device, optional
        Where the index tensors go (default CPU). ``draft_probs`` are gathered on ``device``
        when it is given, else on the device the trees' probabilities live on.
    max_t : int, optional
        Node bucket (CUDA-graph shapes): fixes ``W = ceil(max_t / 32)``; must be
        ``>= max T_b``. Default ``max T_b``.
    always_mask : bool
        Build the packed mask even when every tree is a chain (fixed buffers for graphs).
    greedy : bool [B], optional
        Which requests verify greedily. When some tree carries ``draft_probs``, a branching
        tree is only allowed for a greedy request (the op ignores a greedy request's
        probabilities and verifies its tree by argmax; a sampled request with probabilities
        must be a chain, docs/ops.md): without ``greedy`` every tree must then be a chain.

    Returns
    -------
    TreeBatch
    """
    b = len(trees)
    if b == 0:
        raise ValueError("batch_trees needs at least one tree")
    for i, tr in enumerate(trees):
        if not isinstance(tr, DraftTree):
            raise TypeError(f"trees[{i}] is a {type(tr).__name__}, not a DraftTree")
    committed = _as_int_list(committed_lens, "committed_lens")
    if len(committed) != b:
        raise ValueError(f"{b} trees but {len(committed)} committed lengths")
    if min(committed) < 0:
        raise ValueError(f"committed lengths must be >= 0, got {min(committed)}")
    topos = [tr._topo for tr in trees]
    counts = [tp.num_nodes for tp in topos]
    longest = max(counts)
    if max_t is None:
        max_t = longest
    elif max_t < longest:
        raise ValueError(f"max_t = {max_t} is smaller than the largest tree ({longest} nodes)")
    dev = torch.device("cpu") if device is None else torch.device(device)

    indptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    tokens = np.concatenate([tr._tokens_np for tr in trees]).astype(np.int32)
    parents = np.concatenate([tp.parents_np for tp in topos]).astype(np.int32)
    depths = np.concatenate([tp.depths_np for tp in topos])
    positions = depths + np.repeat(np.asarray(committed, dtype=np.int64), counts)

    all_chains = all(tp.is_chain for tp in topos)
    mask = None
    if always_mask or not all_chains:
        width = mask_words(max_t)
        mask = torch.from_numpy(np.concatenate([tp.mask(width) for tp in topos])).to(dev)

    if greedy is not None and len(greedy) != b:
        raise ValueError(f"{b} trees but {len(greedy)} greedy flags")
    probs = _batch_probs(trees, counts, greedy, device)

    def _t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(a).to(device=dev, dtype=dtype)

    return TreeBatch(
        tokens=_t(tokens, torch.int32),
        parents=_t(parents, torch.int32),
        node_indptr=_t(indptr, torch.int32),
        positions=_t(positions, torch.int64),
        depths=_t(depths, torch.int32),
        mask=mask,
        draft_probs=probs,
        max_t=int(max_t),
        num_nodes=counts,
        committed_lens=committed,
    )


def _batch_probs(trees, counts, greedy, device) -> Optional[torch.Tensor]:
    have = [tr.draft_probs for tr in trees if tr.draft_probs is not None]
    if not have:
        return None
    for b, tr in enumerate(trees):
        if not tr.is_chain and not (greedy is not None and greedy[b]):
            who = "a sampled request" if greedy is not None else "a request not marked greedy"
            raise ValueError(
                f"draft_probs are given but tree {b} ({who}) branches: in a batch with draft "
                "probabilities only greedy requests may hold branching trees (pass greedy=; "
                "the engine reduces such a tree to its first chain, docs/ops.md)")
    vocab = have[0].shape[1]
    for p in have:
        if p.shape[1] != vocab:
            raise ValueError(f"draft_probs vocabularies differ within the batch "
                             f"({vocab} vs {p.shape[1]})")
    dev = have[0].device if device is None else torch.device(device)
    if device is None and any(p.device != dev for p in have):
        raise ValueError("draft_probs of the batch live on different devices; pass device=")
    # One concatenation (one kernel on GPU): missing rows are views of a single zero block,
    # deterministic chains one-hot rows scattered into one block.
    missing = max(t - (0 if tr.draft_probs is None else tr.draft_probs.shape[0])
                  for tr, t in zip(trees, counts))
    zeros = torch.zeros(missing, vocab, dtype=torch.float32, device=dev) if missing else None
    det = [tr for tr in trees if tr.draft_probs is None and tr.is_chain and tr.num_nodes > 1]
    onehot = None
    if det:
        toks = np.concatenate([tr._tokens_np[1:] for tr in det])
        if int(toks.max()) >= vocab:
            raise ValueError(f"a draft token ({int(toks.max())}) is outside the draft "
                             f"probabilities' vocabulary ({vocab})")
        onehot = torch.zeros(len(toks), vocab, dtype=torch.float32)
        onehot[torch.arange(len(toks)), torch.from_numpy(toks)] = 1.0
        onehot = onehot.to(dev)
    pieces = []
    used = 0
    for tr, t in zip(trees, counts):
        rows = 0
        if tr.draft_probs is not None:
            pieces.append(tr.draft_probs.to(dev))
            rows = tr.draft_probs.shape[0]
        elif onehot is not None and tr.is_chain and t > 1:
            # row j is the one-hot distribution node j's child (token j + 1) was "drawn" from
            pieces.append(onehot[used:used + t - 1])
            used += t - 1
            rows = t - 1
        if rows < t:
            pieces.append(zeros[:t - rows])
    return torch.cat(pieces)


# --------------------------------------------------------------------------------------------
# auxiliary rows (Lookahead's Jacobi window) next to the verified trees
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class AuxLayout:
    """One verify forward over draft trees plus auxiliary rows.

    Sequence ``b`` owns ``T_b`` tree rows followed by ``A_b`` aux rows (``counts = T_b + A_b``
    new tokens, in that order, so tree node ``j`` keeps cache slot ``committed_b + j`` and the
    step's rollback is unchanged). ``logits_rows`` lists every tree row (the verification
    batch's order) and then every aux row, so ``logits[:num_tree]`` is exactly what the trees
    alone would give.
    """

    tokens: torch.Tensor  # int64 [N']
    positions: torch.Tensor  # int64 [N']
    mask: torch.Tensor  # int32 [N', W]
    counts: list
    logits_rows: torch.Tensor  # int64 [N']
    num_tree: int
    aux_counts: list


def with_aux_rows(tb: TreeBatch, trees: Sequence[DraftTree], aux: Sequence,
                  device: Optional[Union[str, torch.device]] = None) -> AuxLayout:
    """Lay out ``tb``'s trees with ``aux[b]`` (an object with ``tokens``, ``offsets`` and
    ``sees``, e.g. :class:`specrt.proposers.base.AuxRows`, or None) after tree ``b``'s nodes.

    An aux row sees its sequence's committed cache, the tree's root (node 0) and the aux rows
    of its ``sees`` bitset; tree rows see only their ancestors, never aux rows.
    """
    b = len(trees)
    if len(aux) != b:
        raise ValueError(f"{b} trees but {len(aux)} aux-row entries")
    dev = torch.device("cpu") if device is None else torch.device(device)
    a_counts = [0 if a is None else len(a.tokens) for a in aux]
    counts = [t + a for t, a in zip(tb.num_nodes, a_counts)]
    width = mask_words(max(counts))
    toks, pos, masks, tree_rows, aux_rows = [], [], [], [], []
    start = 0
    tree_tokens = tb.tokens.cpu().numpy()
    tree_pos = tb.positions.cpu().numpy()
    off = 0
    for i, (tr, a) in enumerate(zip(trees, aux)):
        t, c = tb.num_nodes[i], tb.committed_lens[i]
        toks.append(tree_tokens[off:off + t].astype(np.int64))
        pos.append(tree_pos[off:off + t])
        masks.append(tr._topo.mask(width))
        tree_rows.append(np.arange(start, start + t))
        off += t
        if a is not None and len(a.tokens):
            n = len(a.tokens)
            toks.append(np.asarray(a.tokens, dtype=np.int64))
            pos.append(np.asarray(a.offsets, dtype=np.int64) + c)
            nbytes = 4 * width
            buf = b"".join((1 | (int(m) << t)).to_bytes(nbytes, "little") for m in a.sees)
            masks.append(np.frombuffer(buf, dtype="<i4").reshape(n, width).astype(np.int32))
            aux_rows.append(np.arange(start + t, start + t + n))
        start += counts[i]
    rows = np.concatenate(tree_rows + aux_rows)

    def _t(x, dtype):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=dev, dtype=dtype)

    return AuxLayout(tokens=_t(np.concatenate(toks), torch.int64),
                     positions=_t(np.concatenate(pos), torch.int64),
                     mask=_t(np.concatenate(masks), torch.int32), counts=counts,
                     logits_rows=_t(rows, torch.int64), num_tree=int(sum(tb.num_nodes)),
                     aux_counts=a_counts)
