"""Plain-PyTorch reference of every specrt op: the oracle the compiled ops are tested against.

Written for clarity, not speed: loops over sequences and nodes, fp64/fp32 math. The exact
semantics (and edge-case rules) are specified in ``docs/ops.md``; this file is their executable
form. Sections are owned by area: attention, cache writes / rollback, sampling.
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, sm_scale,
                   return_lse=False):
    """Reference of ``specrt.ops.tree_attention`` (see docs/ops.md). Returns ``out`` or
    ``(out, lse)``; ``out`` has q's dtype, ``lse`` is float32.

    Per sequence: gather its K/V from the pages, build the boolean visibility (whole prefix,
    plus the new tokens allowed by the packed mask or causal), softmax in fp32. A row that sees
    no key at all (impossible for trees) gets ``out = 0`` and ``lse = -inf``. Runs on q's device.
    """
    dev = q.device
    total_q, num_qo_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_qo_heads // num_kv_heads
    out = torch.zeros(total_q, num_qo_heads, head_dim, dtype=torch.float32, device=dev)
    lse = torch.full((total_q, num_qo_heads), float("-inf"), dtype=torch.float32, device=dev)
    qo = qo_indptr.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        q0, q1 = qo[b], qo[b + 1]
        t, kv_len = q1 - q0, lens[b]
        if t == 0:
            continue
        prefix = kv_len - t
        pos = torch.arange(kv_len, device=dev)
        pages = block_table[b].to(dev).long()[pos // page_size]
        k = k_cache[pages, pos % page_size].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[pages, pos % page_size].float().repeat_interleave(group, dim=1)
        visible = torch.zeros(t, kv_len, dtype=torch.bool, device=dev)
        visible[:, :prefix] = True
        if mask is None:
            visible[:, prefix:] = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        else:
            words = mask[q0:q1].to(dev).long()  # [t, W]
            cols = torch.arange(t, device=dev)
            bits = (words[:, cols // 32] >> (cols % 32)) & 1
            visible[:, prefix:] = bits.bool()
        qf = q[q0:q1].float()  # [t, Hq, D]
        scores = torch.einsum("thd,lhd->htl", qf, k) * sm_scale
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, t]
        seen = visible.any(dim=-1)  # [t]
        probs = torch.where(seen[None, :, None], torch.exp(scores - row_lse[..., None]),
                            torch.zeros_like(scores))
        out[q0:q1] = torch.einsum("htl,lhd->thd", probs, v)
        lse[q0:q1] = row_lse.transpose(0, 1)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# cache writes and rollback
# --------------------------------------------------------------------------------------------


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    """Reference of ``specrt.ops.append_kv``: writes in place, returns nothing."""
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    slots = [int(s) for s in slot_mapping.tolist()]
    for n, s in enumerate(slots):
        if not -1 <= s < num_pages * page_size:
            raise IndexError(f"slot_mapping[{n}] = {s} is neither -1 nor in [0, {num_pages * page_size})")
    for n, s in enumerate(slots):
        if s == -1:
            continue
        k_cache[s // page_size, s % page_size] = k[n]
        v_cache[s // page_size, s % page_size] = v[n]


def kv_rollback(kv_cache, block_table, committed_lens, path, num_accepted):
    """Reference of ``specrt.ops.kv_rollback``: updates ``kv_cache`` and ``committed_lens`` in
    place."""
    page_size = kv_cache.shape[3]

    def where(b, pos):  # (page, offset) of logical position pos of sequence b
        return int(block_table[b, pos // page_size]), pos % page_size

    for b in range(committed_lens.shape[0]):
        n = int(num_accepted[b]) + 1
        if n <= 0:
            continue
        c = int(committed_lens[b])
        # All of the sequence's sources are read before any destination is written.
        rows = []
        for j in range(n):
            page, off = where(b, c + int(path[b, j]))
            rows.append(kv_cache[:, :, page, off].clone())  # [L, 2, Hkv, D]
        for j in range(n):
            page, off = where(b, c + j)
            kv_cache[:, :, page, off] = rows[j]
        committed_lens[b] = c + n


# --------------------------------------------------------------------------------------------
# sampling and verification
# --------------------------------------------------------------------------------------------


def philox_uniform(seed, offset, idx):
    """The uniform in [0, 1) that Philox-4x32-10 gives for (seed, offset, idx) (docs/ops.md).

    key = (seed_lo, seed_hi), counter = (offset_lo, offset_hi, idx, 0) (64-bit values in two's
    complement); the uniform is ``(x0 >> 8) * 2^-24`` of the first output word.
    """
    s, o = int(seed) & 0xFFFFFFFFFFFFFFFF, int(offset) & 0xFFFFFFFFFFFFFFFF
    x = _philox4x32_10((o & _M32, o >> 32, int(idx) & _M32, 0), (s & _M32, s >> 32))
    return (x[0] >> 8) * 2.0**-24


def processed_probs(logits, temperature, top_k, top_p):
    """Processed target distribution of each row (``[N, V]`` float32; greedy rows one-hot).

    Invalid rows (NaN / +inf logits, or all -inf) come back all zero.
    """
    n = logits.shape[0]
    out = torch.zeros(n, logits.shape[1], dtype=torch.float32)
    for i in range(n):
        p, _ = _processed_row(logits[i], float(temperature[i]), int(top_k[i]), float(top_p[i]))
        if p is not None:
            out[i] = p.float()
    return out


def sample(logits, temperature, top_k, top_p, seed, offset, uniforms=None):
    """Reference of ``specrt.ops.sample``. Returns ``(tokens int32 [N], probs float32 [N, V])``.

    Invalid rows get token -1 and an all-zero probability row.
    """
    tokens, probs, _ = _sample_impl(logits, temperature, top_k, top_p, seed, offset, uniforms)
    return tokens, probs


def rejection_sample(target_logits, draft_tokens, parents, node_indptr, draft_probs,
                     temperature, top_k, top_p, seed, offset, uniforms=None, max_t=None):
    """Reference of ``specrt.ops.rejection_sample``. Returns
    ``(out_tokens [B, max_T], out_path [B, max_T], num_accepted [B])``, all int32."""
    tokens, path, num, _ = _rejection_sample_impl(
        target_logits, draft_tokens, parents, node_indptr, draft_probs, temperature, top_k,
        top_p, seed, offset, uniforms, max_t)
    return tokens, path, num


# ---- sampling helpers (private) ------------------------------------------------------------
# Math is fp64 on the fp32 logits; the compiled ops compute weights in fp32 and sums in fp64,
# so exact agreement is only expected away from decision boundaries. Every helper therefore
# also records the *margin* of each decision it takes (relative distance to the tie), which
# tests use to tell a real mismatch from a rounding tie.

_M32 = 0xFFFFFFFF


def _philox4x32_10(ctr, key):
    """Philox-4x32-10 of Salmon et al. (SC'11) on Python ints; returns the 4 output words."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0 = (k0 + 0x9E3779B9) & _M32
            k1 = (k1 + 0xBB67AE85) & _M32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0), p1 & _M32, ((p0 >> 32) ^ c3 ^ k1), p0 & _M32
    return c0, c1, c2, c3


def _row_is_invalid(z):
    return bool(torch.isnan(z).any() or (z == float("inf")).any() or (z == float("-inf")).all())


def _processed_row(row, t, k, top_p):
    """Processed distribution of one logits row: ``(p float64 [V] or None if invalid, margin)``.

    ``margin`` is the distance of the top-p decisions to their boundary (inf if none taken).
    Ties (top-k boundary, "strictly larger probability") are decided on the fp32 logits, which
    orders tokens exactly like their probabilities but without exp rounding.
    """
    z = row.float()
    v = z.numel()
    if _row_is_invalid(z):
        return None, float("inf")
    if not (t > 0):
        p = torch.zeros(v, dtype=torch.float64)
        p[int(torch.argmax(z))] = 1.0  # first maximal index
        return p, float("inf")
    keep = torch.ones(v, dtype=torch.bool)
    if 0 < k < v:
        keep = z >= torch.topk(z, k).values[-1]
    zmax = z.max()
    w = torch.where(keep, torch.exp((z.double() - float(zmax)) / t), torch.zeros((), dtype=torch.float64))
    p = w / w.sum()
    margin = float("inf")
    if top_p < 1:
        order = torch.argsort(z, descending=True, stable=True)
        zs, ps = z[order], p[order]
        csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ps, 0)])
        n_larger = torch.searchsorted(-zs, -zs, side="left")  # tokens with strictly larger z
        mass = csum[n_larger]
        keep_sorted = (mass < top_p) | (zs == zmax)
        decided = keep[order] & (zs != zmax)
        if decided.any():
            margin = min(_margin(float(x), top_p) for x in mass[decided].unique())
        keep2 = torch.zeros(v, dtype=torch.bool)
        keep2[order] = keep_sorted
        p = torch.where(keep & keep2, p, torch.zeros((), dtype=torch.float64))
        p = p / p.sum()
    return p, margin


def _draw(r, u, margins):
    """Inverse-CDF draw from the unnormalised ``r`` (float64) with uniform ``u``; -1 if r == 0."""
    cs = torch.cumsum(r, 0)
    total = float(cs[-1])
    margins.append(_margin(total, 0.0))  # the "all zero" decision
    thr = u * total
    hit = torch.nonzero(cs > thr).flatten()
    if hit.numel() == 0:
        pos = torch.nonzero(r > 0).flatten()
        return int(pos[-1]) if pos.numel() else -1
    j = int(hit[0])
    if float(cs[j]) != total:  # cumsum == total > u * total holds exactly for every u < 1
        margins.append(_margin(float(cs[j]), thr))
    if j > 0:
        margins.append(_margin(thr, float(cs[j - 1])))
    return j


def _margin(a, b):
    """Relative distance of a comparison ``a`` vs ``b`` to its tie (errors of exp and of sums
    of positive terms are relative). An exact 0 vs 0 is safe; values that fp32 may flush to
    zero are not."""
    if a == 0.0 and b == 0.0:
        return float("inf")
    m = max(abs(a), abs(b))
    return abs(a - b) / m if m > 1e-30 else 0.0


def _accept(lhs, rhs, margins):
    """``lhs < rhs`` with its margin recorded."""
    margins.append(_margin(lhs, rhs))
    return lhs < rhs


def _sample_impl(logits, temperature, top_k, top_p, seed, offset, uniforms):
    n, v = logits.shape
    tokens = torch.full((n,), -1, dtype=torch.int32)
    probs = torch.zeros(n, v, dtype=torch.float32)
    margin = torch.full((n,), float("inf"), dtype=torch.float64)
    for i in range(n):
        t = float(temperature[i])
        p, m = _processed_row(logits[i], t, int(top_k[i]), float(top_p[i]))
        if p is None:
            continue
        probs[i] = p.float()
        if not (t > 0):
            tokens[i] = int(torch.argmax(p))
            continue
        u = float(uniforms[i]) if uniforms is not None else philox_uniform(seed[i], offset[i], 0)
        margins = [m]
        tokens[i] = _draw(p, u, margins)
        margin[i] = min(margins)
    return tokens, probs, margin


def _rejection_sample_impl(target_logits, draft_tokens, parents, node_indptr, draft_probs,
                           temperature, top_k, top_p, seed, offset, uniforms=None, max_t=None):
    """``rejection_sample`` plus, per sequence, the smallest decision margin on its walk."""
    indptr = [int(x) for x in node_indptr]
    bsz = len(indptr) - 1
    if max_t is None:
        max_t = max(indptr[b + 1] - indptr[b] for b in range(bsz))
    out_tokens = torch.full((bsz, max_t), -1, dtype=torch.int32)
    out_path = torch.full((bsz, max_t), -1, dtype=torch.int32)
    num = torch.full((bsz,), -1, dtype=torch.int32)
    margin = torch.full((bsz,), float("inf"), dtype=torch.float64)
    for b in range(bsz):
        lo, hi = indptr[b], indptr[b + 1]
        n_nodes = hi - lo
        rows = target_logits[lo:hi].float()
        if any(_row_is_invalid(rows[i]) for i in range(n_nodes)):
            continue
        t, k, tp = float(temperature[b]), int(top_k[b]), float(top_p[b])
        toks = [int(x) for x in draft_tokens[lo:hi]]
        par = [int(x) for x in parents[lo:hi]]
        children = [[i for i in range(1, n_nodes) if par[i] == c] for c in range(n_nodes)]
        margins = []
        cache = {}

        def probs_of(c):
            if c not in cache:
                p, m = _processed_row(rows[c], t, k, tp)
                margins.append(m)
                cache[c] = p
            return cache[c]

        def unif(i):
            if uniforms is not None:
                return float(uniforms[lo + i])
            return philox_uniform(seed[b], offset[b], i)

        path, emitted = [0], []
        c = 0
        if not (t > 0):  # greedy
            while True:
                a = int(torch.argmax(rows[c]))
                nxt = next((ch for ch in children[c] if toks[ch] == a), None)
                if nxt is None:
                    emitted.append(a)
                    break
                emitted.append(a)
                path.append(nxt)
                c = nxt
        elif draft_probs is not None:  # chain with draft probabilities
            assert all(par[i] == i - 1 for i in range(1, n_nodes)), "draft_probs needs a chain"
            q_rows = draft_probs[lo:hi].double()
            while True:
                p = probs_of(c)
                if c == n_nodes - 1:  # all accepted: bonus
                    emitted.append(_draw(p, unif(0), margins))
                    break
                x = toks[c + 1]
                q = q_rows[c]
                if _accept(unif(c + 1) * float(q[x]), float(p[x]), margins):
                    emitted.append(x)
                    path.append(c + 1)
                    c += 1
                    continue
                j = _draw(torch.clamp(p - q, min=0.0), unif(0), margins)
                if j < 0:
                    j = _draw(p, unif(0), margins)
                emitted.append(j)
                break
        else:  # deterministic drafts: recursive rejection over siblings
            while True:
                r = probs_of(c).clone()
                moved = False
                for ch in children[c]:
                    x = toks[ch]
                    if _accept(unif(ch) * float(r.sum()), float(r[x]), margins):
                        emitted.append(x)
                        path.append(ch)
                        c = ch
                        moved = True
                        break
                    r[x] = 0.0
                if moved:
                    continue
                j = _draw(r, unif(0), margins)
                if j < 0:
                    j = _draw(probs_of(c), unif(0), margins)
                emitted.append(j)
                break
        num[b] = len(path) - 1
        out_tokens[b, :len(emitted)] = torch.tensor(emitted, dtype=torch.int32)
        out_path[b, :len(path)] = torch.tensor(path, dtype=torch.int32)
        margin[b] = min(margins, default=float("inf"))
    return out_tokens, out_path, num, margin
