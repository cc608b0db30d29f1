"""Frozen-target hidden states, computed once and cached on disk.

A cache entry is a directory ``<cache_dir>/<key>/`` with ``tokens.npy`` (int32 [N, S], PAD =
-1), ``hidden.npy`` (final-normed hidden states, [N, S, H], float16, or bfloat16 stored as
uint16), ``meta.json`` and a ``DONE`` marker written last. The key hashes the target's
identity, the token rows themselves (so any change of data, split, cap or sequence length is a
new entry), the feature kind and the storage dtype.

Kinds: ``"final_norm"`` (Medusa, EAGLE-1) stores the above only. ``"eagle3"`` also stores
``features.npy`` ([N, S, 3H], same dtype: the residual stream entering the EAGLE-3 feature
layers, concatenated in layer order) and ``argmax.npy`` (int32 [N, S]: the target's greedy
next token over its full vocabulary at each position, -1 on padding); its key names the
feature layers. Under ``torch.distributed`` every rank
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

__all__ = ["HiddenCache", "final_hidden", "target_states", "compute_hidden_cache",
           "model_fingerprint", "KINDS"]

#: cache kinds (what is stored besides tokens and final-normed hidden states)
KINDS = ("final_norm", "eagle3")

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
    return target_states(model, rows, device)[0]


@torch.no_grad()
def target_states(model, rows: list, device, aux_layers: tuple = ()) -> tuple:
    """``(hidden, aux)`` of a ragged batch of token lists (one causal prefill): ``hidden`` a
    list of final-normed [n_i, H] tensors, ``aux`` (``aux_layers`` given) a list of
    [n_i, len(aux_layers) * H] tensors, the concatenated outputs (residual stream) of layers
    ``aux_layers`` (what ``LlamaModel.forward(..., hidden_layers=...)`` returns in
    ``aux_hidden``), else None."""
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
    aux: list = [None] * len(aux_layers)
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, cache.kv[i, 0], cache.kv[i, 1], meta)
        for j, l in enumerate(aux_layers):
            if l == i:
                aux[j] = x
    x = model.norm(x)
    hid = list(torch.split(x, counts))
    if not aux_layers:
        return hid, None
    if any(a is None for a in aux):
        raise ValueError(f"aux layers {aux_layers} outside the target's {len(model.layers)} "
                         "layers")
    return hid, list(torch.split(torch.cat(aux, dim=-1), counts))


class HiddenCache:
    """A finished cache entry: ``tokens`` int32 [N, S] and ``hidden`` [N, S, H] memmaps (kind
    ``"eagle3"``: also ``features`` [N, S, 3H] and ``argmax`` int32 [N, S])."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.kind = self.meta.get("kind", "final_norm")
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self.hidden = np.load(self.path / "hidden.npy", mmap_mode="r")
        self.features = (np.load(self.path / "features.npy", mmap_mode="r")
                         if (self.path / "features.npy").is_file() else None)
        self.argmax = (np.load(self.path / "argmax.npy", mmap_mode="r")
                       if (self.path / "argmax.npy").is_file() else None)
        self.bf16 = self.meta["dtype"] == "bfloat16"

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _float(self, a: np.ndarray, device, dtype) -> torch.Tensor:
        h = torch.from_numpy(np.ascontiguousarray(a))
        h = h.view(torch.bfloat16) if self.bf16 else h
        return h.to(device=device, dtype=dtype)

    def batch(self, idx, device="cpu", dtype=torch.float32) -> dict:
        """A training batch of rows ``idx`` (any order): ``tokens`` int64 [b, S], ``hidden``
        [b, S, H], and where stored ``features`` [b, S, 3H] and ``argmax`` int64 [b, S]."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(idx))
        srt = idx[order]
        out = {"tokens": torch.from_numpy(np.asarray(self.tokens[srt])[inv].astype(np.int64)
                                          ).to(device),
               "hidden": self._float(np.asarray(self.hidden[srt])[inv], device, dtype)}
        if self.features is not None:
            out["features"] = self._float(np.asarray(self.features[srt])[inv], device, dtype)
        if self.argmax is not None:
            out["argmax"] = torch.from_numpy(np.asarray(self.argmax[srt])[inv].astype(np.int64)
                                             ).to(device)
        return out

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
                         log=print, kind: str = "final_norm",
                         feature_layers: tuple = ()) -> HiddenCache:
    """The cache entry for ``tokens`` (int32 [N, S]), computing it if absent. ``kind``
    ``"eagle3"`` also stores the inputs of target layers ``feature_layers`` (3 of them, as
    :func:`specrt.proposers.eagle.eagle3_feature_layers` returns) and the target's argmax."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"hidden-state dtype must be float16 or bfloat16, got {dtype!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown hidden-state cache kind {kind!r} (known: {', '.join(KINDS)})")
    feature_layers = tuple(int(l) for l in feature_layers)
    if kind == "eagle3":
        if len(feature_layers) != 3 or not all(1 <= l < model.config.num_layers
                                               for l in feature_layers):
            raise ValueError(f"EAGLE-3 cache: need 3 feature layers in [1, "
                             f"{model.config.num_layers}), got {feature_layers}")
    aux_layers = tuple(l - 1 for l in feature_layers) if kind == "eagle3" else ()
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n, s = tokens.shape
    if n == 0:
        raise ValueError(f"{name}: no rows to compute hidden states for")
    key = _key(fingerprint, tokens,
               "final_norm" if kind == "final_norm"
               else f"eagle3:{','.join(map(str, feature_layers))}", dtype)
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
        if aux_layers:
            np.lib.format.open_memmap(path / "features.npy", mode="w+", dtype=npdt,
                                      shape=(n, s, len(aux_layers) * hsize)).flush()
            np.lib.format.open_memmap(path / "argmax.npy", mode="w+", dtype=np.int32,
                                      shape=(n, s)).flush()
    dist.barrier()
    out = np.load(path / "hidden.npy", mmap_mode="r+")
    fout = np.load(path / "features.npy", mmap_mode="r+") if aux_layers else None
    aout = np.load(path / "argmax.npy", mmap_mode="r+") if aux_layers else None

    def store(h):
        if dtype == "float16":
            return h.float().clamp_(-65504, 65504).half().cpu().numpy()
        return h.to(torch.bfloat16).cpu().view(torch.uint16).numpy()
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
            target_states(model, [[0]], device, aux_layers)
            continue
        hs, fs = target_states(model, seqs, device, aux_layers)
        for j, (i, h) in enumerate(zip(idx, hs)):
            a = store(h)
            out[i, :a.shape[0]] = a
            out[i, a.shape[0]:] = 0
            if fout is not None:
                f = store(fs[j])
                fout[i, :f.shape[0]] = f
                fout[i, f.shape[0]:] = 0
                am = torch.cat([F.linear(h[r:r + 512], model.lm_head).argmax(-1)
                                for r in range(0, h.shape[0], 512)]).cpu().numpy()
                aout[i, :am.shape[0]] = am
                aout[i, am.shape[0]:] = -1
            done_tok += int((tokens[i] != PAD).sum())
        dt = time.perf_counter() - t0
        if rank == 0 and (b % 5 == 0 or b == nb - 1):
            rate = done_tok / max(dt, 1e-9)
            left = (total_tok / world - done_tok) / max(rate, 1e-9)
            log(f"[train] {name}: hidden states batch {b + 1}/{nb}, {done_tok * world} / "
                f"{total_tok} tokens, {rate * world:.0f} tok/s, ETA {max(left, 0):.0f}s")
    out.flush()
    del out
    if fout is not None:
        fout.flush()
        aout.flush()
        del fout, aout
    dist.barrier()
    if rank == 0:
        meta = {"name": name, "rows": n, "seq_len": s, "hidden_size": hsize, "dtype": dtype,
                "fingerprint": fingerprint, "tokens": total_tok}
        if kind != "final_norm":
            meta.update(kind=kind, feature_layers=list(feature_layers))
        (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (path / "DONE").write_text("ok\n")
    dist.barrier()
    return HiddenCache(path)


def default_cache_dir() -> Path:
    base = os.environ.get("SPECRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specrt")
    return Path(base) / "train-cache"

