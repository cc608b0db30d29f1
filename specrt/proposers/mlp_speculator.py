"""Multi-stage MLP speculator (IBM fms-extras ``MLPSpeculator``; Wertheimer et al. 2024,
"Accelerating Production LLMs with Combined Token/Embedding Speculators").

Like Medusa it reads the target's final-normed last hidden state ``h`` at the last accepted
position (the one whose LM head produced the root), but its stages form a chain, each
conditioned on the token the previous stage chose (an RNN over draft tokens). Stage ``i``
(0-based) of ``n_predict``::

    state_0 = h                                   (scale_input: rmsnorm(h) / sqrt(2))
    z       = emb_i(token_i) * emb_weight * sqrt(inner_dim / 2)
    state   = gelu(ln_i(proj_i(state) * state_weight + z))
    logits_i = head_i(state)

with ``token_0`` the root, ``token_{i+1}`` stage ``i``'s choice, ``state_weight = 0.5 **
(0.5 / n_predict)`` and ``emb_weight = sqrt(1 - state_weight ** 2)`` (fixed: the base
model's state keeps about half of the state's magnitude by the last stage). ``ln_i`` is an
RMS norm (no mean subtraction, eps 1e-6) with a learned scale and shift. ``tie_weights``
shares one embedding, one head, one norm and one ``inner -> inner`` projection (stages >= 1)
over all stages; ``proj_0`` (``emb_dim -> inner_dim``) stays separate.

Trees (fms-extras ``generate_suffixes`` with a node budget): every stage keeps the top
``top_k_tokens_per_head[i]`` tokens of every candidate, so depth ``d`` holds the cartesian
product of ranks; full-depth candidate paths are ranked by the product of their stages'
probabilities, and the best ``n_candidates`` of them are merged on shared prefixes into one
tree (fms-extras' ``flatten_batch``) until the node budget is spent (the first path that no
longer fits contributes the prefix that does). The drafts are deterministic, so verification
is the engine's lossless greedy / recursive-rejection one.

Checkpoint layout (as published on the HF hub for Llama-3-8B / Granite accelerators and read
by vLLM / TGI): ``config.json`` with ``n_predict``, ``inner_dim`` (0 = ``emb_dim``),
``emb_dim``, ``vocab_size``, optional ``tie_weights``, ``scale_input``,
``top_k_tokens_per_head``, ``n_candidates``; tensors ``emb.{i}.weight`` [V, inner],
``proj.{i}.weight`` [inner, emb_dim or inner], ``ln.{i}.weight|bias`` [inner],
``head.{i}.weight`` [V, inner] (optional ``speculator.`` prefix). A tied checkpoint may hold
only the first copy of each shared tensor (``emb.0``, ``proj.0``, ``proj.1``, ``ln.0``,
``head.0``; what specrt writes) or all of them (equal).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import DraftTree, _topology
from .base import LastHiddenProposer
from .medusa import _read_tensors  # safetensors / torch checkpoint, errors as ValueError

__all__ = ["MLPSpeculator", "MLPSpeculatorProposer", "load_mlp_speculator",
           "save_mlp_speculator", "default_mlp_speculator", "merge_paths", "SHIPPED"]

#: directory name of the speculator shipped for the default model (under specrt/heads)
SHIPPED = "smollm2-135m-mlp-speculator"

_EPS = 1e-6


class _RMSLayerNorm(nn.Module):
    """fms ``LayerNormParameterized(use_mean=False)``: ``x / rms(x) * weight + bias``."""

    def __init__(self, size: int, affine: bool = True, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype, device=device)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS)).to(x.dtype)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y


class MLPSpeculator(nn.Module):
    """The speculator's weights and its stage function.

    Parameters
    ----------
    emb_dim : the target's hidden size
    inner_dim : state size (0: ``emb_dim``)
    vocab_size : the target's vocabulary
    n_predict : number of stages (draft depth)
    tie_weights : one embedding / head / norm for all stages, one projection for stages >= 1
    scale_input : RMS-normalise the target's state and divide it by sqrt(2) first

    Module names follow the public layout (``emb.{i}``, ``proj.{i}``, ``ln.{i}``, ``head.{i}``);
    tied stages hold the same module object.
    """

    def __init__(self, emb_dim: int, inner_dim: int, vocab_size: int, n_predict: int, *,
                 tie_weights: bool = False, scale_input: bool = False, dtype=torch.float32,
                 device="cpu"):
        super().__init__()
        if n_predict < 1:
            raise ValueError(f"n_predict must be >= 1, got {n_predict}")
        if tie_weights and n_predict < 2:
            raise ValueError("tie_weights needs n_predict >= 2 (nothing to tie with one stage)")
        inner = int(inner_dim) or int(emb_dim)
        self.emb_dim, self.inner_dim, self.vocab_size = int(emb_dim), inner, int(vocab_size)
        self.n_predict, self.tie_weights, self.scale_input = n_predict, tie_weights, scale_input
        kw = dict(dtype=dtype, device=device)

        def emb():
            return nn.Embedding(vocab_size, inner, **kw)

        def lin(i_dim):
            return nn.Linear(i_dim, inner, bias=False, **kw)

        def head():
            return nn.Linear(inner, vocab_size, bias=False, **kw)

        def ln():
            return _RMSLayerNorm(inner, **kw)

        if tie_weights:
            e, h, l_, p1 = emb(), head(), ln(), lin(inner)
            self.emb = nn.ModuleList([e] * n_predict)
            self.proj = nn.ModuleList([lin(emb_dim)] + [p1] * (n_predict - 1))
            self.head = nn.ModuleList([h] * n_predict)
            self.ln = nn.ModuleList([l_] * n_predict)
        else:
            self.emb = nn.ModuleList(emb() for _ in range(n_predict))
            self.proj = nn.ModuleList(lin(emb_dim if i == 0 else inner) for i in range(n_predict))
            self.head = nn.ModuleList(head() for _ in range(n_predict))
            self.ln = nn.ModuleList(ln() for _ in range(n_predict))
        self.ln0 = _RMSLayerNorm(emb_dim, affine=False, **kw) if scale_input else None
        self.state_weight = 0.5 ** (0.5 / n_predict)
        self.emb_weight = math.sqrt(1 - self.state_weight ** 2) * math.sqrt(inner / 2)
        self._live: dict = {}  # stage -> (head weight, (live rows, their weights) or None)

    def config_dict(self) -> dict:
        return {"emb_dim": self.emb_dim, "inner_dim": self.inner_dim,
                "vocab_size": self.vocab_size, "n_predict": self.n_predict,
                "tie_weights": self.tie_weights, "scale_input": self.scale_input}

    # -- the formula ---------------------------------------------------------------------------
    def input_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The initial state from the target's final-normed hidden state(s) [..., emb_dim]."""
        return self.ln0(hidden) / math.sqrt(2) if self.ln0 is not None else hidden

    def stage(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s new state [..., inner] from the previous state and the token ids
        [...] it conditions on."""
        z = self.emb[i](tokens) * self.emb_weight
        return F.gelu(self.ln[i](self.proj[i](state) * self.state_weight + z))

    def logits(self, i: int, state: torch.Tensor) -> torch.Tensor:
        return self.head[i](state)

    def forward(self, hidden: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every stage (fms-extras' training forward).

        Parameters
        ----------
        hidden : [B, N, emb_dim], the target's final-normed states at positions ``t``
        inds : int64 [B, N + n_predict]
            ``inds[:, t + i]`` is stage ``i``'s input token at ``t`` (the token after ``t``,
            then the true continuation).

        Returns
        -------
        [n_predict, B, N, V]
        """
        n = hidden.shape[1]
        state = self.input_state(hidden)
        out = []
        for i in range(self.n_predict):
            state = self.stage(i, state, inds[:, i:i + n])
            out.append(self.logits(i, state))
        return torch.stack(out)

    # -- inference -----------------------------------------------------------------------------
    def _live_rows(self, i: int):
        """(live row ids, their weights) of head ``i`` when most of its rows are all zero
        (a head trained over a reduced vocabulary), else None; cached per weight version."""
        w = self.head[i].weight
        c = self._live.get(i)
        if c is None or c[0] is not w or c[2] != w._version:
            live = torch.nonzero(w.detach().abs().sum(-1) != 0).flatten()
            sparse = 0 < live.numel() <= 0.75 * w.shape[0]
            self._live[i] = c = (w, (live, w.detach()[live]) if sparse else None, w._version)
        return c[1]

    def fast_logits(self, i: int, state: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` as float32, computing only the live head rows (the others' logits
        are exactly 0)."""
        rows = self._live_rows(i)
        if rows is None:
            return F.linear(state, self.head[i].weight).float()
        live, wl = rows
        out = torch.zeros(*state.shape[:-1], self.vocab_size, dtype=torch.float32,
                          device=state.device)
        out[..., live] = F.linear(state, wl).float()
        return out

    def top_candidates(self, i: int, state: torch.Tensor, k: int) -> tuple:
        """Stage ``i``'s ``k`` most likely tokens: (log-probabilities [R, k] float32, token ids
        [R, k]) for states [R, inner]. With a sparse head only live rows are candidates (a
        zero row's token has logit 0 and is never drafted); its probability mass still counts
        in the normaliser, so the log-probabilities are the dense model's."""
        rows = self._live_rows(i)
        if rows is None:
            lp = torch.log_softmax(F.linear(state, self.head[i].weight).float(), dim=-1)
            return lp.topk(k, dim=-1)
        live, wl = rows
        lg = F.linear(state, wl).float()
        rest = math.log(self.vocab_size - live.numel())
        lse = torch.logaddexp(torch.logsumexp(lg, dim=-1, keepdim=True),
                              torch.full_like(lg[..., :1], rest))
        vals, idx = lg.topk(min(k, lg.shape[-1]), dim=-1)
        return vals - lse, live[idx]

    # -- checkpoints ---------------------------------------------------------------------------
    def layout_state_dict(self) -> dict:
        """Tensors under the public names; a tied speculator writes each shared tensor once."""
        sd = {}
        for i in range(self.n_predict):
            first = not self.tie_weights or i == 0
            if first:
                sd[f"emb.{i}.weight"] = self.emb[i].weight
                sd[f"head.{i}.weight"] = self.head[i].weight
                sd[f"ln.{i}.weight"] = self.ln[i].weight
                sd[f"ln.{i}.bias"] = self.ln[i].bias
            if first or i == 1:
                sd[f"proj.{i}.weight"] = self.proj[i].weight
        return sd


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


def load_mlp_speculator(path: Union[str, Path], target=None, *, dtype=None,
                        device=None) -> tuple:
    """Load an MLP speculator in the public layout.

    Parameters
    ----------
    path : checkpoint directory (``config.json`` + ``model.safetensors`` or
        ``pytorch_model.bin``)
    target : the target model (or its :class:`~specrt.models.ModelConfig`): its hidden size
        and vocabulary are checked against ``emb_dim`` / ``vocab_size``; its dtype and device
        are the defaults

    Returns
    -------
    (MLPSpeculator, config dict)
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such MLP speculator checkpoint directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{p}: no config.json (an MLP speculator checkpoint needs one)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
    wfile = next((p / n for n in _WEIGHT_FILES if (p / n).is_file()), None)
    if wfile is None:
        raise FileNotFoundError(f"{p}: no weights (looked for {', '.join(_WEIGHT_FILES)})")
    for k in ("n_predict", "emb_dim", "vocab_size"):
        if k not in cfg:
            raise ValueError(f"{cfg_file}: missing {k!r} (not an MLP speculator config)")
    n, emb_dim, vocab = int(cfg["n_predict"]), int(cfg["emb_dim"]), int(cfg["vocab_size"])
    inner = int(cfg.get("inner_dim", 0) or 0) or emb_dim
    tie, scale = bool(cfg.get("tie_weights", False)), bool(cfg.get("scale_input", False))
    tcfg = getattr(target, "config", target)
    if tcfg is not None:
        if emb_dim != tcfg.hidden_size:
            raise ValueError(f"{p}: MLP speculator for hidden size {emb_dim} cannot read a "
                             f"target of hidden size {tcfg.hidden_size} (made for another model)")
        if vocab != tcfg.vocab_size:
            raise ValueError(f"{p}: MLP speculator over a vocabulary of {vocab}, the target has "
                             f"{tcfg.vocab_size} (made for another model)")
    sd = {k[len("speculator."):] if k.startswith("speculator.") else k: v
          for k, v in _read_tensors(wfile).items()}
    if not isinstance(target, nn.Module):
        target = None
    if dtype is None:
        dtype = target.dtype if target is not None else next(iter(sd.values())).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
    if device is None:
        device = next(target.parameters()).device if target is not None else "cpu"
    m = MLPSpeculator(emb_dim, inner, vocab, n, tie_weights=tie, scale_input=scale,
                      dtype=dtype, device=device)
    want = m.layout_state_dict()
    shapes = {}
    for i in range(n):
        shapes[f"emb.{i}.weight"] = (vocab, inner)
        shapes[f"head.{i}.weight"] = (vocab, inner)
        shapes[f"ln.{i}.weight"] = shapes[f"ln.{i}.bias"] = (inner,)
        shapes[f"proj.{i}.weight"] = (inner, emb_dim if i == 0 else inner)
    unknown = sorted(k for k in sd if k not in shapes)
    if unknown:
        raise ValueError(f"{wfile}: not an MLP speculator with n_predict={n}: unexpected tensors "
                         f"{', '.join(unknown[:6])}")
    missing = sorted(k for k in want if k not in sd)
    if missing:
        raise ValueError(f"{wfile}: missing tensors {', '.join(missing[:6])}"
                         + (" (tie_weights checkpoint)" if tie else ""))
    for k, v in sd.items():
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{wfile}: tensor {k} has shape {tuple(v.shape)}, expected "
                             f"{shapes[k]} (config: emb_dim {emb_dim}, inner_dim {inner}, "
                             f"vocab_size {vocab})")
    if tie:  # extra copies of tied tensors must be copies
        for k, v in sd.items():
            if k in want:
                continue
            kind, i, rest = k.split(".", 2)
            first = f"{kind}.{1 if kind == 'proj' else 0}.{rest}"
            if not torch.equal(v, sd[first]):
                raise ValueError(f"{wfile}: tie_weights is set but {k} differs from {first}")
    with torch.no_grad():
        for k, dst in want.items():
            dst.copy_(sd[k])
    return m.eval().requires_grad_(False), cfg


def save_mlp_speculator(spec: MLPSpeculator, out_dir: Union[str, Path],
                        extra_config: Optional[dict] = None, dtype=torch.float16) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the public layout (``dtype``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = {k: v.detach().to(device="cpu", dtype=dtype).contiguous().clone()
         for k, v in spec.layout_state_dict().items()}
    cfg = {"architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator",
           **spec.config_dict(), "torch_dtype": str(dtype).replace("torch.", "")}
    cfg.update(extra_config or {})
    save_file(t, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def default_mlp_speculator(target) -> str:
    """The MLP speculator shipped for the default model (SmolLM2-135M-Instruct); ValueError for
    another target."""
    path = Path(__file__).resolve().parent.parent / "heads" / SHIPPED
    c = target.config
    if (c.hidden_size, c.vocab_size, c.num_layers) != (576, 49152, 30):
        raise ValueError("--proposer mlp-speculator needs --mlp-speculator PATH: specrt ships "
                         "a speculator for the default model (smollm2-135m) only")
    if not (path / "config.json").is_file():
        raise ValueError(f"the shipped MLP speculator is missing ({path}); pass "
                         "--mlp-speculator PATH")
    return str(path)


# --------------------------------------------------------------------------------------------
# trees
# --------------------------------------------------------------------------------------------


def merge_paths(root: int, paths: Sequence[Sequence[int]], budget: int,
                scores: Optional[Sequence[float]] = None) -> tuple:
    """Merge token paths (best first) on their shared prefixes into one tree of at most
    ``budget`` draft nodes (root excluded). A path that no longer fits adds the prefix that
    does, then merging stops. Returns ``(tokens, parents)`` with the root at node 0, nodes in
    topological order; with the paths' log-probability ``scores``, ``(tokens, parents,
    node_logp)``: each node's score is that of the first (best) path through it, a lower bound
    of its prefix's probability (0 at the root)."""
    tokens, parents, logp = [root], [-1], [0.0]
    index: dict = {(): 0}
    for j, path in enumerate(paths):
        if len(tokens) - 1 >= budget:
            break
        key = ()
        for tok in path:
            child = key + (int(tok),)
            if child not in index:
                if len(tokens) - 1 >= budget:
                    break
                index[child] = len(tokens)
                tokens.append(int(tok))
                parents.append(index[key])
                if scores is not None:
                    logp.append(min(0.0, float(scores[j])))
            key = child
    return (tokens, parents) if scores is None else (tokens, parents, logp)


# --------------------------------------------------------------------------------------------
# proposer
# --------------------------------------------------------------------------------------------


class MLPSpeculatorProposer(LastHiddenProposer):
    """Drafting with an MLP speculator on the target's hidden state.

    Parameters
    ----------
    target : the target :class:`~specrt.models.LlamaModel` (its final norm is used)
    speculator : :class:`MLPSpeculator` or a checkpoint directory (public layout)
    top_k : tokens kept per stage (list, one per stage; an int is used for every stage)
    n_candidates : best full-depth candidate paths merged into the tree
    num_nodes : node budget of a tree, root included. On a 2-core CPU each node costs
        (smaller trees win); on a GPU dozens cost about one.

    Defaults, in this order: the checkpoint's ``specrt_tree[device]`` (``"cpu"`` / ``"cuda"``:
    settings measured by specrt for that device kind), its public ``top_k_tokens_per_head`` /
    ``n_candidates``, then top-k ``[4, 3, 2, 2, ...]``, 5 candidates, 16 nodes.
    """

    name = "mlp-speculator"

    def __init__(self, target, speculator, *, top_k: Union[int, Sequence[int], None] = None,
                 n_candidates: Optional[int] = None, num_nodes: Optional[int] = None,
                 dtype=None):
        p = next(target.parameters())
        info: dict = {}
        if isinstance(speculator, MLPSpeculator):
            c = target.config
            if speculator.emb_dim != c.hidden_size or speculator.vocab_size != c.vocab_size:
                raise ValueError(f"MLP speculator for hidden {speculator.emb_dim} / vocab "
                                 f"{speculator.vocab_size}, target has {c.hidden_size} / "
                                 f"{c.vocab_size} (made for another model)")
            spec = speculator.to(device=p.device, dtype=dtype or p.dtype)
        else:
            spec, info = load_mlp_speculator(speculator, target, dtype=dtype or p.dtype,
                                             device=p.device)
        self.spec = spec.eval().requires_grad_(False)
        self.target = target
        n = spec.n_predict
        tuned = (info.get("specrt_tree") or {}).get("cuda" if p.is_cuda else "cpu") or {}
        if top_k is None:
            top_k = (tuned.get("top_k") or info.get("top_k_tokens_per_head")
                     or [max(2, 4 - i) for i in range(n)])
        if isinstance(top_k, int):
            top_k = [top_k] * n
        top_k = [int(k) for k in top_k]
        if len(top_k) < n:
            raise ValueError(f"top_k needs one entry per stage ({n}), got {top_k}")
        if any(k < 1 for k in top_k):
            raise ValueError(f"top_k entries must be >= 1, got {top_k}")
        self.top_k = [min(k, spec.vocab_size) for k in top_k[:n]]
        self.n_candidates = int(n_candidates or tuned.get("n_candidates")
                                or info.get("n_candidates") or 5)
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {self.n_candidates}")
        self.max_nodes = int(num_nodes if num_nodes is not None else tuned.get("num_nodes", 16))
        if self.max_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.max_nodes}")
        self.max_depth = n
        self.drafts_trees = self.n_candidates > 1 and self.max_nodes > n + 1
        self._hidden: dict = {}  # seq_id -> [H] pre-norm hidden that predicted the root

    # -- drafting -----------------------------------------------------------------------------
    @torch.no_grad()
    def candidates(self, hidden: torch.Tensor, roots: torch.Tensor, depth: int) -> list:
        """The cartesian candidate expansion of a batch: per depth ``d = 1..depth`` a pair
        (tokens int64 [B, M_d, d], log-probabilities [B, M_d]) with ``M_d`` = the product of
        the first ``d`` top-k's, candidates in rank order (parent-major). ``hidden``: pre-norm
        target states [B, H]; ``roots``: int64 [B]."""
        b = hidden.shape[0]
        spec = self.spec
        state = spec.input_state(self.target.norm(hidden))  # [B, emb_dim]
        tok = roots
        paths = torch.empty(b, 1, 0, dtype=torch.long, device=hidden.device)
        score = torch.zeros(b, 1, device=hidden.device)
        out = []
        for i in range(depth):
            k = self.top_k[i]
            state = spec.stage(i, state, tok)  # [B * M, inner]
            vals, idx = spec.top_candidates(i, state, k)  # [B * M, k]
            k = vals.shape[-1]
            m = paths.shape[1]
            paths = torch.cat([paths.unsqueeze(2).expand(b, m, k, i),
                               idx.view(b, m, k, 1)], dim=3).view(b, m * k, i + 1)
            score = (score.unsqueeze(2) + vals.view(b, m, k)).view(b, m * k)
            out.append((paths, score))
            state = state.repeat_interleave(k, dim=0)
            tok = idx.reshape(-1)
        return out

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
        depths = [min(seqs[i].max_draft, self.spec.n_predict) for i in todo]
        h = torch.stack([self._hidden[seqs[i].seq_id] for i in todo])
        roots = torch.tensor([seqs[i].token_ids[-1] for i in todo], dtype=torch.long,
                             device=h.device)
        levels = self.candidates(h, roots, max(depths))
        host = {}
        for j, i in enumerate(todo):
            d = depths[j]
            if d not in host:
                paths, score = levels[d - 1]
                nc = min(self.n_candidates, paths.shape[1])
                top = score.topk(nc, dim=1)  # ties: torch's order, deterministic
                host[d] = (torch.gather(paths, 1, top.indices.unsqueeze(-1).expand(-1, -1, d))
                           .cpu().tolist(), top.values.cpu().tolist())
            toks, parents, logp = merge_paths(seqs[i].token_ids[-1], host[d][0][j],
                                              min(self.max_nodes, seqs[i].max_nodes) - 1,
                                              host[d][1][j])
            # confidences: the policy trims node by node on them
            trees[i] = DraftTree._make(toks, _topology(tuple(parents)), node_logp=logp)
        return trees
