"""Lookahead decoding (Fu et al., 2024): Jacobi iteration harvests n-grams, a pool of them
drafts, and both run in the target's verify forward: no draft model, no trained weights.

Per sequence the proposer keeps a 2-D window of ``W`` columns and up to ``N - 1`` levels of
the Jacobi trajectory. Level ``l``, column ``c`` is a guess for the token at offset
``c + l + 1`` after the root (the last emitted token, offset 0). It is fed to the target as an
auxiliary row (:class:`~specrt.proposers.base.AuxRows`) that sees the committed cache, the
root, level 0's columns ``<= c`` and column ``c``'s earlier levels: a contiguous context of
offsets ``0 .. c + l``, so its argmax is the next Jacobi guess for offset ``c + l + 2``.

After each step the newest level's predictions become a new level. Once ``N - 1`` levels
exist, column ``c`` reads as an n-gram ``(level 0 .. level N-2 of column c, prediction)`` at
consecutive offsets; it goes into the pool (keyed by its first token), and the oldest level
drops out (the window moves one position, as in the reference, however many tokens the step
emitted). The pool is also seeded from the prompt and fed from the emitted text.

Verification branch: up to ``G`` pooled n-grams whose first token is the root, merged into a
trie (deterministic drafts: lossless for greedy and sampled requests alike); optionally the
prompt-lookup continuation (longest-suffix match, :class:`NgramProposer`, up to
``lookup_depth`` tokens, which may exceed ``N - 1``: copying from the prompt runs long) first. The aux rows'
K/V never join the sequence: they sit in cache slots past the tree's and the step's rollback
and trim leave them outside the committed length.

Settings ``window`` (W), ``ngram`` (N), ``guesses`` (G) per engine, or per request through
``SamplingParams.draft_options``.
"""
from __future__ import annotations

import random
from collections import OrderedDict

from ..tree import DraftTree
from .base import AuxRows, Proposer
from .ngram import NgramProposer

_OPTIONS = ("window", "ngram", "guesses")


def _check(window, ngram, guesses):
    for name, v in (("window", window), ("ngram", ngram), ("guesses", guesses)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"lookahead {name} must be an integer, got {v!r}")
    if window < 0 or ngram < 2 or guesses < 0:
        raise ValueError(f"lookahead needs window >= 0, ngram >= 2, guesses >= 0; got "
                         f"W={window}, N={ngram}, G={guesses}")
    if window == 0 and guesses == 0:
        raise ValueError("lookahead with window 0 and 0 guesses drafts nothing")


def _rows(window, ngram, guesses, lookup_depth=0):
    """Most rows of one sequence's verify forward: root, prompt-lookup chain, G guesses of
    N - 1 tokens, W (N - 1) window rows."""
    return 1 + lookup_depth + (guesses + window) * (ngram - 1)


class _SeqState:
    __slots__ = ("W", "N", "G", "levels", "pool", "pooled_upto", "pending")

    def __init__(self, W, N, G):
        self.W, self.N, self.G = W, N, G
        self.levels: list = []  # list of levels, each a list of W tokens
        self.pool: OrderedDict = OrderedDict()  # first token -> OrderedDict{(N-1)-tuple: None}
        self.pooled_upto = 0  # tokens of the sequence whose n-grams are in the pool
        self.pending = 0  # levels fed as aux rows this step (0: none)


class LookaheadProposer(Proposer):
    """Parameters
    ----------
    window : W, Jacobi window columns (0: no lookahead branch, pool from text only)
    ngram : N, n-gram size (N - 1 draft tokens per guess; N - 1 Jacobi levels)
    guesses : G, pooled n-grams verified per step
    pool_per_key : n-grams kept per first token (most recent first)
    pool_keys : first tokens kept per sequence (least recently fed out first)
    prompt_lookup : also verify the prompt-lookup continuation (longest suffix match), first
    lookup_depth : tokens of that continuation (default 4, the ``ngram`` proposer's ``k``)
    fallback : spend rows on the pool's guesses and the Jacobi window only in steps where
        prompt lookup finds no continuation (a step that copies text verifies the lookup chain
        alone, as the ``ngram`` proposer would). For devices where every extra row costs time
        (a CPU); the window then advances only in those steps.
    pool_from_text : seed the pool with the prompt's n-grams and feed it the emitted ones
    seed : seeds the initial window (tokens drawn from the prompt), per request with its seed
    """

    name = "lookahead"
    uses_aux_rows = True
    drafts_trees = True

    def __init__(self, window: int = 4, ngram: int = 3, guesses: int = 4, *,
                 pool_per_key: int = 8, pool_keys: int = 4096, prompt_lookup: bool = True,
                 lookup_depth: int = 4, fallback: bool = False, pool_from_text: bool = True,
                 seed: int = 0):
        _check(window, ngram, guesses)
        if pool_per_key < 1 or pool_keys < 1:
            raise ValueError("pool_per_key and pool_keys must be >= 1")
        if isinstance(lookup_depth, bool) or not isinstance(lookup_depth, int) or lookup_depth < 1:
            raise ValueError(f"lookahead lookup_depth must be an integer >= 1, got {lookup_depth!r}")
        self.window, self.ngram, self.guesses = window, ngram, guesses
        self.pool_per_key, self.pool_keys = pool_per_key, pool_keys
        self.prompt_lookup, self.pool_from_text = prompt_lookup, pool_from_text
        self.seed = seed
        self.lookup_depth = lookup_depth if prompt_lookup else 0
        if fallback and not prompt_lookup:
            raise ValueError("lookahead fallback needs prompt_lookup (it falls back from it)")
        self.fallback = fallback
        self._lookup = NgramProposer(k=lookup_depth, max_n=3) if prompt_lookup else None
        self._state: dict[int, _SeqState] = {}
        self._aux: list = []
        self._max_pos = None

    @property
    def max_nodes(self) -> int:
        """Tree nodes plus aux rows per sequence with the engine-wide settings."""
        return _rows(self.window, self.ngram, self.guesses, self.lookup_depth)

    @property
    def max_depth(self) -> int:
        return max(self.ngram - 1, self.lookup_depth)

    def attach(self, model, cache) -> None:
        self._max_pos = model.config.max_position_embeddings

    def _settings(self, options: dict):
        W = options.get("window", self.window)
        N = options.get("ngram", self.ngram)
        G = options.get("guesses", self.guesses)
        return W, N, G

    def check_options(self, options: dict, max_tree_nodes: int) -> None:
        bad = sorted(set(options) - set(_OPTIONS))
        if bad:
            raise ValueError(f"unknown lookahead draft_options {bad} (known: {list(_OPTIONS)})")
        W, N, G = self._settings(options)
        _check(W, N, G)
        need = _rows(W, N, G, self.lookup_depth)
        if need > max_tree_nodes:
            raise ValueError(f"lookahead W={W}, N={N}, G={G} needs up to {need} rows per "
                             f"sequence, more than the engine's max_tree_nodes={max_tree_nodes}")

    # -- sequence state -------------------------------------------------------------------
    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        self._state[seq.seq_id] = self._new_state(seq)
        if self._lookup is not None:
            self._lookup.add(seq)

    def _new_state(self, seq) -> _SeqState:
        W, N, G = self._settings(seq.options)
        st = _SeqState(W, N, G)
        toks = seq.token_ids
        if W:
            # Level 0 starts as tokens drawn from the prompt (a reasonable vocabulary for the
            # first Jacobi guesses); the first steps only build levels, no n-grams yet.
            rng = random.Random((self.seed * 1_000_003) ^ seq.seed)
            src = toks[:seq.num_prompt_tokens] or toks
            st.levels = [[src[rng.randrange(len(src))] for _ in range(W)]]
        if self.pool_from_text:
            self._feed_text(st, toks)
        return st

    def release(self, seq_id: int) -> None:
        self._state.pop(seq_id, None)
        if self._lookup is not None:
            self._lookup.release(seq_id)

    def _put(self, st: _SeqState, gram: tuple) -> None:
        key, cont = gram[0], gram[1:]
        grams = self._pool_get(st, key, create=True)
        grams.pop(cont, None)
        grams[cont] = None  # most recent last
        while len(grams) > self.pool_per_key:
            grams.popitem(last=False)

    def _pool_get(self, st: _SeqState, key: int, create: bool = False):
        grams = st.pool.get(key)
        if grams is None:
            if not create:
                return None
            grams = st.pool[key] = OrderedDict()
            while len(st.pool) > self.pool_keys:
                st.pool.popitem(last=False)
        else:
            st.pool.move_to_end(key)
        return grams

    def _feed_text(self, st: _SeqState, toks) -> None:
        """Pool every complete n-gram of ``toks`` not pooled yet."""
        N = st.N
        for start in range(max(0, st.pooled_upto - N + 1), len(toks) - N + 1):
            self._put(st, tuple(toks[start:start + N]))
        st.pooled_upto = len(toks)

    # -- drafting ---------------------------------------------------------------------------
    def propose(self, seqs):
        trees, self._aux = [], []
        lookups = self._lookup.propose(seqs) if self._lookup is not None else None
        for i, s in enumerate(seqs):
            st = self._state.get(s.seq_id)
            if st is None:
                st = self._state[s.seq_id] = self._new_state(s)
            root = s.token_ids[-1]
            depth = min(st.N - 1, s.max_draft)
            paths = []
            matched = lookups is not None and lookups[i].num_nodes > 1
            if depth > 0:
                if matched:
                    # one branch: a chain (the longest-suffix match's continuation)
                    paths.append(lookups[i]._tokens_np[1:s.max_draft + 1].tolist())
                grams = None if matched and self.fallback else self._pool_get(st, root)
                if grams and st.G:
                    picked = 0
                    for cont in reversed(grams):  # most recent first
                        paths.append(cont[:depth])
                        picked += 1
                        if picked == st.G:
                            break
            # The step's node budget: the lookup chain and the guesses first (cut to fit),
            # then the Jacobi window only if all its rows fit beside them.
            tree = DraftTree.from_paths(root, paths) if paths else DraftTree.single(root)
            tree = tree.truncated(s.max_draft, s.max_nodes)
            trees.append(tree)
            if (matched and self.fallback) or tree.num_nodes + st.W * len(st.levels) > s.max_nodes:
                st.pending = 0
                self._aux.append(None)
            else:
                self._aux.append(self._window_rows(s, st))
        return trees

    def aux_rows(self, seqs):
        return self._aux

    def _window_rows(self, s, st: _SeqState):
        st.pending = 0
        if not st.levels:
            return None
        W, n = st.W, len(st.levels)
        if self._max_pos is not None and s.committed_len + W + n >= self._max_pos:
            return None  # the window would run past the position table: skip it
        tokens, offsets, sees = [], [], []
        for l, level in enumerate(st.levels):
            for c, tok in enumerate(level):
                m = (1 << (c + 1)) - 1  # level 0, columns 0 .. c
                for l2 in range(1, l + 1):
                    m |= 1 << (l2 * W + c)  # column c of the later levels up to l
                tokens.append(tok)
                offsets.append(c + l + 1)
                sees.append(m)
        st.pending = n
        return AuxRows(tuple(tokens), tuple(offsets), tuple(sees))

    def commit(self, seqs, results) -> None:
        if self._lookup is not None:
            self._lookup.commit(seqs, results)
        for s, r in zip(seqs, results):
            st = self._state.get(s.seq_id)
            if st is None or r.num_accepted < 0:
                continue
            if st.pending and r.aux_tokens is not None:
                W, n = st.W, st.pending
                newest = r.aux_tokens[(n - 1) * W:n * W]
                if n == st.N - 1:
                    for c in range(W):
                        self._put(st, tuple(st.levels[l][c] for l in range(n)) + (newest[c],))
                    st.levels = st.levels[1:] + [list(newest)]
                else:
                    st.levels.append(list(newest))
            st.pending = 0
            if self.pool_from_text:
                self._feed_text(st, s.token_ids)
