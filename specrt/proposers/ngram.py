"""Prompt lookup / n-gram proposer: continue the context the way it continued before.

For the longest suffix of the context (``max_n`` down to ``min_n`` tokens) that occurred
earlier in prompt + output, propose the ``k`` tokens that followed it. With ``max_branches``
> 1, the distinct continuations of several earlier occurrences are merged into a tree
(``prefer="recent"``: most recent occurrence first; ``"earliest"``: first occurrence first,
which favours continuations copied from the prompt). Drafts are deterministic (one-hot q), so verification is lossless for any
sampling parameters. The index of n-gram end positions is updated incrementally: O(new
tokens x n) per step.

:meth:`NgramProposer.continuation` is the side-effect-free lookup the cascades use
(``cascade.py``, the vertical cascade in ``draft_model.py``): the best continuation of a
hypothetical context (real tokens followed by another drafter's guesses), with only the real
tokens ever entering the index.
"""
from __future__ import annotations

from typing import Optional

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
        self.drafts_trees = max_branches > 1
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
            paths = (self._lookup(st[0], toks, depth, min(self.max_nodes, s.max_nodes))
                     if depth > 0 else [])
            trees.append(DraftTree.from_paths(toks[-1], paths) if paths else DraftTree.single(toks[-1]))
        return trees

    def continuation(self, seq_id: int, tokens, committed_len: int, depth: int,
                     min_n: Optional[int] = None) -> list:
        """The continuation :meth:`propose` would rank first (up to ``depth`` tokens) if
        ``tokens`` were the real context, without recording the hypothetical part.

        Parameters
        ----------
        seq_id : int
        tokens : list[int]
            Real tokens ``tokens[:committed_len + 1]`` (prompt + emitted, root last) followed by
            drafted ones.
        committed_len : int
            The sequence's committed length: only ``tokens[:committed_len + 1]`` enter the
            index (as :meth:`propose` would index them anyway); never shrinks for a sequence.
        depth : int
        min_n : int, optional
            Shortest suffix match accepted (default the proposer's ``min_n``): a caller that
            pays for every guessed token can ask for longer, likelier matches.

        Returns
        -------
        list[int]
            Up to ``depth`` tokens; empty when no suffix of the context occurred before.
        """
        if depth < 1 or not tokens:
            return []
        st = self._state.get(seq_id)
        if st is None:
            st = self._state[seq_id] = [{}, 0]
        real = min(committed_len + 1, len(tokens))
        if st[1] < real:
            self._update(st, tokens[:real])
        index, done = st
        last = len(tokens) - 1
        lo = self.min_n if min_n is None else max(self.min_n, min_n)
        for n in range(min(self.max_n, len(tokens)), lo - 1, -1):
            key = tuple(tokens[last - n + 1:])
            ends = [e for e in index.get(key, ()) if e < last]
            # occurrences ending in the hypothetical part: scanned, never indexed
            ends += [e for e in range(max(done, n - 1), last) if tuple(tokens[e - n + 1:e + 1]) == key]
            if ends:
                end = ends[-1] if self.prefer == "recent" else ends[0]
                return list(tokens[end + 1:end + 1 + depth])
        return []

    @property
    def max_depth(self) -> int:
        return self.k

    def _lookup(self, index, toks, depth, max_nodes):
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
                if nodes + len(cont) > max_nodes:
                    cont = cont[:max_nodes - nodes]  # the first branch always fits in part
                    if not cont or paths:
                        break
                seen.add(cont)
                paths.append(cont)
                nodes += len(cont)
                if len(paths) >= self.max_branches:
                    break
            if paths:
                return paths
        return []
