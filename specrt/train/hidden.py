"""Frozen-target hidden states, computed once and cached on disk.

A cache entry is a directory ``<cache_dir>/<key>/`` with ``tokens.npy`` (int32 [N, S], PAD =
-1), ``hidden.npy`` (final-normed hidden states, [N, S, H], float16, or bfloat16 stored as
uint16), ``meta.json`` and a ``DONE`` marker written last. The key hashes the target's
identity, the token rows themselves (so any change of data, split, cap or sequence length is a
new entry), the feature kind and the storage dtype. Under ``torch.distributed`` every rank
computes the rows ``i % world == rank`` into the shared memmap (one node / a shared file
system); all ranks run the same number of forwards, as FSDP's collectives require.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..kv_cache import PagedKVCache, build_metadata
from . import dist
from .data import PAD

__all__ = ["HiddenCache", "final_hidden", "compute_hidden_cache", "model_fingerprint"]

_PAGE = 16


def model_fingerprint(model, model_path: Optional[str] = None) -> str:
    """Identity of a target for cache keys: its path and file size, or (no path) a hash of its
    config and embedding weights."""
    if model_path:
        p = Path(model_path)
        size = p.stat().st_size if p.is_file() else sum(
            f.stat().st_size for f in p.rglob("*") if f.is_file())
        return f"path:{p.resolve()}:{size}"
    h = hashlib.sha256(repr(model.config).encode())
    for t in (model.embed_tokens, model.norm.weight):  # root tensors (never FSDP-sharded)
        h.update(t.detach().float().cpu().reshape(-1)[:65536].numpy().tobytes())
    return "weights:" + h.hexdigest()[:16]


@torch.no_grad()
def final_hidden(model, rows: list, device) -> list:
    """Final-normed hidden states of a ragged batch of token lists (one causal prefill):
    a list of [n_i, H] tensors. The decoder loop mirrors :meth:`LlamaModel.forward` without
    its LM head (the features are all we need)."""
    cfg = model.config
    counts = [len(r) for r in rows]
    pages = sum(-(-c // _PAGE) for c in counts)
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, _PAGE, max(pages, 1),
                         dtype=model.dtype, device=device)
    ids = list(range(len(rows)))
    for s in ids:
        cache.add_sequence(s)
    meta = build_metadata(cache, ids, counts, device)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(c, dtype=torch.long) for c in counts]).to(device)
    cos = model.rope_cos[pos].unsqueeze(1)
    sin = model.rope_sin[pos].unsqueeze(1)
    x = F.embedding(flat, model.embed_tokens)
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, cache.kv[i, 0], cache.kv[i, 1], meta)
    x = model.norm(x)
    return list(torch.split(x, counts))


class HiddenCache:
    """A finished cache entry: ``tokens`` int32 [N, S] and ``hidden`` [N, S, H] memmaps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self.hidden = np.load(self.path / "hidden.npy", mmap_mode="r")
        self.bf16 = self.meta["dtype"] == "bfloat16"

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, idx, device="cpu", dtype=torch.float32) -> tuple:
        """(tokens int64 [b, S], hidden [b, S, H]) of rows ``idx`` (any order)."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(idx))
        tok = np.asarray(self.tokens[idx[order]])[inv]
        hid = np.asarray(self.hidden[idx[order]])[inv]
        h = torch.from_numpy(np.ascontiguousarray(hid))
        h = h.view(torch.bfloat16) if self.bf16 else h
        return (torch.from_numpy(tok.astype(np.int64)).to(device),
                h.to(device=device, dtype=dtype))


def _key(fingerprint: str, tokens: np.ndarray, kind: str, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(f"{fingerprint}|{kind}|{dtype}|{tokens.shape}".encode())
    h.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return h.hexdigest()[:24]


def compute_hidden_cache(model, tokens: np.ndarray, cache_dir, *, fingerprint: str,
                         name: str = "data", dtype: str = "float16",
                         tokens_per_batch: int = 4096, device="cpu",
                         log=print) -> HiddenCache:
    """The cache entry for ``tokens`` (int32 [N, S]), computing it if absent."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"hidden-state dtype must be float16 or bfloat16, got {dtype!r}")
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n, s = tokens.shape
    if n == 0:
        raise ValueError(f"{name}: no rows to compute hidden states for")
    key = _key(fingerprint, tokens, "final_norm", dtype)
    path = Path(cache_dir) / key
    if (path / "DONE").is_file():
        log(f"[train] {name}: hidden states cached at {path}")
        return HiddenCache(path)
    rank, world = dist.rank(), dist.world_size()
    hsize = model.config.hidden_size
    npdt = np.float16 if dtype == "float16" else np.uint16
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "tokens.npy", tokens)
        np.lib.format.open_memmap(path / "hidden.npy", mode="w+", dtype=npdt,
                                  shape=(n, s, hsize)).flush()
    dist.barrier()
    out = np.load(path / "hidden.npy", mmap_mode="r+")
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    rows_per_batch = max(1, tokens_per_batch // s)
    nb = -(-per_rank // rows_per_batch)
    t0 = time.perf_counter()
    done_tok = 0
    total_tok = int((tokens != PAD).sum())
    for b in range(nb):
        idx = mine[b * rows_per_batch:(b + 1) * rows_per_batch]
        seqs = []
        for i in idx:
            row = tokens[i]
            seqs.append(row[row != PAD].tolist() or [0])
        if not seqs:  # keep the forward count equal on every rank (FSDP collectives)
            final_hidden(model, [[0]], device)
            continue
        hs = final_hidden(model, seqs, device)
        for i, h in zip(idx, hs):
            if dtype == "float16":
                a = h.float().clamp_(-65504, 65504).half().cpu().numpy()
            else:
                a = h.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
            out[i, :a.shape[0]] = a
            out[i, a.shape[0]:] = 0
            done_tok += int((tokens[i] != PAD).sum())
        dt = time.perf_counter() - t0
        if rank == 0 and (b % 5 == 0 or b == nb - 1):
            rate = done_tok / max(dt, 1e-9)
            left = (total_tok / world - done_tok) / max(rate, 1e-9)
            log(f"[train] {name}: hidden states batch {b + 1}/{nb}, {done_tok * world} / "
                f"{total_tok} tokens, {rate * world:.0f} tok/s, ETA {max(left, 0):.0f}s")
    out.flush()
    del out
    dist.barrier()
    if rank == 0:
        (path / "meta.json").write_text(json.dumps(
            {"name": name, "rows": n, "seq_len": s, "hidden_size": hsize, "dtype": dtype,
             "fingerprint": fingerprint, "tokens": total_tok}, indent=2) + "\n")
        (path / "DONE").write_text("ok\n")
    dist.barrier()
    return HiddenCache(path)


def default_cache_dir() -> Path:
    base = os.environ.get("SPECRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specrt")
    return Path(base) / "train-cache"

