"""Draft-model proposer: a small model of the same tokenizer drafts a chain of ``k`` tokens,
sampled from its processed distribution (the target's temperature / top-k / top-p), whose
probabilities go to verification; greedy requests draft the argmax chain, or with
``tree_width = w > 1`` a top-w tree (the draft's w best first tokens, each continued greedily),
whose accepted path is compacted in the draft's cache with ``kv_rollback``. A batch may mix
both: greedy trees and sampled chains with probabilities are verified together (the op ignores
a greedy request's probabilities; docs/ops.md, "Mixed batches").

:class:`AutoregressiveDrafter` holds the loop shared with the self-speculative
proposer (``self_spec.py``, sublayers skipped): catch the draft cache up to the root, then ``k - 1`` batched
single-token steps. Subclasses say which model runs and which paged cache it writes.

Vertical cascade (Chen et al. 2023, "Cascade Speculative Drafting"): with an ``inner``
proposer (e.g. :class:`~specrt.proposers.ngram.NgramProposer`), each draft forward feeds the
last draft token followed by the inner proposer's guessed continuation of the context (real
tokens + drafts so far), one causal row each. The draft's tokens are still sampled row by row
from the draft's own processed distribution, with the same Philox offsets as without the
inner proposer; the walk moves on to the next row while the sampled token equals that row's
guess and stops at the first mismatch (the sampled token still counts). The drafts therefore
have exactly the distribution, probabilities and (greedy) tokens of plain drafting, and every
matched guess saves one draft forward. Guesses are capped so that no forward writes past the
slot plain drafting would reach (``committed + k - 1``), and a guess slot that mismatched is
always overwritten by the next forward before it is read, so the draft cache ends each step
exactly as plain drafting leaves it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..batch import AttentionMetadata
from ..kv_cache import PagedKVCache, build_metadata
from ..tree import DraftTree, batch_trees
from .base import Proposer

# The draft's Philox key is the request seed xor this salt, so draft sampling and target
# verification never share a random stream.
_DRAFT_SALT = 0x5DEECE66D


class AutoregressiveDrafter(Proposer):
    """Chain drafting with a causal LM on a paged cache (base of draft-model / layer-skip).

    Parameters
    ----------
    k : draft tokens per step (upper bound when ``adaptive``)
    adaptive : grow ``k`` by one after a fully accepted step, shrink it by one when fewer
        than half were accepted (per request, within ``[1, k]``)
    inner : optional cheaper proposer with a side-effect-free
        ``continuation(seq_id, tokens, committed_len, depth)`` (e.g. ``NgramProposer``): the
        vertical cascade of the module docstring. Same drafts, fewer draft forwards.

    Attributes
    ----------
    stats : dict
        Counters since construction: ``forwards`` (batched draft forwards), ``seq_forwards``
        (sequence-forwards, one per sequence per forward it takes part in), ``drafts`` (draft
        tokens sampled), ``guessed`` (inner guesses fed), ``guess_hits`` (guesses the draft
        confirmed = sequence-forwards saved).
    """

    def __init__(self, k: int = 4, adaptive: bool = False, inner: Optional[Proposer] = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k_max = k
        self.adaptive = adaptive
        self.inner = None
        if inner is not None:
            self.set_inner(inner)
        self._k: dict[int, int] = {}
        self._drafted: dict[int, int] = {}  # seq_id -> draft tokens offered this step
        self.stats = {"forwards": 0, "seq_forwards": 0, "drafts": 0, "guessed": 0, "guess_hits": 0}

    def set_inner(self, inner: Optional[Proposer]) -> None:
        """Make ``inner`` the vertical cascade's guesser (None: plain drafting)."""
        if inner is not None and not callable(getattr(inner, "continuation", None)):
            raise ValueError(f"inner proposer {getattr(inner, 'name', inner)!r} has no "
                             "side-effect-free continuation(seq_id, tokens, committed_len, depth) "
                             "(NgramProposer has)")
        if inner is not None and getattr(self, "tree_width", 1) > 1:
            raise ValueError("an inner proposer speeds up chain drafting only; tree_width > 1 "
                             "drafts greedy trees level by level (use tree_width=1)")
        self.inner = inner

    @property
    def forwards_saved(self) -> int:
        """Sequence-forwards of the draft model saved by the inner proposer's guesses (at
        batch 1: draft forwards saved)."""
        return self.stats["guess_hits"]

    # -- what a subclass provides ------------------------------------------------------------
    cache: PagedKVCache
    vocab_size: int

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
                 rows: torch.Tensor) -> torch.Tensor:
        """float32 logits [len(rows), V] of the draft for the given rows."""
        raise NotImplementedError

    def _cached_len(self, seq) -> int:
        """Positions of ``seq`` whose K/V the draft's cache already holds."""
        raise NotImplementedError

    # -- the loop ---------------------------------------------------------------------------
    def add(self, seq) -> None:
        self._k[seq.seq_id] = self.k_max
        if self.inner is not None:
            self.inner.add(seq)

    def release(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)
        self._drafted.pop(seq_id, None)
        if self.inner is not None:
            self.inner.release(seq_id)

    def _metadata(self, seqs, starts, counts, device) -> AttentionMetadata:
        """Metadata for ``counts[b]`` new tokens at positions ``starts[b]..`` (causal)."""
        c = self.cache
        ids = [s.seq_id for s in seqs]
        c.reserve_batch({sid: st + n for sid, st, n in zip(ids, starts, counts)})
        slots = []
        for sid, st, n in zip(ids, starts, counts):
            slots.extend(c.slot_mapping(sid, st, n))
        indptr = [0]
        for n in counts:
            indptr.append(indptr[-1] + n)
        return AttentionMetadata(
            qo_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
            seq_lens=torch.tensor([st + n for st, n in zip(starts, counts)], dtype=torch.int32, device=device),
            block_table=c.block_table(ids, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            trusted=True)

    def _guess(self, seq, drafts: list, room: int) -> list:
        """The inner proposer's continuation after ``seq``'s tokens + ``drafts`` (at most
        ``room`` tokens; empty without an inner proposer)."""
        if self.inner is None or room < 1:
            return []
        return self.inner.continuation(seq.seq_id, seq.token_ids + drafts, seq.committed_len, room)

    def propose(self, seqs):
        dev = self.cache.kv.device
        active = [s for s in seqs if min(self._k.get(s.seq_id, self.k_max), s.max_draft) > 0]
        drafts: dict[int, list] = {s.seq_id: [] for s in seqs}
        probs: dict[int, list] = {s.seq_id: [] for s in seqs}
        if active:
            st = self.stats
            ks = [min(self._k.get(s.seq_id, self.k_max), s.max_draft) for s in active]
            temp = torch.tensor([s.temperature for s in active], dtype=torch.float32, device=dev)
            top_k = torch.tensor([s.top_k for s in active], dtype=torch.int32, device=dev)
            top_p = torch.tensor([s.top_p for s in active], dtype=torch.float32, device=dev)
            seed = torch.tensor([(s.seed ^ _DRAFT_SALT) & (2**63 - 1) for s in active], dtype=torch.int64, device=dev)
            # The first forward feeds everything the draft cache lacks up to the root (usually
            # 1-2 tokens); every later one the last draft token. Both are followed by the inner
            # proposer's guesses, capped so that no slot past committed + k - 1 is written.
            live = list(range(len(active)))
            starts = [self._cached_len(s) for s in active]
            feeds = [s.token_ids[b:] for s, b in zip(active, starts)]
            guesses = [self._guess(s, [], k - 1) for s, k in zip(active, ks)]
            while live:
                counts = [len(feeds[i]) + len(guesses[i]) for i in live]
                ids = torch.tensor([t for i in live for t in feeds[i] + guesses[i]], dtype=torch.long, device=dev)
                pos = torch.cat([torch.arange(starts[i], starts[i] + n) for i, n in zip(live, counts)]).to(dev)
                # rows: the last fed token and each guess (the rows whose next token is drafted)
                rows, at = [], 0
                for i, n in zip(live, counts):
                    at += n
                    rows.extend(range(at - len(guesses[i]) - 1, at))
                meta = self._metadata([active[i] for i in live], [starts[i] for i in live], counts, dev)
                logits = self._forward(ids, pos, meta, torch.tensor(rows, dtype=torch.long, device=dev))
                st["forwards"] += 1
                st["seq_forwards"] += len(live)
                # Draft j of a request always uses Philox offset step * 64 + j.
                sel = torch.tensor([i for i in live for _ in range(len(guesses[i]) + 1)], device=dev)
                off = torch.tensor([active[i].step * 64 + len(drafts[active[i].seq_id]) + r
                                    for i in live for r in range(len(guesses[i]) + 1)],
                                   dtype=torch.int64, device=dev)
                tok, pr = ops.sample(logits, temp[sel], top_k[sel], top_p[sel], seed[sel], off,
                                     return_probs=True)
                tok_l = tok.tolist()
                nxt, r = [], 0
                for i in live:
                    s, g = active[i], guesses[i]
                    d, q = drafts[s.seq_id], probs[s.seq_id]
                    for j in range(len(g) + 1):
                        d.append(tok_l[r + j])
                        q.append(pr[r + j])
                        if len(d) == ks[i] or j == len(g) or tok_l[r + j] != g[j]:
                            break
                    st["guessed"] += len(g)
                    st["guess_hits"] += j
                    st["drafts"] += j + 1
                    r += len(g) + 1
                    if len(d) < ks[i]:
                        # d_t sits at position committed + t: the next forward starts there
                        nxt.append(i)
                        starts[i] = s.committed_len + len(d)
                        feeds[i] = [d[-1]]
                        guesses[i] = self._guess(s, d, ks[i] - len(d) - 1)
                live = nxt
        trees = []
        tv = self.target_vocab
        for s in seqs:
            d = drafts[s.seq_id]
            self._drafted[s.seq_id] = len(d)
            if not d:
                trees.append(DraftTree.single(s.token_ids[-1]))
                continue
            q = torch.stack(probs[s.seq_id])
            if q.shape[1] != tv:
                q = torch.nn.functional.pad(q, (0, tv - q.shape[1])) if q.shape[1] < tv else None
                if q is None:
                    raise ValueError("draft vocabulary is larger than the target's")
            trees.append(DraftTree.chain(s.token_ids[-1], d, draft_probs=q))
        return trees

    def commit(self, seqs, results) -> None:
        for s, r in zip(seqs, results):
            k = self._drafted.get(s.seq_id, 0)
            if self.adaptive and k and r.num_accepted >= 0:
                cur = self._k.get(s.seq_id, self.k_max)
                if r.num_accepted >= k:
                    cur = min(self.k_max, cur + 1)
                elif 2 * r.num_accepted < k:
                    cur = max(1, cur - 1)
                self._k[s.seq_id] = cur
            self._after_commit(s, r, k)

    def _after_commit(self, seq, result, drafted: int) -> None:
        """Roll the draft cache back to what stays valid (subclass hook)."""

    target_vocab: int = 0


class DraftModelProposer(AutoregressiveDrafter):
    """A separate (smaller) model with its own paged cache drafts chains (or top-w trees for
    greedy requests).

    Parameters
    ----------
    draft : specrt native model (same tokenizer as the target)
    target_vocab : the target's vocabulary size (draft probabilities are padded to it)
    k, adaptive : see :class:`AutoregressiveDrafter`
    tree_width : greedy requests draft ``tree_width`` branches of depth ``k`` (1 = a chain)
    num_pages, page_size : the draft's own cache
    inner : vertical cascade guesser (chains only: refused with ``tree_width > 1``); see
        :class:`AutoregressiveDrafter`
    """

    name = "draft"

    def __init__(self, draft, target_vocab: int, k: int = 4, adaptive: bool = False,
                 num_pages: int = 4096, page_size: int = 16, tree_width: int = 1,
                 inner: Optional[Proposer] = None):
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        self.tree_width = tree_width
        self.drafts_trees = tree_width > 1
        super().__init__(k, adaptive, inner)
        self._trees: dict = {}  # seq_id -> (tree, depth k) drafted as a tree this step
        if draft.config.vocab_size > target_vocab:
            raise ValueError(f"draft vocabulary ({draft.config.vocab_size}) is larger than the "
                             f"target's ({target_vocab}): not the same tokenizer")
        self.model = draft
        self.target_vocab = target_vocab
        cfg = draft.config
        p = next(draft.parameters())
        self.cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size,
                                  num_pages, p.dtype, p.device)

    def add(self, seq) -> None:
        super().add(seq)
        self.cache.add_sequence(seq.seq_id)

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        if self.cache.has(seq_id):
            self.cache.free(seq_id)

    def _cached_len(self, seq) -> int:
        return self.cache.committed_len(seq.seq_id)

    def _forward(self, ids, pos, meta, rows):
        return self.model(ids, pos, self.cache.kv, meta, logits_rows=rows).logits

    def propose(self, seqs):
        self._trees.clear()
        widths = [self._width(s) for s in seqs]
        chains = iter(super().propose([s for s, w in zip(seqs, widths) if w < 2]))
        return [self._propose_tree(s, w) if w > 1 else next(chains) for s, w in zip(seqs, widths)]

    @property
    def max_depth(self) -> int:
        return self.k_max

    def _width(self, s) -> int:
        """Branches of this step's tree: ``tree_width`` for greedy requests, fewer when the
        node budget (``1 + width * depth``) is smaller; 1 (a chain) for sampled ones."""
        if self.tree_width < 2 or s.temperature != 0 or s.max_draft < 1:
            return 1
        k = min(self._k.get(s.seq_id, self.k_max), s.max_draft)
        return max(1, min(self.tree_width, (s.max_nodes - 1) // k))

    def _propose_tree(self, seq, w: int) -> DraftTree:
        """Top-w tree in breadth-first node order: node ``1 + (j-1)*w + i`` is branch ``i`` at
        depth ``j``. Each level re-runs the tree drafted so far (new tokens = every node, with
        its tree mask), so node ``i`` always sits at cache slot ``committed + i``."""
        dev = self.cache.kv.device
        sid, c, root = seq.seq_id, seq.committed_len, seq.token_ids[-1]
        k = min(self._k.get(sid, self.k_max), seq.max_draft)
        dc = self.cache.committed_len(sid)
        if dc < c:  # catch up on the committed prefix the draft has not seen
            meta = self._metadata([seq], [dc], [c - dc], dev)
            self.model(torch.tensor(seq.token_ids[dc:c], device=dev), torch.arange(dc, c, device=dev),
                       self.cache.kv, meta, logits_rows=torch.empty(0, dtype=torch.long, device=dev))
            self.cache.commit(sid, c)
        tokens, parents = [root], [-1]
        for depth in range(k):
            tree = DraftTree(tokens, parents)
            tb = batch_trees([tree], [c], device=dev)
            meta = build_metadata(self.cache, [sid], tb, dev)
            leaves = list(range(len(tokens) - (w if depth else 1), len(tokens)))
            logits = self.model(tb.tokens.long(), tb.positions, self.cache.kv, meta,
                                logits_rows=torch.tensor(leaves, device=dev)).logits
            if depth == 0:
                nxt = logits[0].topk(min(w, logits.shape[1])).indices.tolist()
                new_parents = [0] * len(nxt)
                w = len(nxt)
            else:
                nxt = logits.argmax(dim=-1).tolist()
                new_parents = leaves
            tokens += nxt
            parents += new_parents
        tree = DraftTree(tokens, parents)
        self._trees[sid] = (tree, k)
        self._drafted[sid] = k
        return tree

    def _after_commit(self, seq, result, drafted: int) -> None:
        if result.num_accepted < 0 or drafted == 0:
            return
        if seq.seq_id in self._trees:
            tree, k = self._trees.pop(seq.seq_id)
            path = list(result.path)
            if int(tree.depths[path[-1]]) == k:
                path = path[:-1]  # the deepest level was drafted but never run
            dev = self.cache.kv.device
            lens = torch.tensor([seq.committed_len], dtype=torch.int32, device=dev)
            ops.kv_rollback(self.cache.kv, self.cache.block_table([seq.seq_id], device=dev), lens,
                            # the op reads the path's width as the tree size
                            torch.tensor([path + [-1] * (tree.num_nodes - len(path))],
                                         dtype=torch.int32, device=dev),
                            torch.tensor([len(path) - 1], dtype=torch.int32, device=dev))
            self.cache.commit(seq.seq_id, seq.committed_len + len(path))
            self.cache.trim(seq.seq_id)
            return
        # The draft wrote root, d1..d_{k-1} at positions c..c+k-1 (a chain: already in place);
        # what stays valid is the root plus the accepted drafts it actually ran on.
        self.cache.commit(seq.seq_id, seq.committed_len + min(result.num_accepted, drafted - 1) + 1)
        self.cache.trim(seq.seq_id)
