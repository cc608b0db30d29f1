"""The CPU skinny GEMM ``specrt.ops.linear`` (csrc/cpu/linear.cpp): accuracy against float64,
bit-exact batch invariance (a row's result never depends on the other rows, the thread count or
the column split), awkward shapes, bad input, and what it buys the model: a token verified
inside a draft tree gets bit-identical logits to the same token decoded alone."""
from __future__ import annotations

import pytest
import torch

from specrt import ops
from specrt.kv_cache import PagedKVCache, build_metadata
from specrt.models import llama
from specrt.tree import DraftTree, batch_trees

from _tiny import tiny_model

pytestmark = pytest.mark.skipif(not ops.linear_isa(torch.float32),
                                reason="ops.linear needs AVX-512 on this CPU")

DTYPES = [torch.float32] + ([torch.bfloat16] if ops.linear_isa(torch.bfloat16) else [])
# k: below, at and around the 16-lane (fp32) and 32-element (bf16) steps; n: partial 4-column
# tiles; m: every tile height, one and two row groups, the 1-column / 4-column switch (m = 2/3).
SHAPES = [(1, 1, 1), (2, 3, 15), (3, 5, 16), (4, 7, 17), (5, 9, 31), (7, 33, 32), (8, 6, 33),
          (9, 130, 577), (13, 4097, 64), (64, 70, 1000)]


def _rel_err(y, ref):
    return ((y.double() - ref).abs() / (ref.abs() + 1.0)).max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64(dtype, m, n, k, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    y = ops.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # fp32: accumulation round-off of k products; bf16: one rounding of the output (2^-8).
    tol = 1e-6 * (k ** 0.5 + 1) * 4 if dtype == torch.float32 else 2 ** -8
    assert _rel_err(y, ref) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_are_batch_invariant(dtype):
    """Bitwise: any slice of rows, any thread count, gives the rows of the full product."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 577, generator=g).to(dtype)
    w = torch.randn(301, 577, generator=g).to(dtype)
    b = torch.randn(301, generator=g).to(dtype)
    full = ops.linear(x, w, b)
    for m in (1, 2, 3, 4, 5, 7, 8, 13, 40):
        for start in (0, 1, 40 - m):
            assert torch.equal(ops.linear(x[start:start + m], w, b), full[start:start + m]), (m, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.linear(x, w, b), full)
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs_and_out():
    g = torch.Generator().manual_seed(2)
    big = torch.randn(6, 100, generator=g)
    x = big[:, 10:74]                      # row stride 100, unit last stride
    w = torch.randn(20, 80, generator=g)[:, :64]
    out = torch.full((6, 40), float("nan"))[:, :20]
    y = ops.linear(x, w, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    # Empty inputs are fine.
    assert ops.linear(torch.zeros(0, 64), w).shape == (0, 20)
    assert torch.equal(ops.linear(torch.zeros(3, 0), torch.zeros(5, 0)), torch.zeros(3, 5))


def test_bad_input_raises():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ops.SpecrtInputError):
        ops.linear(x, torch.randn(4, 9))
    with pytest.raises(ops.SpecrtInputError):
        ops.linear(x, w.double())
    with pytest.raises(ops.SpecrtInputError):
        ops.linear(x.half(), w.half())
    with pytest.raises(ops.SpecrtInputError):
        ops.linear(x, w, torch.randn(5))
    with pytest.raises(ops.SpecrtInputError):
        ops.linear(x[0], w)
    # Without the Python checks the op itself refuses (a RuntimeError, never a crash).
    with pytest.raises(RuntimeError, match="weight is"):
        ops.linear(x, torch.randn(4, 9), validate=False)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.linear(x, w, out=torch.empty(2, 5), validate=False)
    with pytest.raises(RuntimeError, match="unit last stride"):
        ops.linear(torch.randn(8, 2).T, w, validate=False)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.linear(x, w.bfloat16(), validate=False)


# ---- the model on the CPU fast path ----

def _chain_logits(model, tokens, prefix, one_at_a_time):
    """Logits of ``tokens`` appended after ``prefix``: in one forward (a chain, as a verify step
    sends it) or one token per forward (plain decoding)."""
    cfg = model.config
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4, 64,
                         model.embed_tokens.dtype, torch.device("cpu"))
    cache.add_sequence(0)

    def run(toks):
        n = cache.committed_len(0)
        tree = DraftTree(toks, [-1] + list(range(len(toks) - 1)))
        tb = batch_trees([tree], [n])
        meta = build_metadata(cache, [0], tb)
        with torch.no_grad():
            out = model(tb.tokens.long(), tb.positions, cache.kv, meta)
        cache.commit(0, n + len(toks))
        return out.logits

    run(prefix)
    if one_at_a_time:
        return torch.cat([run([t]) for t in tokens])
    return run(tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_verified_logits_equal_decoded_logits(dtype, arch):
    model = tiny_model(seed=3, arch=arch).to(dtype)
    prefix, chain = [5, 17, 33, 2, 9, 61, 40], [11, 7, 88, 3, 50]
    decoded = _chain_logits(model, chain, prefix, one_at_a_time=True)
    verified = _chain_logits(model, chain, prefix, one_at_a_time=False)
    assert torch.equal(decoded, verified)


def _tree_logits(model, tokens, parents, prefix):
    """Logits of every node of one draft tree verified in one forward after ``prefix``."""
    cfg = model.config
    cache = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4, 64,
                         model.embed_tokens.dtype, torch.device("cpu"))
    cache.add_sequence(0)
    for toks in (prefix, None):
        n = cache.committed_len(0)
        tree = DraftTree(toks, [-1] + list(range(len(toks) - 1))) if toks else \
            DraftTree(tokens, parents)
        tb = batch_trees([tree], [n])
        meta = build_metadata(cache, [0], tb)
        with torch.no_grad():
            out = model(tb.tokens.long(), tb.positions, cache.kv, meta)
        cache.commit(0, n + len(tree.tokens))
    return out.logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_node_logits_equal_decoded_logits(dtype):
    """A node whose sibling drafts sit in the cache slots between its ancestors gets bit for bit
    the logits of its path decoded token by token (the attention's order is defined on the
    visible keys, not on cache slots)."""
    model = tiny_model(seed=6, arch="llama").to(dtype)
    prefix = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]
    tokens = [26, 43, 38, 32, 79, 50, 28, 84]
    parents = [-1, 0, 0, 1, 2, 3, 1, 4]
    tree = _tree_logits(model, tokens, parents, prefix)
    for i in range(len(tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        decoded = _chain_logits(model, path[::-1], prefix, one_at_a_time=True)[-1]
        assert torch.equal(tree[i], decoded), i


def test_fast_path_matches_torch_gemm(monkeypatch):
    """The model's logits with the CPU GEMM on and off agree to fp32 round-off."""
    model = tiny_model(seed=4, arch="qwen2")
    prefix, chain = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    fast = _chain_logits(model, chain, prefix, one_at_a_time=False)
    monkeypatch.setattr(llama, "CPU_LINEAR_MAX_ROWS", 0)
    slow = _chain_logits(model, chain, prefix, one_at_a_time=False)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_autograd_inputs_use_torch():
    """Training code differentiates through the model: inputs that need grad skip the op."""
    w = torch.randn(6, 8, requires_grad=True)
    x = torch.randn(2, 8)
    y = llama._linear(x, w)
    y.sum().backward()
    assert w.grad is not None and torch.allclose(w.grad, x.sum(0).expand(6, 8))


def test_packed_copy_follows_weight_changes():
    """The model's packed copy is remade when the weight changes in place (a checkpoint load,
    an optimizer step) and dropped with the weight."""
    w = torch.randn(10, 24)
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = llama._linear(x, w)
        assert torch.allclose(first, x @ w.T, rtol=1e-5, atol=1e-5)
        w.mul_(2)
        assert torch.allclose(llama._linear(x, w), 2 * first, rtol=1e-5, atol=1e-5)
        w.copy_(torch.randn(10, 24))
        assert torch.allclose(llama._linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    key = id(w)
    assert key in llama._PACKED
    del w
    assert key not in llama._PACKED


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_equals_plain_bitwise(dtype):
    g = torch.Generator().manual_seed(5)
    for m, n, k in SHAPES:
        x = torch.randn(m, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        assert torch.equal(ops.linear(x, ops.pack_linear(w), b), ops.linear(x, w, b)), (m, n, k)
