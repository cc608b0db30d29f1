"""Prompt lookup / n-gram proposer: continue the context the way it continued before.

For the longest suffix of the context (``max_n`` down to ``min_n`` tokens) that occurred
earlier in prompt + output, propose the ``k`` tokens that followed it. With ``max_branches``
> 1, the distinct continuations of several earlier occurrences are merged into a tree
(``prefer="recent"``: most recent occurrence first; ``"earliest"``: first occurrence first,
which favours continuations copied from the prompt). Drafts are deterministic (one-hot q), so verification is lossless for any
sampling parameters. The index of n-gram end positions is updated incrementally: O(new
tokens x n) per step.
"""
from __future__ import annotations

from .base import Proposer
from ..tree import DraftTree


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, k: int = 4, min_n: int = 1, max_n: int = 3, max_branches: int = 1,
                 max_nodes: int = 64, prefer: str = "recent"):
        if prefer not in ("recent", "earliest"):
            raise ValueError(f"prefer must be 'recent' or 'earliest', got {prefer!r}")
        self.prefer = prefer
        if not (1 <= min_n <= max_n):
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        if k < 1 or max_branches < 1:
            raise ValueError("k and max_branches must be >= 1")
        self.k, self.min_n, self.max_n = k, min_n, max_n
        self.max_branches, self.max_nodes = max_branches, max_nodes
        self._state: dict[int, list] = {}  # seq_id -> [index: dict, indexed: int]

    def add(self, seq) -> None:
        self._state[seq.seq_id] = [{}, 0]

    def release(self, seq_id: int) -> None:
        self._state.pop(seq_id, None)

    def _update(self, st, toks) -> None:
        index, done = st
        for end in range(done, len(toks)):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 < 0:
                    break
                index.setdefault(tuple(toks[end - n + 1:end + 1]), []).append(end)
        st[1] = len(toks)

    def propose(self, seqs):
        trees = []
        for s in seqs:
            st = self._state.get(s.seq_id)
            if st is None:
                st = self._state[s.seq_id] = [{}, 0]
            toks = s.token_ids
            self._update(st, toks)
            depth = min(self.k, s.max_draft)
            paths = self._lookup(st[0], toks, depth) if depth > 0 else []
            trees.append(DraftTree.from_paths(toks[-1], paths) if paths else DraftTree.single(toks[-1]))
        return trees

    def _lookup(self, index, toks, depth):
        last = len(toks) - 1
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            ends = index.get(tuple(toks[last - n + 1:]))
            if not ends:
                continue
            paths, seen, nodes = [], set(), 1
            for end in (reversed(ends) if self.prefer == "recent" else ends):
                if end >= last:
                    continue
                cont = tuple(toks[end + 1:end + 1 + depth])
                if not cont or cont in seen:
                    continue
                if nodes + len(cont) > self.max_nodes:
                    break
                seen.add(cont)
                paths.append(cont)
                nodes += len(cont)
                if len(paths) >= self.max_branches:
                    break
            if paths:
                return paths
        return []
