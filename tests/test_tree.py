"""specrt.tree: DraftTree validation and derived data, packed masks, batching."""
import random

import numpy as np
import pytest
import torch

from specrt.tree import (DraftTree, TreeBatch, accepted_tokens, batch_trees, mask_words,
                         pack_mask, unpack_mask)


def random_parents(t, rng):
    return [-1] + [rng.randrange(i) for i in range(1, t)]


def ancestor_matrix(parents):
    """Brute force: walk up from every node."""
    t = len(parents)
    m = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        j = i
        while j != -1:
            m[i, j] = True
            j = parents[j]
    return m


def bit(packed_row, k):
    # Independent of unpack_mask: reinterpret the int32 word as unsigned first.
    return (int(packed_row[k // 32]) & 0xFFFFFFFF) >> (k % 32) & 1


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, parents, match", [
    ([], [], "at least one node"),
    ([1, 2], [0, 0], r"parents\[0\] must be -1"),
    ([1, 2], [-1, 1], r"parents\[1\] = 1"),
    ([1, 2, 3], [-1, 0, 3], r"parents\[2\] = 3"),
    ([1, 2, 3], [-1, 0, -1], r"parents\[2\] = -1"),
    ([1, 2, 3], [-1, 0], "3 entries but parents has 2"),
    ([1, -2, 3], [-1, 0, 0], r"tokens\[1\] = -2 is negative"),
    ([1, 2.5], [-1, 0], "integers"),
    ([1, 2], [-1, 0.5], "not an integer"),
    ([1, 2 ** 31], [-1, 0], "int32"),
])
def test_validation_errors(tokens, parents, match):
    with pytest.raises(ValueError, match=match):
        DraftTree(tokens, parents)


def test_validation_tensor_inputs():
    with pytest.raises(ValueError, match="integer"):
        DraftTree(torch.tensor([1.0, 2.0]), [-1, 0])
    with pytest.raises(ValueError, match="1-D"):
        DraftTree(torch.tensor([[1, 2]]), [-1, 0])
    with pytest.raises(ValueError, match="1-D"):
        DraftTree([1, 2], torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="negative"):
        DraftTree(torch.tensor([1, -1]), torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="integers"):
        DraftTree.chain(1, [2.0, 3])
    with pytest.raises(TypeError):
        DraftTree.single(1.5)
    t = DraftTree(np.array([3, 4], dtype=np.int32), np.array([-1, 0]))
    assert t.tokens.dtype == torch.int64 and t.tokens.tolist() == [3, 4]


def test_tokens_do_not_alias_caller_buffer():
    buf = torch.tensor([5, 6, 7])
    t = DraftTree(buf, [-1, 0, 0])
    buf[1] = 99
    assert t.tokens.tolist() == [5, 6, 7]


def test_draft_probs_validation():
    p = torch.rand(4, 10)
    assert DraftTree.chain(1, [2, 3, 4], draft_probs=p).draft_probs is p
    DraftTree.chain(1, [2, 3, 4], draft_probs=torch.rand(3, 10))  # leaf row omitted
    with pytest.raises(ValueError, match="only supported for chains"):
        DraftTree([1, 2, 3], [-1, 0, 0], draft_probs=torch.rand(3, 10))
    with pytest.raises(ValueError, match="rows"):
        DraftTree.chain(1, [2, 3, 4], draft_probs=torch.rand(2, 10))
    with pytest.raises(ValueError, match="float32"):
        DraftTree.chain(1, [2], draft_probs=torch.rand(2, 10, dtype=torch.float64))


# ---- derived data on hand-made trees ------------------------------------------------------------


def test_hand_made_tree():
    #        0
    #      / | \
    #     1  2  5
    #    / \    |
    #   3   4   6
    #   |
    #   7
    parents = [-1, 0, 0, 1, 1, 0, 5, 3]
    t = DraftTree([10, 11, 12, 13, 14, 15, 16, 17], parents)
    assert t.num_nodes == len(t) == 8
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 1, 2, 3]
    assert t.positions(100).tolist() == [100, 101, 101, 102, 102, 101, 102, 103]
    assert t.positions(0).dtype == torch.int64
    assert t.children(0) == (1, 2, 5)
    assert t.children(1) == (3, 4)
    assert t.children(3) == (7,)
    assert t.children(7) == ()
    assert t.path_to(0) == [0]
    assert t.path_to(7) == [0, 1, 3, 7]
    assert t.path_to(6) == [0, 5, 6]
    assert t.parent(6) == 5
    assert not t.is_chain
    assert t.max_depth == 3
    rows = [r[0] for r in t.packed_mask().tolist()]
    assert rows == [0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100001, 0b1100001, 0b10001011]
    with pytest.raises(IndexError):
        t.children(8)
    with pytest.raises(IndexError):
        t.path_to(-1)
    with pytest.raises(ValueError):
        t.positions(-1)


def test_chain_and_single():
    c = DraftTree.chain(7, [1, 2, 3])
    assert c.parents.tolist() == [-1, 0, 1, 2]
    assert c.tokens.tolist() == [7, 1, 2, 3]
    assert c.is_chain and c.max_depth == 3
    assert c.depths.tolist() == [0, 1, 2, 3]
    assert c.children(1) == (2,)
    s = DraftTree.single(9)
    assert s.num_nodes == 1 and s.is_chain and s.max_depth == 0
    assert s.packed_mask().tolist() == [[1]]
    assert DraftTree.chain(7, torch.tensor([1, 2])).tokens.tolist() == [7, 1, 2]
    # An explicit chain parent array is recognised as a chain.
    assert DraftTree([1, 2, 3], [-1, 0, 1]).is_chain
    assert not DraftTree([1, 2, 3], [-1, 0, 0]).is_chain


# ---- packed masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 7, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("kind", ["random", "chain", "star", "deep_then_wide"])
def test_packed_mask_vs_brute_force(t, kind):
    rng = random.Random(1000 * t + len(kind))
    if kind == "random":
        parents = random_parents(t, rng)
    elif kind == "chain":
        parents = [-1] + list(range(t - 1))
    elif kind == "star":
        parents = [-1] + [0] * (t - 1)
    else:  # a chain down to node 31 then siblings, so bit 31 is set in many rows
        parents = [-1] + [i - 1 if i <= 31 else 31 for i in range(1, t)]
    tree = DraftTree([rng.randrange(1000) for _ in range(t)], parents)
    packed = tree.packed_mask()
    assert packed.dtype == torch.int32
    assert packed.shape == (t, (t + 31) // 32)
    expect = ancestor_matrix(parents)
    got = torch.tensor([[bit(packed[i], k) for k in range(t)] for i in range(t)],
                       dtype=torch.bool)
    assert torch.equal(got, expect)
    assert torch.equal(unpack_mask(packed, t), expect)
    assert torch.equal(pack_mask(expect), packed)
    # Depths agree with the ancestor counts.
    assert tree.depths.tolist() == (expect.sum(1) - 1).tolist()
    assert tree.is_chain == (parents == [-1] + list(range(t - 1)))
    if kind == "chain" or t <= 2:
        assert tree.is_chain


def test_bit31_is_sign_bit():
    tree = DraftTree.chain(0, list(range(31)))  # 32 nodes: the last row is all ones
    assert tree.packed_mask()[31, 0].item() == -1
    assert tree.packed_mask()[30, 0].item() == 2 ** 31 - 1


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 31), (5, 32), (33, 33), (64, 64),
                                        (7, 100), (0, 5)])
def test_pack_unpack_round_trip(rows, cols):
    g = torch.Generator().manual_seed(rows * 131 + cols)
    m = torch.rand(rows, cols, generator=g) < 0.5
    if rows and cols >= 32:
        m[0, 31] = True  # the sign bit
    packed = pack_mask(m)
    assert packed.dtype == torch.int32 and packed.shape == (rows, mask_words(cols))
    for r in range(rows):
        for k in range(cols):
            assert bit(packed[r], k) == int(m[r, k])
    assert torch.equal(unpack_mask(packed, cols), m)
    wide = pack_mask(m, width=mask_words(cols) + 2)
    assert torch.equal(wide[:, :packed.shape[1]], packed)
    assert (wide[:, packed.shape[1]:] == 0).all()
    with pytest.raises(ValueError, match="width"):
        pack_mask(torch.ones(2, 40, dtype=torch.bool), width=1)
    with pytest.raises(ValueError):
        unpack_mask(packed, 32 * packed.shape[1] + 1)
    with pytest.raises(ValueError):
        pack_mask(torch.ones(2, 2, 2, dtype=torch.bool))


def test_unpack_ignores_high_bits():
    packed = torch.tensor([[-1]], dtype=torch.int32)
    assert unpack_mask(packed, 3).tolist() == [[True, True, True]]


# ---- from_paths ---------------------------------------------------------------------------------


def test_from_paths_merges_prefixes():
    t = DraftTree.from_paths(9, [[1, 2, 3], [1, 2, 4], [5], [1, 6], [], [1, 2, 3]])
    assert t.tokens.tolist() == [9, 1, 2, 3, 4, 5, 6]
    assert t.parents.tolist() == [-1, 0, 1, 2, 2, 0, 1]
    assert t.children(0) == (1, 5)  # first-seen order
    assert t.children(1) == (2, 6)
    assert t.children(2) == (3, 4)


@pytest.mark.parametrize("seed", range(5))
def test_from_paths_random(seed):
    rng = random.Random(seed)
    paths = [[rng.randrange(4) for _ in range(rng.randrange(0, 7))] for _ in range(8)]
    t = DraftTree.from_paths(0, paths)
    prefixes = {tuple(p[:k]) for p in paths for k in range(1, len(p) + 1)}
    assert t.num_nodes == 1 + len(prefixes)
    toks = t.tokens.tolist()
    # Every node spells a distinct prefix, and every path is spelled by some node.
    spelled = {tuple(toks[j] for j in t.path_to(i)[1:]) for i in range(1, t.num_nodes)}
    assert spelled == prefixes
    for i in range(t.num_nodes):
        kids = [toks[c] for c in t.children(i)]
        assert len(kids) == len(set(kids))  # siblings never share a token
    assert t.is_chain == (len(prefixes) == t.max_depth)


def test_from_paths_single_path_is_chain():
    t = DraftTree.from_paths(3, [[4, 5, 6]])
    assert t.is_chain and t.tokens.tolist() == [3, 4, 5, 6]
    assert DraftTree.from_paths(3, []).num_nodes == 1


# ---- accepted_tokens ----------------------------------------------------------------------------


def test_accepted_tokens():
    t = DraftTree([10, 11, 12, 13], [-1, 0, 0, 2])
    assert accepted_tokens(t, [0]) == []
    assert accepted_tokens(t, [0, 2, 3]) == [12, 13]
    assert accepted_tokens(t, torch.tensor([0, 2, -1, -1], dtype=torch.int32)) == [12]
    assert accepted_tokens(t, [-1, -1]) == []
    with pytest.raises(ValueError, match="root-to-node"):
        accepted_tokens(t, [0, 1, 3])
    with pytest.raises(ValueError, match="root"):
        accepted_tokens(t, [1, 3])
    with pytest.raises(ValueError, match="padding"):
        accepted_tokens(t, [0, -1, 2])


# ---- batching -----------------------------------------------------------------------------------


def make_trees(b, seed, chains_only=False):
    rng = random.Random(seed)
    trees = []
    for i in range(b):
        t = rng.choice([1, 2, 7, 33, 64]) if i % 2 else rng.randrange(1, 12)
        toks = [rng.randrange(50000) for _ in range(t)]
        if chains_only or i % 3 == 0:
            trees.append(DraftTree.chain(toks[0], toks[1:]))
        else:
            trees.append(DraftTree(toks, random_parents(t, rng)))
    return trees


@pytest.mark.parametrize("b", [1, 3, 17])
@pytest.mark.parametrize("chains_only", [False, True])
def test_batch_trees_layout(b, chains_only):
    trees = make_trees(b, seed=b, chains_only=chains_only)
    committed = [random.Random(b + i).randrange(0, 5000) for i in range(b)]
    tb = batch_trees(trees, committed)
    assert isinstance(tb, TreeBatch)
    counts = [t.num_nodes for t in trees]
    n = sum(counts)
    assert tb.num_nodes == counts and tb.batch_size == b and tb.total_nodes == n
    assert tb.committed_lens == committed
    assert tb.max_t == max(counts)
    assert tb.tokens.dtype == torch.int32 and tb.tokens.shape == (n,)
    assert tb.parents.dtype == torch.int32 and tb.depths.dtype == torch.int32
    assert tb.positions.dtype == torch.int64 and tb.node_indptr.dtype == torch.int32
    assert tb.node_indptr.tolist() == [0] + np.cumsum(counts).tolist()
    all_chains = all(t.is_chain for t in trees)
    assert (tb.mask is None) == all_chains
    w = (max(counts) + 31) // 32
    for i, t in enumerate(trees):
        s, e = tb.node_indptr[i].item(), tb.node_indptr[i + 1].item()
        assert tb.tokens[s:e].tolist() == t.tokens.tolist()
        assert tb.parents[s:e].tolist() == t.parents.tolist()
        assert tb.depths[s:e].tolist() == t.depths.tolist()
        assert tb.positions[s:e].tolist() == t.positions(committed[i]).tolist()
        if tb.mask is not None:
            assert tb.mask.shape == (n, w) and tb.mask.dtype == torch.int32
            expect = ancestor_matrix(t.parents.tolist())
            assert torch.equal(unpack_mask(tb.mask[s:e], t.num_nodes), expect)
            assert (unpack_mask(tb.mask[s:e], 32 * w)[:, t.num_nodes:] == 0).all()
    assert tb.draft_probs is None


def test_batch_trees_max_t_and_always_mask():
    trees = [DraftTree.chain(1, [2, 3]), DraftTree.single(4)]
    tb = batch_trees(trees, [5, 6], max_t=64, always_mask=True)
    assert tb.max_t == 64 and tb.mask.shape == (4, 2)
    assert unpack_mask(tb.mask, 3).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1],
                                                [1, 0, 0]]
    assert batch_trees(trees, [5, 6], max_t=64).mask is None
    with pytest.raises(ValueError, match="max_t"):
        batch_trees(trees, [5, 6], max_t=2)
    with pytest.raises(ValueError, match="committed"):
        batch_trees(trees, [5])
    with pytest.raises(ValueError, match=">= 0"):
        batch_trees(trees, [5, -1])
    with pytest.raises(ValueError, match="at least one"):
        batch_trees([], [])
    with pytest.raises(TypeError):
        batch_trees([[1, 2]], [0])


def test_batch_trees_draft_probs():
    v = 11
    p0 = torch.rand(3, v)  # chain of 4, leaf row omitted
    p2 = torch.rand(2, v)  # chain of 2, full
    trees = [DraftTree.chain(1, [2, 3, 4], draft_probs=p0), DraftTree.single(5),
             DraftTree.chain(6, [7], draft_probs=p2)]
    tb = batch_trees(trees, [0, 0, 0])
    assert tb.draft_probs.shape == (7, v) and tb.draft_probs.dtype == torch.float32
    assert torch.equal(tb.draft_probs[0:3], p0)
    assert (tb.draft_probs[3:5] == 0).all()  # leaf row of tree 0, tree 1 (no probs)
    assert torch.equal(tb.draft_probs[5:7], p2)
    with pytest.raises(ValueError, match="branching"):
        batch_trees(trees + [DraftTree([1, 2, 3], [-1, 0, 0])], [0] * 4)
    with pytest.raises(ValueError, match="vocabularies"):
        batch_trees([trees[0], DraftTree.chain(1, [2], draft_probs=torch.rand(1, v + 1))],
                    [0, 0])


def test_batch_trees_mixed_draft_probs():
    """Probabilities next to deterministic drafts: chains become one-hot rows, greedy requests
    may branch (zero rows, the op ignores them), a sampled branching tree is refused."""
    v = 9
    p0 = torch.rand(2, v)
    trees = [DraftTree.chain(1, [2, 3], draft_probs=p0),  # sampled chain with probabilities
             DraftTree([4, 5, 6, 7], [-1, 0, 0, 1]),       # greedy tree
             DraftTree.chain(8, [3, 0, 8]),                # deterministic chain
             DraftTree.single(2)]
    tb = batch_trees(trees, [0, 3, 5, 7], greedy=[False, True, False, False])
    q = tb.draft_probs
    assert q.shape == (3 + 4 + 4 + 1, v)
    assert torch.equal(q[0:2], p0) and (q[2] == 0).all()
    assert (q[3:7] == 0).all()
    onehot = torch.zeros(3, v)
    onehot[[0, 1, 2], [3, 0, 8]] = 1
    assert torch.equal(q[7:10], onehot) and (q[10:] == 0).all()
    assert tb.mask is not None  # the greedy tree branches
    with pytest.raises(ValueError, match="tree 1 .*branches"):
        batch_trees(trees, [0, 3, 5, 7], greedy=[False, False, False, False])
    with pytest.raises(ValueError, match="branches"):
        batch_trees(trees, [0, 3, 5, 7])  # not told which requests are greedy
    with pytest.raises(ValueError, match="greedy flags"):
        batch_trees(trees, [0, 3, 5, 7], greedy=[True])
    with pytest.raises(ValueError, match="vocabulary"):
        batch_trees([trees[0], DraftTree.chain(1, [v])], [0, 0])
    # without probabilities nothing changes
    assert batch_trees(trees[1:], [0, 0, 0], greedy=[False] * 3).draft_probs is None


def test_first_chain():
    t = DraftTree.from_paths(9, [[1, 2, 3], [1, 4], [5, 6, 7, 8]])
    chain, nodes = t.first_chain()
    assert chain.is_chain and chain.tokens.tolist() == [9, 1, 2, 3]
    assert nodes == [0, 1, 2, 3] and t.path_to(3) == nodes
    t = DraftTree([9, 5, 1, 6, 2], [-1, 0, 0, 1, 2])
    chain, nodes = t.first_chain()
    assert chain.tokens.tolist() == [9, 5, 6] and nodes == [0, 1, 3]
    c = DraftTree.chain(1, [2, 3])
    assert c.first_chain() == (c, [0, 1, 2])
    assert DraftTree.single(4).first_chain()[1] == [0]


def test_shared_topology_is_not_corrupted_by_batching():
    a = DraftTree([1, 2, 3], [-1, 0, 0])
    b = DraftTree([4, 5, 6], [-1, 0, 0])
    tb = batch_trees([a, b], [0, 0])
    tb.tokens.zero_()
    tb.mask.zero_()
    tb.parents.zero_()
    assert a.tokens.tolist() == [1, 2, 3] and b.tokens.tolist() == [4, 5, 6]
    assert a.packed_mask()[:, 0].tolist() == [1, 3, 5]
    assert DraftTree([7, 8, 9], [-1, 0, 0]).parents.tolist() == [-1, 0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_trees_cuda():
    trees = make_trees(17, seed=3)
    probs_trees = [DraftTree.chain(1, [2, 3], draft_probs=torch.rand(3, 7, device="cuda")),
                   DraftTree.single(2)]
    tb = batch_trees(trees, list(range(17)), device="cuda")
    cpu = batch_trees(trees, list(range(17)))
    for name in ("tokens", "parents", "node_indptr", "positions", "depths", "mask"):
        got = getattr(tb, name)
        assert got.is_cuda
        assert torch.equal(got.cpu(), getattr(cpu, name))
    pb = batch_trees(probs_trees, [0, 0])
    assert pb.draft_probs.is_cuda and pb.tokens.device.type == "cpu"
    assert (pb.draft_probs[3] == 0).all()
