"""Paged KV cache: one tensor per model, a free-page pool, and per-sequence page lists.

Layout (docs/ops.md): ``kv[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]``;
logical position ``p`` of a sequence lives at page ``pages[p // page_size]``, offset
``p % page_size``, i.e. slot ``page * page_size + offset``.

Bookkeeping is host-only (plain lists and ints): the ops read block tables and slot mappings
built here, so allocation never touches the device. Allocation is all-or-nothing: a request the
pool cannot satisfy raises :class:`OutOfPagesError` and leaves every sequence and the pool as
they were, so the engine can preempt and retry. Pages are never shared between live sequences.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from specrt.attention_plan import AttentionPlanner
from specrt.batch import AttentionMetadata
from specrt.tree import TreeBatch

__all__ = ["OutOfPagesError", "PagedKVCache", "build_metadata"]

SeqId = Hashable
Device = Union[str, torch.device, None]


class OutOfPagesError(RuntimeError):
    """The page pool cannot back the requested lengths; nothing was allocated."""


class _Seq:
    __slots__ = ("pages", "committed", "_pages_np")

    def __init__(self):
        self.pages: list[int] = []
        self.committed = 0
        self._pages_np: Optional[np.ndarray] = None

    def pages_np(self) -> np.ndarray:
        # Page lists change only when a page boundary is crossed; cache the array form that
        # block tables and slot mappings gather from.
        if self._pages_np is None:
            self._pages_np = np.asarray(self.pages, dtype=np.int64)
        return self._pages_np


class PagedKVCache:
    """Page pool + per-sequence page tables over one ``kv`` tensor.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
    page_size : int
        Tokens per page, a power of two in ``1 .. 128``.
    num_pages : int
    dtype : torch.dtype
    device : torch device

    Attributes
    ----------
    kv : [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]
        Uninitialised storage (``torch.empty``); ``kv[l, 0]`` / ``kv[l, 1]`` are layer ``l``'s
        K / V caches as the ops take them.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                 num_pages: int, dtype: torch.dtype = torch.float16, device: Device = "cpu"):
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("num_pages", num_pages)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_page_size(page_size)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self._num_pages = num_pages
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.empty(num_layers, 2, num_pages, page_size, num_kv_heads, head_dim,
                              dtype=dtype, device=self.device)
        # Stack: pop() hands out low page ids first on a fresh cache, and a freed page is the
        # next one reused (warm in L2 / TLB).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._seqs: dict[SeqId, _Seq] = {}

    @classmethod
    def from_budget(cls, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                    dtype: torch.dtype = torch.float16, device: Device = "cuda", *,
                    memory_bytes: Optional[int] = None,
                    memory_fraction: Optional[float] = None) -> "PagedKVCache":
        """As many pages as fit in ``memory_bytes``, or in ``memory_fraction`` of the device's
        currently free memory (CUDA only). Exactly one of the two must be given."""
        if (memory_bytes is None) == (memory_fraction is None):
            raise ValueError("give exactly one of memory_bytes or memory_fraction")
        _check_page_size(page_size)
        dev = torch.device(device)
        if memory_fraction is not None:
            if not 0 < memory_fraction <= 1:
                raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
            if dev.type != "cuda":
                raise ValueError(f"memory_fraction needs a CUDA device (got {dev}); "
                                 f"give memory_bytes instead")
            free, _total = torch.cuda.mem_get_info(dev)
            memory_bytes = int(free * memory_fraction)
        if memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {memory_bytes}")
        per_page = _bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
        num_pages = memory_bytes // per_page
        if num_pages < 1:
            raise ValueError(f"budget of {memory_bytes} bytes holds no page "
                             f"({per_page} bytes per page)")
        return cls(num_layers, num_kv_heads, head_dim, page_size, int(num_pages), dtype, dev)

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page over all layers, K and V."""
        return _bytes_per_page(self.num_layers, self.num_kv_heads, self.head_dim,
                               self.page_size, self.dtype)

    def pages_needed(self, total_len: int) -> int:
        """Pages that back positions ``0 .. total_len - 1``."""
        if total_len < 0:
            raise ValueError(f"length must be >= 0, got {total_len}")
        return (total_len + self.page_size - 1) >> self._shift

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` views of layer ``i``: ``[num_pages, page_size, Hkv, D]``."""
        return self.kv[i, 0], self.kv[i, 1]

    # ---- sequences ------------------------------------------------------------------------

    def add_sequence(self, seq_id: SeqId) -> None:
        """Register an empty sequence (no pages, committed length 0)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._seqs[seq_id] = _Seq()

    def has(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    __contains__ = has

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[SeqId]:
        return list(self._seqs)

    def committed_len(self, seq_id: SeqId) -> int:
        return self._get(seq_id).committed

    def capacity(self, seq_id: SeqId) -> int:
        """Positions currently backed by the sequence's pages."""
        return len(self._get(seq_id).pages) << self._shift

    def pages(self, seq_id: SeqId) -> list[int]:
        """A copy of the sequence's page ids, in position order."""
        return list(self._get(seq_id).pages)

    def reserve(self, seq_id: SeqId, total_len: int) -> None:
        """Back positions ``< total_len`` with pages (never shrinks; see :meth:`trim`).

        Raises :class:`OutOfPagesError` and allocates nothing when the pool is short.
        """
        self.reserve_batch({seq_id: total_len})

    def reserve_batch(self, total_lens: Mapping[SeqId, int]) -> None:
        """:meth:`reserve` for several sequences, all-or-nothing across the batch."""
        plan = []
        need_total = 0
        mask, shift = self.page_size - 1, self._shift
        for seq_id, total_len in total_lens.items():
            seq = self._seqs.get(seq_id)  # mapping keys are hashable
            if seq is None:
                self._get(seq_id)  # raises the KeyError
            if total_len < 0:
                raise ValueError(f"length must be >= 0, got {total_len} for {seq_id!r}")
            need = ((total_len + mask) >> shift) - len(seq.pages)
            if need > 0:
                plan.append((seq, need))
                need_total += need
        if need_total > len(self._free):
            raise OutOfPagesError(
                f"out of KV pages: {len(total_lens)} sequence(s) need {need_total} more "
                f"page(s) of {self.page_size} tokens, only {len(self._free)} of "
                f"{self._num_pages} are free (nothing was allocated)")
        free = self._free
        for seq, need in plan:
            seq.pages.extend(free[-need:][::-1])
            del free[-need:]
            seq._pages_np = None

    def commit(self, seq_id: SeqId, new_len: int) -> None:
        """Set the committed length (after rollback); it must be backed by reserved pages."""
        seq = self._get(seq_id)
        if not isinstance(new_len, (int, np.integer)) or new_len < 0:
            raise ValueError(f"committed length must be an int >= 0, got {new_len!r}")
        cap = len(seq.pages) << self._shift
        if new_len > cap:
            raise ValueError(f"cannot commit {new_len} positions for sequence {seq_id!r}: only "
                             f"{cap} are reserved")
        seq.committed = int(new_len)

    def trim(self, seq_id: SeqId) -> int:
        """Return the pages past what the committed length needs; returns how many."""
        seq = self._get(seq_id)
        keep = self.pages_needed(seq.committed)
        extra = seq.pages[keep:]
        if extra:
            del seq.pages[keep:]
            # Reversed so the lowest page of the tail is handed out first next time.
            self._free.extend(reversed(extra))
            seq._pages_np = None
        return len(extra)

    def free(self, seq_id: SeqId) -> int:
        """Drop the sequence and return all its pages; returns how many."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        self._free.extend(reversed(seq.pages))
        return len(seq.pages)

    # ---- tensors for the ops ----------------------------------------------------------------

    def slot_mapping(self, seq_id: SeqId, start: int, n: int,
                     device: Device = None) -> torch.Tensor:
        """int64 [n]: slots of positions ``start .. start + n - 1`` (which must be reserved)."""
        seq = self._get(seq_id)
        if start < 0 or n < 0:
            raise ValueError(f"slot_mapping needs start >= 0 and n >= 0, got {start}, {n}")
        cap = len(seq.pages) << self._shift
        if start + n > cap:
            raise ValueError(f"positions {start}..{start + n - 1} of sequence {seq_id!r} are "
                             f"not reserved (capacity {cap})")
        pos = np.arange(start, start + n, dtype=np.int64)
        slots = (seq.pages_np()[pos >> self._shift] << self._shift) | (pos & (self.page_size - 1))
        return torch.from_numpy(slots).to(device or "cpu")

    def block_table(self, seq_ids: Sequence[SeqId], device: Device = None,
                    width: Optional[int] = None) -> torch.Tensor:
        """int32 [B, width]: page ids per sequence, ``-1`` past each allocation.

        ``width`` defaults to the longest page list (at least 1); pass a fixed width for
        CUDA-graph buckets (it must hold every sequence's pages).
        """
        return torch.from_numpy(self._block_table_np(seq_ids, width)).to(device or "cpu")

    def committed_lens(self, seq_ids: Sequence[SeqId], device: Device = None) -> torch.Tensor:
        """int32 [B]."""
        lens = [self._get(s).committed for s in seq_ids]
        return torch.tensor(lens, dtype=torch.int32, device=device or "cpu")

    def _block_table_np(self, seq_ids: Sequence[SeqId], width: Optional[int]) -> np.ndarray:
        seqs = [self._get(s) for s in seq_ids]
        counts = np.fromiter((len(s.pages) for s in seqs), dtype=np.int64, count=len(seqs))
        width = _table_width(int(counts.max()) if len(seqs) else 0, width)
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        total = int(counts.sum())
        if total:
            flat = np.concatenate([s.pages_np() for s in seqs])
            # A boolean mask assigns in row-major order, i.e. exactly the concatenation order.
            table[np.arange(width) < counts[:, None]] = flat
        return table

    def _get(self, seq_id: SeqId) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None
        except TypeError:
            raise KeyError(f"unknown sequence {seq_id!r} (not hashable)") from None

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, "
                f"pages={self.num_free_pages}/{self._num_pages} free, seqs={len(self._seqs)}, "
                f"dtype={self.dtype}, device={self.device})")


def _table_width(longest: int, width: Optional[int]) -> int:
    """Block-table width: ``width`` if given (it must hold ``longest`` pages), else the
    longest page list (at least 1)."""
    if width is None:
        return max(1, longest)
    if width < longest:
        raise ValueError(f"block table width {width} is too small: a sequence holds "
                         f"{longest} pages")
    return width


def _check_page_size(page_size: int):
    if not isinstance(page_size, int) or not 1 <= page_size <= 128 \
            or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two in 1..128, got {page_size!r}")


def _bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * page_size * num_kv_heads * head_dim * elem


# NOTE: below this many new tokens (decode and verify steps) plain Python lists beat numpy's
# per-call overhead; prefills take the vectorised path. Both give the same tensors
# (tests/test_kv_cache.py checks it).
_SMALL_STEP_TOKENS = 256


def _small_step_metadata(cache, seq_ids, committed, counts, dev, width, planner, mask):
    pages = [cache._get(s).pages for s in seq_ids]
    width = _table_width(max(len(p) for p in pages), width)
    shift, low = cache._shift, cache.page_size - 1
    indptr, slots, seq_lens = [0], [], []
    for pg, c, t in zip(pages, committed, counts):
        slots.extend((pg[p >> shift] << shift) | (p & low) for p in range(c, c + t))
        indptr.append(indptr[-1] + t)
        seq_lens.append(c + t)
    plan = workspace = None
    if planner is not None:
        plan, workspace = planner.plan(indptr, seq_lens)
    return AttentionMetadata(
        qo_indptr=torch.tensor(indptr, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_table=torch.tensor([p + [-1] * (width - len(p)) for p in pages], dtype=torch.int32,
                                 device=dev),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        mask=mask,
        plan=plan,
        workspace=workspace,
        trusted=True,
    )


def build_metadata(cache: PagedKVCache, seq_ids: Sequence[SeqId],
                   new_tokens: Union[TreeBatch, Iterable[int]], device: Device = None, *,
                   block_table_width: Optional[int] = None,
                   planner: Optional[AttentionPlanner] = None,
                   mask: Optional[torch.Tensor] = None) -> AttentionMetadata:
    """Reserve pages for one forward and describe where its new tokens go.

    For sequence ``b`` with committed length ``c_b`` and ``T_b`` new tokens: pages are
    reserved for ``c_b + T_b`` positions (all-or-nothing over the batch; raises
    :class:`OutOfPagesError` and allocates nothing), the new tokens' K/V go to positions
    ``c_b .. c_b + T_b - 1`` in node order, ``seq_lens = c_b + T_b``.

    Parameters
    ----------
    cache : PagedKVCache
    seq_ids : sequence of B distinct sequence ids
    new_tokens : TreeBatch or sequence of B ints
        A :func:`specrt.tree.batch_trees` result (its mask is used; None for chains), or the
        new-token counts of a plain (causal) forward such as a prefill. A TreeBatch must have
        been built from the cache's current committed lengths.
    device : torch device, optional
        Where the tensors go (default: the cache's device).
    block_table_width : int, optional
        Fixed block-table width (CUDA-graph buckets).
    mask : int32 [N, W], optional
        Packed visibility of new tokens given as counts (e.g. a tree batch with Lookahead's
        auxiliary rows, :func:`specrt.tree.with_aux_rows`); a TreeBatch brings its own.
    planner : AttentionPlanner, optional
        Writes the CUDA split-KV plan of this forward into its preallocated buffers, from the
        host lengths computed here (no device read); every layer reuses it. Give it for CUDA
        verify / decode steps (the engine does); a prefill never splits (the chunk is at least
        ``2 * max_T`` keys), and the CPU op ignores a plan.

    Returns
    -------
    AttentionMetadata
        ``plan`` / ``workspace`` from ``planner``, else None.
    """
    dev = cache.device if device is None else torch.device(device)
    seq_ids = list(seq_ids)
    b = len(seq_ids)
    if b == 0:
        raise ValueError("build_metadata needs at least one sequence")
    if len(set(seq_ids)) != b:
        raise ValueError("build_metadata: duplicate sequence ids in the batch")
    committed = [cache.committed_len(s) for s in seq_ids]
    if isinstance(new_tokens, TreeBatch):
        if mask is not None:
            raise ValueError("build_metadata: a TreeBatch brings its own mask")
        counts = list(new_tokens.num_nodes)
        if new_tokens.committed_lens != committed:
            raise ValueError("the TreeBatch was built for committed lengths "
                             f"{new_tokens.committed_lens}, the cache has {committed}")
        if new_tokens.mask is not None:
            mask = new_tokens.mask.to(dev)
    else:
        counts = [int(t) for t in new_tokens]
        if any(t < 0 for t in counts):
            raise ValueError(f"new-token counts must be >= 0, got {counts}")
        if mask is not None:
            if mask.dim() != 2 or mask.shape[0] != sum(counts) or mask.dtype != torch.int32:
                raise ValueError(f"mask must be int32 [{sum(counts)}, W], got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(dev)
    if len(counts) != b:
        raise ValueError(f"{b} sequences but {len(counts)} new-token counts")

    cache.reserve_batch({s: c + t for s, c, t in zip(seq_ids, committed, counts)})

    if sum(counts) <= _SMALL_STEP_TOKENS:
        return _small_step_metadata(cache, seq_ids, committed, counts, dev, block_table_width,
                                    planner, mask)
    table = cache._block_table_np(seq_ids, block_table_width)
    t_arr = np.asarray(counts, dtype=np.int64)
    indptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(t_arr, out=indptr[1:])
    n = int(indptr[-1])
    rows = np.repeat(np.arange(b), t_arr)
    pos = np.repeat(np.asarray(committed, dtype=np.int64) - indptr[:-1], t_arr) + np.arange(n)
    shift = cache._shift
    slots = (table[rows, pos >> shift].astype(np.int64) << shift) | (pos & (cache.page_size - 1))
    seq_lens = np.asarray(committed, dtype=np.int64) + t_arr
    plan = workspace = None
    if planner is not None:
        plan, workspace = planner.plan(indptr, seq_lens)

    return AttentionMetadata(
        qo_indptr=torch.from_numpy(indptr).to(device=dev, dtype=torch.int32),
        seq_lens=torch.from_numpy(seq_lens).to(device=dev, dtype=torch.int32),
        block_table=torch.from_numpy(table).to(dev),
        slot_mapping=torch.from_numpy(slots).to(dev),
        mask=mask,
        plan=plan,
        workspace=workspace,
        trusted=True,
    )
