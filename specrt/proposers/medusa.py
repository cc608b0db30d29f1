"""Medusa (Cai et al. 2024): K decoding heads on the target's last hidden state.

Head ``k`` (0-based) reads the target's final-normed hidden state at the last accepted
position ``p`` and predicts the token at ``p + 2 + k``: the target's own LM head at ``p``
produced the root (the token just emitted), head 0 its child, head 1 the grandchild, and so on.
Drafting therefore costs no target pass: the engine hands the accepted path's hidden states to
:meth:`MedusaProposer.commit` (and the prompt's last one to :meth:`MedusaProposer.add`).

A head is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` and an output projection: its
own (Medusa-1), or the target's LM head (Medusa-2 / TGI "ResBlock-only", and vLLM's
``original_lm_head``), optionally over a reduced draft vocabulary (``token_map``: draft id ->
target id, vLLM's convention) so the projection costs a fraction of the target's.

Trees
-----
* static: a list of *choice paths* as in the reference and TensorRT-LLM, e.g. ``[[0], [0, 0],
  [1]]``: ``[i, j]`` is the node holding head 1's rank-``j`` token under head 0's rank-``i``
  token. :data:`MC_SIM_7B_63` is the reference's 63-node tree. :func:`sparse_choices` builds one
  for a node budget from measured per-rank accuracies (the reference's calibration idea).
* dynamic (default): per step and per sequence, the ``budget - 1`` rank paths with the highest
  product of head probabilities (best-first search, ancestor-closed by construction).

Verification is the engine's: lossless (greedy longest match; sampled recursive rejection over
siblings, the drafts being deterministic). The reference's lossy "typical acceptance" is in
:mod:`specrt.acceptance`, opt-in only.

Checkpoint layouts (detected from the tensor names, :func:`load_medusa_heads`):

========================  ===========================================================
FasterDecoding Medusa-1   ``{k}.{j}.linear.weight|bias``, ``{k}.{L}.weight`` (own LM head)
ResBlock-only (Medusa-2)  ``{k}.{j}.linear.weight|bias``; logits through the target LM head
vLLM                      ``blocks.{k}.layers.{j}.weight[|bias]``, ``lm_heads.{k}.weight``,
                          optional ``token_map`` (any ``medusa_heads.`` prefix is dropped)
========================  ===========================================================

specrt's own checkpoints are the ResBlock-only layout, plus ``token_map`` when the heads use a
reduced vocabulary (``truncated_vocab_size`` in ``config.json``).
"""
from __future__ import annotations

import heapq
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import DraftTree, _topology
from .base import LastHiddenProposer

__all__ = ["MC_SIM_7B_63", "MedusaHeads", "MedusaProposer", "load_medusa_heads",
           "save_medusa_heads", "choices_topology", "sparse_choices", "LAYOUTS"]

#: The reference's default tree (FasterDecoding/Medusa ``medusa_choices.py``): 63 nodes + root.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
    [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4],
    [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7],
    [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1],
    [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1],
    [1, 6], [0, 7, 0]]

#: Layout names accepted by :func:`save_medusa_heads`.
LAYOUTS = ("medusa1", "resblock", "vllm")


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------


class MedusaHeads(nn.Module):
    """K Medusa heads (weights stacked over heads, so all heads run as batched matmuls).

    Parameters
    ----------
    hidden_size, vocab_size : the target's
    num_heads : K
    num_layers : residual blocks per head
    bias : the blocks' linear layers have a bias (FasterDecoding: yes; vLLM: optional)
    own_lm_head : each head has its own output projection (Medusa-1); else the target's
    token_map : int64 [Vd], optional
        Draft vocabulary: head logits are over these target ids only (``Vd < vocab_size``).

    Attributes
    ----------
    block_weight : [K, L, H, H]; block_bias : [K, L, H] or None
    lm_head : [K, Vd, H] or None (None: rows ``token_map`` of the target's LM head)
    """

    def __init__(self, hidden_size: int, vocab_size: int, num_heads: int, num_layers: int = 1,
                 *, bias: bool = True, own_lm_head: bool = False,
                 token_map: Optional[torch.Tensor] = None, dtype=torch.float32, device="cpu"):
        super().__init__()
        if num_heads < 1 or num_layers < 0:
            raise ValueError(f"need num_heads >= 1 and num_layers >= 0, got {num_heads}, "
                             f"{num_layers}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.num_heads, self.num_layers = num_heads, num_layers
        h = hidden_size
        self.block_weight = nn.Parameter(torch.zeros(num_heads, num_layers, h, h, dtype=dtype,
                                                     device=device))
        self.block_bias = (nn.Parameter(torch.zeros(num_heads, num_layers, h, dtype=dtype,
                                                    device=device)) if bias else None)
        if token_map is not None:
            token_map = _check_token_map(token_map, vocab_size)
        self.register_buffer("token_map", None if token_map is None else token_map.to(device))
        vd = vocab_size if token_map is None else token_map.numel()
        self.lm_head = (nn.Parameter(torch.zeros(num_heads, vd, h, dtype=dtype, device=device))
                        if own_lm_head else None)
        self._shared = None  # (target lm_head, rows) cache of the gathered shared projection

    @property
    def draft_vocab_size(self) -> int:
        return self.vocab_size if self.token_map is None else self.token_map.numel()

    @property
    def own_lm_head(self) -> bool:
        return self.lm_head is not None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Residual blocks of every head: ``x`` [N, H] (target hidden, final-normed) ->
        [K, N, H]."""
        y = x.unsqueeze(0).expand(self.num_heads, *x.shape)
        for j in range(self.num_layers):
            w = self.block_weight[:, j].transpose(1, 2)  # [K, H, H]: y @ W^T
            z = (torch.baddbmm(self.block_bias[:, j, None, :], y, w) if self.block_bias is not None
                 else torch.bmm(y, w))
            y = y + F.silu(z)
        return y

    def projection(self, target_lm_head: Optional[torch.Tensor]) -> torch.Tensor:
        """The output projection, [K, Vd, H] or (shared) [Vd, H]."""
        if self.lm_head is not None:
            return self.lm_head
        if target_lm_head is None:
            raise ValueError("these Medusa heads use the target's LM head: pass it")
        if self.token_map is None:
            return target_lm_head
        c = self._shared
        if c is None or c[0] is not target_lm_head or c[1].device != target_lm_head.device:
            rows = target_lm_head.index_select(0, self.token_map.to(target_lm_head.device))
            self._shared = c = (target_lm_head, rows)
        return c[1]

    def forward(self, x: torch.Tensor, target_lm_head: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [K, N, Vd] (float32) of every head for final-normed hidden states ``x``
        [N, H]. Column ``c`` is target token ``token_map[c]`` (or ``c`` without a map)."""
        y = self.features(x)
        w = self.projection(target_lm_head)
        if w.dim() == 3:
            return torch.bmm(y, w.transpose(1, 2)).float()
        return torch.matmul(y, w.t()).float()

    def to_target_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return idx if self.token_map is None else self.token_map.to(idx.device)[idx]


def _check_token_map(token_map, vocab_size: int) -> torch.Tensor:
    t = torch.as_tensor(token_map)
    if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"token_map must be a non-empty 1-D integer tensor, got "
                         f"{t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise ValueError(f"token_map holds ids outside the target vocabulary [0, {vocab_size})")
    if torch.unique(t).numel() != t.numel():
        raise ValueError("token_map holds duplicate token ids")
    return t


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_FD_BLOCK = re.compile(r"^(\d+)\.(\d+)\.linear\.(weight|bias)$")
_FD_HEAD = re.compile(r"^(\d+)\.(\d+)\.weight$")
_VLLM_BLOCK = re.compile(r"^blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)$")
_VLLM_HEAD = re.compile(r"^lm_heads\.(\d+)\.weight$")


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: unreadable safetensors file: {e}") from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable PyTorch checkpoint: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


_WEIGHT_FILES = ("medusa_lm_head.safetensors", "model.safetensors", "medusa_lm_head.pt",
                 "pytorch_model.bin", "medusa_lm_head.bin")


def _find_weights(path: Path) -> tuple[Path, dict]:
    """(weights file, config dict) of a Medusa checkpoint directory or file."""
    if path.is_file():
        cfg_file = path.parent / "config.json"
        wfile = path
    elif path.is_dir():
        cfg_file = path / "config.json"
        wfile = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if wfile is None:
            raise FileNotFoundError(f"{path}: no Medusa weights (looked for "
                                    f"{', '.join(_WEIGHT_FILES)})")
    else:
        raise FileNotFoundError(f"{path}: no such Medusa checkpoint")
    cfg = {}
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
    return wfile, cfg


def load_medusa_heads(path: Union[str, Path], target_config=None, *, dtype=None,
                      device="cpu") -> tuple[MedusaHeads, str, dict]:
    """Load Medusa heads in any of the three public layouts.

    Parameters
    ----------
    path : a checkpoint directory (``config.json`` + weights) or a weights file
    target_config : the target's :class:`~specrt.models.ModelConfig`; its hidden size and
        vocabulary are checked against the heads' (clear error on mismatch)

    Returns
    -------
    (heads, layout, config) with layout one of :data:`LAYOUTS`.
    """
    wfile, cfg = _find_weights(Path(path))
    sd = {k[len("medusa_heads."):] if k.startswith("medusa_heads.") else k: v
          for k, v in _read_tensors(wfile).items()}
    src = str(wfile)
    blocks: dict = {}
    heads: dict = {}
    token_map = sd.pop("token_map", None)
    if any(_VLLM_BLOCK.match(k) or _VLLM_HEAD.match(k) for k in sd):
        layout, block_re, head_re = "vllm", _VLLM_BLOCK, _VLLM_HEAD
    else:
        layout, block_re, head_re = "resblock", _FD_BLOCK, _FD_HEAD
    unknown = []
    for k, v in sd.items():
        m = block_re.match(k)
        if m:
            blocks[(int(m.group(1)), int(m.group(2)), m.group(3))] = v
            continue
        m = head_re.match(k)
        if m:
            if layout == "vllm":
                heads[int(m.group(1))] = v
            else:
                heads[(int(m.group(1)), int(m.group(2)))] = v
            continue
        unknown.append(k)
    if unknown:
        raise ValueError(f"{src}: not a Medusa checkpoint: unexpected tensors "
                         f"{', '.join(sorted(unknown)[:6])}")
    if not blocks and not heads:
        raise ValueError(f"{src}: no Medusa head tensors found")
    if blocks:
        num_heads = 1 + max(k[0] for k in blocks)
        num_layers = 1 + max(k[1] for k in blocks)
    else:
        num_heads, num_layers = (1 + max(heads) if layout == "vllm"
                                 else 1 + max(k[0] for k in heads)), 0
    if layout == "resblock" and heads:
        # Medusa-1: the output projection is block index num_layers of each head.
        if any(j != num_layers for _, j in heads):
            raise ValueError(f"{src}: Medusa-1 LM head tensors must be '{{head}}.{num_layers}"
                             ".weight' for heads with {num_layers} blocks")
        heads = {k: v for (k, _), v in heads.items()}
        layout = "medusa1"
    cfg_heads = cfg.get("medusa_num_heads", cfg.get("num_heads"))
    cfg_layers = cfg.get("medusa_num_layers", cfg.get("num_hidden_layers"))
    if cfg_heads is not None and int(cfg_heads) != num_heads:
        raise ValueError(f"{src}: config says {cfg_heads} heads, the weights hold {num_heads}")
    if cfg_layers is not None and blocks and int(cfg_layers) != num_layers:
        raise ValueError(f"{src}: config says {cfg_layers} layers per head, the weights hold "
                         f"{num_layers}")
    for k in range(num_heads):
        for j in range(num_layers):
            if (k, j, "weight") not in blocks:
                raise ValueError(f"{src}: head {k} lacks block {j}'s weight")
    if layout == "vllm" and 0 in heads and cfg.get("original_lm_head", False):
        heads = {k: heads[0] for k in range(num_heads)}  # one projection shared by all heads
    if heads and sorted(heads) != list(range(num_heads)):
        raise ValueError(f"{src}: LM heads present for heads {sorted(heads)}, expected all of "
                         f"0..{num_heads - 1}")
    has_bias = any(k[2] == "bias" for k in blocks)
    if has_bias and not all((k, j, "bias") in blocks for k in range(num_heads)
                            for j in range(num_layers)):
        raise ValueError(f"{src}: some residual blocks have a bias and others not")
    hidden = (blocks[(0, 0, "weight")].shape[1] if blocks else heads[0].shape[1])
    vocab = int(cfg.get("vocab_size", 0)) or None
    if target_config is not None:
        if hidden != target_config.hidden_size:
            raise ValueError(f"{src}: Medusa heads of hidden size {hidden} cannot read a target "
                             f"of hidden size {target_config.hidden_size} (heads for another model?)")
        if vocab is not None and vocab != target_config.vocab_size:
            raise ValueError(f"{src}: Medusa heads for a vocabulary of {vocab}, the target has "
                             f"{target_config.vocab_size} (heads for another model?)")
        vocab = target_config.vocab_size
    if heads:
        rows = heads[0].shape[0]
        if token_map is None and vocab is not None and rows != vocab:
            raise ValueError(f"{src}: LM heads of {rows} rows for a vocabulary of {vocab} "
                             "without a token_map (heads for another model?)")
        if vocab is None:
            vocab = rows
    if vocab is None:
        raise ValueError(f"{src}: ResBlock-only heads need the target's config (vocab size)")
    own = bool(heads)
    if own and token_map is not None and heads[0].shape[0] == vocab:
        heads = {k: v[token_map.long()] for k, v in heads.items()}  # vLLM slices at load too
    if own and token_map is not None and heads[0].shape[0] != token_map.numel():
        raise ValueError(f"{src}: LM heads have {heads[0].shape[0]} rows, token_map "
                         f"{token_map.numel()} entries")
    if dtype is None:
        dtype = (blocks[(0, 0, "weight")] if blocks else heads[0]).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
    m = MedusaHeads(hidden, vocab, num_heads, num_layers, bias=has_bias, own_lm_head=own,
                    token_map=token_map, dtype=dtype, device=device)
    with torch.no_grad():
        for (k, j, kind), v in blocks.items():
            dst = m.block_weight[k, j] if kind == "weight" else m.block_bias[k, j]
            if tuple(v.shape) != tuple(dst.shape):
                raise ValueError(f"{src}: head {k} block {j} {kind} has shape {tuple(v.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(v)
        for k, v in heads.items():
            if tuple(v.shape) != tuple(m.lm_head[k].shape):
                raise ValueError(f"{src}: LM head {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(m.lm_head[k].shape)}")
            m.lm_head[k].copy_(v)
    return m.eval().requires_grad_(False), layout, cfg


def save_medusa_heads(heads: MedusaHeads, out_dir: Union[str, Path], layout: str = "resblock",
                      extra_config: Optional[dict] = None) -> Path:
    """Write ``heads`` as ``config.json`` + safetensors in a public layout (:data:`LAYOUTS`).

    ``medusa1`` / ``resblock`` write ``medusa_lm_head.safetensors`` (FasterDecoding names);
    ``vllm`` writes ``model.safetensors``. A head without its own LM head can be written as
    ``medusa1`` / ``vllm`` only with the target's projection copied in: pass it in
    ``extra_config["target_lm_head"]``.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    extra = dict(extra_config or {})
    target_lm_head = extra.pop("target_lm_head", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k_, l_ = heads.num_heads, heads.num_layers
    t: dict = {}
    proj = None
    if layout != "resblock":
        proj = heads.projection(target_lm_head)
        if proj.dim() == 2:
            proj = proj.unsqueeze(0).expand(k_, *proj.shape)
    for k in range(k_):
        for j in range(l_):
            w = heads.block_weight[k, j]
            b = None if heads.block_bias is None else heads.block_bias[k, j]
            if layout == "vllm":
                t[f"blocks.{k}.layers.{j}.weight"] = w
                if b is not None:
                    t[f"blocks.{k}.layers.{j}.bias"] = b
            else:
                t[f"{k}.{j}.linear.weight"] = w
                if b is not None:
                    t[f"{k}.{j}.linear.bias"] = b
        if proj is not None:
            t[f"lm_heads.{k}.weight" if layout == "vllm" else f"{k}.{l_}.weight"] = proj[k]
    if heads.token_map is not None:
        t["token_map"] = heads.token_map
    t = {k: v.detach().cpu().clone().contiguous() for k, v in t.items()}
    if layout == "vllm":
        cfg = {"model_type": "medusa", "architectures": ["MedusaModel"],
               "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size,
               "num_heads": k_, "num_hidden_layers": l_,
               "truncated_vocab_size": heads.draft_vocab_size,
               "medusa_fc_bias": heads.block_bias is not None}
        wname = "model.safetensors"
    else:
        cfg = {"medusa_num_heads": k_, "medusa_num_layers": l_,
               "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size}
        if heads.token_map is not None:
            cfg["truncated_vocab_size"] = heads.draft_vocab_size
        wname = "medusa_lm_head.safetensors"
    cfg.update(extra)
    save_file(t, str(out / wname))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------------------------


def choices_topology(choices: Sequence[Sequence[int]], num_heads: Optional[int] = None):
    """Validate a choice-path list and order it like the reference (by depth, then
    lexicographically: rank order among siblings).

    Returns ``(parents, head_of_node, rank_of_node)`` for the tree with the root at node 0
    (tuples of length ``len(choices) + 1``; the root's head and rank are -1).
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise ValueError("Medusa choices must be a list of paths (lists of ranks)")
    paths = []
    for c in choices:
        if isinstance(c, (str, bytes)) or not isinstance(c, Sequence) or len(c) == 0:
            raise ValueError(f"Medusa choice {c!r} is not a non-empty list of ranks")
        for r in c:
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise ValueError(f"Medusa choice {list(c)!r}: ranks must be integers >= 0")
        paths.append(tuple(c))
    if not paths:
        raise ValueError("Medusa choices must hold at least one path")
    if len(set(paths)) != len(paths):
        raise ValueError("Medusa choices hold a duplicate path")
    known = set(paths)
    for p in paths:
        if len(p) > 1 and p[:-1] not in known:
            raise ValueError(f"Medusa choice {list(p)} lacks its prefix {list(p[:-1])} "
                             "(every prefix of a path must be a choice too)")
    depth = max(len(p) for p in paths)
    if num_heads is not None and depth > num_heads:
        raise ValueError(f"Medusa choices reach depth {depth} but there are only {num_heads} "
                         "heads")
    paths.sort(key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(paths)}
    parents = (-1,) + tuple(index[p[:-1]] if len(p) > 1 else 0 for p in paths)
    heads = (-1,) + tuple(len(p) - 1 for p in paths)
    ranks = (-1,) + tuple(p[-1] for p in paths)
    return parents, heads, ranks


def _best_paths(logp: Sequence[Sequence[float]], budget: int, max_depth: int) -> list:
    """The ``budget`` rank paths of highest total log-probability (ties: earlier found first),
    in the order found, which is topological and rank order among siblings. ``logp[d][r]``:
    log-probability of rank ``r`` at depth ``d + 1``; ranks sorted best first."""
    out = []
    if budget <= 0 or max_depth <= 0 or not logp or not logp[0]:
        return out
    heap = [(-logp[0][0], 0, (0,))]
    tick = 1
    while heap and len(out) < budget:
        neg, _, path = heapq.heappop(heap)
        out.append(path)
        d, r = len(path) - 1, path[-1]
        if r + 1 < len(logp[d]):  # next sibling
            s = -neg - logp[d][r] + logp[d][r + 1]
            heapq.heappush(heap, (-s, tick, path[:-1] + (r + 1,)))
            tick += 1
        if d + 1 < max_depth and d + 1 < len(logp) and logp[d + 1]:  # first child
            heapq.heappush(heap, (neg - logp[d + 1][0], tick, path + (0,)))
            tick += 1
    return out


def sparse_choices(rank_accuracy: Sequence[Sequence[float]], num_nodes: int) -> list:
    """A static tree of ``num_nodes`` draft nodes (root excluded) for heads whose rank-``r``
    candidate at head ``k`` is right with probability ``rank_accuracy[k][r]``: the paths of
    highest expected acceptance, assuming independent heads (Medusa paper, sparse trees).
    Accuracies must be non-increasing in ``r`` to make the result ancestor-closed."""
    logp = []
    for k, row in enumerate(rank_accuracy):
        row = [float(a) for a in row]
        if any(not (0 <= a <= 1) for a in row):
            raise ValueError(f"rank_accuracy[{k}] must hold probabilities in [0, 1]")
        logp.append([math.log(max(a, 1e-12)) for a in row])
    return [list(p) for p in _best_paths(logp, num_nodes, len(logp))]


class _StaticTree:
    """A choice tree, truncated per depth limit (nodes are sorted by depth: a prefix)."""

    def __init__(self, choices, num_heads: int):
        parents, heads, ranks = choices_topology(choices, num_heads)
        self.parents, self.heads, self.ranks = parents, heads, ranks
        self.max_rank = max(ranks)
        depths = [0] + [h + 1 for h in heads[1:]]
        self.num_nodes = len(parents)
        self.depth = max(depths)
        # nodes with depth <= d form a prefix of the node order
        self.prefix = [sum(1 for x in depths if x <= d) for d in range(self.depth + 1)]
        self.topos = [_topology(parents[:n]) for n in self.prefix]

    def tokens(self, root: int, ids_row, depth: int) -> tuple[list, object]:
        """Node tokens from the heads' ranked ids (``ids_row[k][r]``), depth-limited."""
        n = self.prefix[min(depth, self.depth)]
        h, r = self.heads, self.ranks
        return [root] + [ids_row[h[i]][r[i]] for i in range(1, n)], self.topos[min(depth, self.depth)]


# --------------------------------------------------------------------------------------------
# proposer
# --------------------------------------------------------------------------------------------


class MedusaProposer(LastHiddenProposer):
    """Medusa drafting on the target's hidden states.

    Parameters
    ----------
    target : the target :class:`~specrt.models.LlamaModel` (its final norm and, for heads
        without their own, its LM head are used)
    heads : :class:`MedusaHeads`, or a checkpoint path (any public layout)
    tree : ``"dynamic"`` (default: per-step best paths of the heads' probabilities),
        ``"mc_sim_7b_63"``, ``"calibrated"`` (a static tree from the checkpoint's measured
        per-rank accuracies, ``medusa_rank_accuracy`` in its config), or a list of choice paths
    num_nodes : node budget of a tree, root included (dynamic and calibrated trees; a choice
        list defines its own size). The right size is the device's: a GPU verifies 64 nodes
        for about the price of one, a 2-core CPU pays for each.
    top_k : candidates kept per head for dynamic trees (ranks 0..top_k-1)
    """

    name = "medusa"
    drafts_trees = True

    def __init__(self, target, heads, *, tree: Union[str, Sequence] = "dynamic",
                 num_nodes: int = 16, top_k: int = 8, dtype=None):
        cfg = target.config
        p = next(target.parameters())
        info: dict = {}
        if not isinstance(heads, MedusaHeads):
            heads, _, info = load_medusa_heads(heads, cfg, dtype=dtype or p.dtype,
                                               device=p.device)
        else:
            if heads.hidden_size != cfg.hidden_size or heads.vocab_size != cfg.vocab_size:
                raise ValueError(f"Medusa heads for hidden {heads.hidden_size} / vocab "
                                 f"{heads.vocab_size}, target has {cfg.hidden_size} / "
                                 f"{cfg.vocab_size}")
            heads = heads.to(device=p.device, dtype=dtype or p.dtype)
        self.heads = heads.eval().requires_grad_(False)
        self.target = target
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = heads.num_heads
        self.static: Optional[_StaticTree] = None
        if isinstance(tree, str):
            if tree == "dynamic":
                pass
            elif tree == "mc_sim_7b_63":
                self.static = _StaticTree(
                    [c for c in MC_SIM_7B_63 if len(c) <= k], k)
            elif tree == "calibrated":
                acc = info.get("medusa_rank_accuracy")
                if not acc:
                    raise ValueError("tree='calibrated' needs a checkpoint whose config has "
                                     "medusa_rank_accuracy (written by specrt train medusa)")
                self.static = _StaticTree(sparse_choices(acc[:k], num_nodes - 1), k)
            else:
                raise ValueError(f"unknown Medusa tree {tree!r} (dynamic, mc_sim_7b_63, "
                                 "calibrated, or a list of choice paths)")
        else:
            self.static = _StaticTree(tree, k)
        if self.static is not None:
            if self.static.max_rank >= heads.draft_vocab_size:
                raise ValueError(f"Medusa choices use rank {self.static.max_rank}, beyond the "
                                 f"heads' vocabulary of {heads.draft_vocab_size}")
            self.max_nodes = self.static.num_nodes
            self.top_k = self.static.max_rank + 1
        else:
            self.max_nodes = num_nodes
            self.top_k = min(top_k, heads.draft_vocab_size)
        self._hidden: dict[int, torch.Tensor] = {}  # seq_id -> [H] pre-norm hidden

    @property
    def max_depth(self) -> int:
        return self.heads.num_heads

    # -- drafting -----------------------------------------------------------------------------
    @torch.no_grad()
    def head_candidates(self, hidden: torch.Tensor, k: int):
        """Top-``k`` target ids and log-probabilities of every head: ([B, K, k], [B, K, k])
        for pre-norm hidden states [B, H]."""
        x = self.target.norm(hidden)
        logits = self.heads(x, None if self.heads.own_lm_head else self.target.lm_head)
        lp = torch.log_softmax(logits, dim=-1)
        vals, idx = lp.topk(k, dim=-1)  # [K, B, k]
        return (self.heads.to_target_ids(idx).transpose(0, 1),
                vals.transpose(0, 1))

    def propose(self, seqs):
        trees: list = [None] * len(seqs)
        todo = []
        for i, s in enumerate(seqs):
            if s.max_draft < 1 or s.seq_id not in self._hidden:
                trees[i] = DraftTree.single(s.token_ids[-1])
            else:
                todo.append(i)
        if not todo:
            return trees
        h = torch.stack([self._hidden[seqs[i].seq_id] for i in todo])
        ids, lps = self.head_candidates(h, self.top_k)
        ids = ids.cpu().tolist()
        lps = lps.cpu().tolist() if self.static is None else None
        for j, i in enumerate(todo):
            s = seqs[i]
            root = s.token_ids[-1]
            depth = min(s.max_draft, self.heads.num_heads)
            if self.static is not None:
                toks, topo = self.static.tokens(root, ids[j], depth)
                trees[i] = DraftTree._make(toks, topo).truncated(depth, s.max_nodes)
                continue
            paths = _best_paths(lps[j], min(self.max_nodes, s.max_nodes) - 1, depth)
            tokens, parents, index, logp = [root], [-1], {(): 0}, [0.0]
            for p in paths:
                index[p] = len(tokens)
                parents.append(index[p[:-1]])
                tokens.append(ids[j][len(p) - 1][p[-1]])
                logp.append(min(0.0, logp[index[p[:-1]]] + lps[j][len(p) - 1][p[-1]]))
            # the heads' path probabilities: the policy trims node by node on them
            trees[i] = DraftTree._make(tokens, _topology(tuple(parents)), node_logp=logp)
        return trees
