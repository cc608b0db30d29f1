"""Draft-model proposer: a small model of the same tokenizer drafts a chain of ``k`` tokens,
sampled from its processed distribution (the target's temperature / top-k / top-p), whose
probabilities go to verification; greedy requests draft the argmax chain, or with
``tree_width = w > 1`` a top-w tree (the draft's w best first tokens, each continued greedily),
whose accepted path is compacted in the draft's cache with ``kv_rollback``. A batch may mix
both: greedy trees and sampled chains with probabilities are verified together (the op ignores
a greedy request's probabilities; docs/ops.md, "Mixed batches").

:class:`AutoregressiveDrafter` holds the loop shared with the self-speculative layer-skip
proposer (``layer_skip.py``): catch the draft cache up to the root, then ``k - 1`` batched
single-token steps. Subclasses say which model runs and which paged cache it writes.
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
    """

    def __init__(self, k: int = 4, adaptive: bool = False):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k_max = k
        self.adaptive = adaptive
        self._k: dict[int, int] = {}
        self._drafted: dict[int, int] = {}  # seq_id -> draft tokens offered this step

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

    def release(self, seq_id: int) -> None:
        self._k.pop(seq_id, None)
        self._drafted.pop(seq_id, None)

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

    def propose(self, seqs):
        dev = self.cache.kv.device
        active = [s for s in seqs if min(self._k.get(s.seq_id, self.k_max), s.max_draft) > 0]
        drafts: dict[int, list] = {s.seq_id: [] for s in seqs}
        probs: dict[int, list] = {s.seq_id: [] for s in seqs}
        if active:
            ks = [min(self._k.get(s.seq_id, self.k_max), s.max_draft) for s in active]
            temp = torch.tensor([s.temperature for s in active], dtype=torch.float32, device=dev)
            top_k = torch.tensor([s.top_k for s in active], dtype=torch.int32, device=dev)
            top_p = torch.tensor([s.top_p for s in active], dtype=torch.float32, device=dev)
            seed = torch.tensor([(s.seed ^ _DRAFT_SALT) & (2**63 - 1) for s in active], dtype=torch.int64, device=dev)
            # Step 0 feeds everything the draft cache lacks up to the root (usually 1-2 tokens).
            starts = [self._cached_len(s) for s in active]
            toks = [s.token_ids[st:] for s, st in zip(active, starts)]
            counts = [len(t) for t in toks]
            ids = torch.tensor([t for tt in toks for t in tt], dtype=torch.long, device=dev)
            pos = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, counts)]).to(dev)
            last = torch.tensor(counts, device=dev).cumsum(0) - 1
            meta = self._metadata(active, starts, counts, dev)
            logits = self._forward(ids, pos, meta, last)
            live = list(range(len(active)))
            ends = [st + n for st, n in zip(starts, counts)]
            for j in range(max(ks)):
                off = torch.tensor([s.step * 64 + j for s in (active[i] for i in live)], dtype=torch.int64, device=dev)
                tok, pr = ops.sample(logits, temp[live], top_k[live], top_p[live], seed[live], off,
                                     return_probs=True)
                tok_l = tok.tolist()
                for r, i in enumerate(live):
                    sid = active[i].seq_id
                    drafts[sid].append(tok_l[r])
                    probs[sid].append(pr[r])
                live_next = [i for i in live if len(drafts[active[i].seq_id]) < ks[i]]
                if not live_next:
                    break
                sel = [live.index(i) for i in live_next]
                live = live_next
                ids = torch.tensor([tok_l[r] for r in sel], dtype=torch.long, device=dev)
                pos = torch.tensor([ends[i] for i in live], dtype=torch.long, device=dev)
                meta = self._metadata([active[i] for i in live], [ends[i] for i in live], [1] * len(live), dev)
                for i in live:
                    ends[i] += 1
                logits = self._forward(ids, pos, meta, torch.arange(len(live), device=dev))
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
    """

    name = "draft"

    def __init__(self, draft, target_vocab: int, k: int = 4, adaptive: bool = False,
                 num_pages: int = 4096, page_size: int = 16, tree_width: int = 1):
        super().__init__(k, adaptive)
        if tree_width < 1:
            raise ValueError(f"tree_width must be >= 1, got {tree_width}")
        self.tree_width = tree_width
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
        as_tree = [self.tree_width > 1 and s.temperature == 0 and s.max_draft > 0 for s in seqs]
        chains = iter(super().propose([s for s, t in zip(seqs, as_tree) if not t]))
        return [self._propose_tree(s) if t else next(chains) for s, t in zip(seqs, as_tree)]

    def _propose_tree(self, seq) -> DraftTree:
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
        w = self.tree_width
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
