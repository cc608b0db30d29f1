"""EAGLE (Li et al. 2024): a one-layer decoder head that drafts at the feature level.

The head autoregresses on the target's features: at head position ``i`` it reads the pair
``(feature f_i, token t_{i+1})`` and predicts ``t_{i+2}`` (and, through its output hidden
state, the feature that the next drafting step reads). Two head families:

* **EAGLE-1 / EAGLE-2** (``variant="eagle1"``): ``x = fc(cat(embed(t), f))`` (2H -> H, with
  bias) into one decoder layer without input norm; logits through the target's frozen LM head,
  no final norm. The feature is the target's last hidden state *after* its final norm (what
  the reference feeds: the base model's normed output, to which the LM head applies directly),
  and the head's output hidden state lives in the same space.
* **EAGLE-3** (``variant="eagle3"``): target features are three layers' hidden states (the
  inputs of layers 2, L/2 and L-3, concatenated to 3H), fused by ``fc`` (3H -> H, no bias);
  the decoder layer's attention reads ``cat(input_layernorm(embed(t)), hidden_norm(h))`` (2H
  wide), its residual is ``h``; a final norm and the head's own LM head over a reduced draft
  vocabulary (``d2t``: target id = draft id + d2t[draft id]; ``t2d``: target ids in the draft
  vocabulary). Later drafting steps feed the head's own output hidden state (H wide: no fc).

The token embedding is always the target's.

Head cache and rollback
-----------------------
The head keeps its own one-layer paged KV cache. At each step it first catches up on the
positions the target verified since the last step, with the *target's* features (the draft
K/V of the accepted nodes were computed from the head's own features and differ), then grows
the draft tree in scratch slots past that prefix. After verification the head cache is cut back
to the target's committed length (a length change; the scratch pages are trimmed), which makes
it equal, bit for bit, to a head cache rebuilt from scratch on the accepted tokens.

Trees
-----
* ``"dynamic"`` (EAGLE-2, default): the root's ``top_k`` best tokens form the first frontier;
  each of ``depth - 1`` levels runs the frontier through the head (one batched forward for the
  whole batch, tree mask among the drafted nodes), scores the ``top_k`` best children of each
  frontier node by cumulative log-probability and keeps the ``top_k`` best as the next
  frontier. All scored nodes are then reranked and the best ``total_tokens - 1`` kept
  (ancestor-closed: a child never scores above its parent; ties go to the earlier node).
  ``total_tokens="auto"`` picks the count per step from the engine's measured cost table
  (:class:`specrt.policy.CostTable`, handed over by :meth:`EagleProposer.set_costs`; the
  proposer times nothing itself): the number of nodes that maximises expected emitted tokens
  (1 + the kept nodes' cumulative probabilities, the EAGLE-2 observation that draft confidence
  approximates acceptance) per unit of step time, within the step's node budget. The choice
  depends on the cost table, fixed for the engine's life, and the drafts, never on live
  timings.
* static choice trees (EAGLE-1): ``"mc_sim_7b_63"`` or a list of rank paths, as for Medusa.

Verification is the engine's exact rule (lossless; the drafts are deterministic, so sampled
requests get the recursive rejection over siblings).

Checkpoint layouts (detected from the tensor names, :func:`load_eagle_head`):

==================  =====================================================================
SafeAILab EAGLE-1/2 ``fc.weight``, ``fc.bias``, ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
                    ``layers.0.post_attention_layernorm.weight``, ``layers.0.mlp.*``
SafeAILab EAGLE-3   ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,
                    post_attention_layernorm}.weight``, ``midlayer.self_attn.*``,
                    ``midlayer.mlp.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``
==================  =====================================================================

Any ``embed_tokens.weight`` in the file is checked against the target's and otherwise unused.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import AttentionMetadata
from ..kv_cache import PagedKVCache, build_metadata
from ..tree import DraftTree
from .base import Proposer
from .draft_block import DraftBlock, param, rms_norm

__all__ = ["EagleConfig", "EagleHead", "EagleProposer", "load_eagle_head", "save_eagle_head",
           "eagle3_feature_layers", "EagleCheckpointError"]


class EagleCheckpointError(ValueError):
    """An EAGLE checkpoint does not fit the target or is not a known layout."""


def eagle3_feature_layers(num_layers: int) -> tuple:
    """Target layers whose *inputs* EAGLE-3 reads: 2, L/2 and L-3 (the reference's choice)."""
    if num_layers < 4:
        raise ValueError(f"EAGLE-3 needs a target of at least 4 layers, got {num_layers}")
    return (2, num_layers // 2, num_layers - 3)


def _check_feature_layers(layers, num_layers: int, src: str) -> None:
    """EAGLE-3 reads the inputs of target layers 1..L-1 (layer 0's input is the embedding)."""
    if not all(1 <= int(l) < num_layers for l in layers):
        raise EagleCheckpointError(f"{src}: feature layers {list(layers)} do not exist in a "
                                   f"{num_layers}-layer target (inputs of layers "
                                   f"1..{num_layers - 1})")


@dataclass
class EagleConfig:
    """Geometry of an EAGLE head.

    ``feature_layers``: EAGLE-3's target layers (their inputs are the features), empty for
    EAGLE-1 (whose feature is the target's final-normed last hidden state).
    """

    variant: str  # "eagle1" | "eagle3"
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    rms_norm_eps: float = 1e-6
    fc_bias: bool = False
    attention_bias: bool = False
    feature_layers: tuple = ()

    def __post_init__(self):
        if self.variant not in ("eagle1", "eagle3"):
            raise ValueError(f"EAGLE variant must be 'eagle1' or 'eagle3', got {self.variant!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.variant == "eagle1" and self.draft_vocab_size != self.vocab_size:
            raise ValueError("EAGLE-1 heads predict through the target's LM head: draft "
                             "vocabulary = target vocabulary")
        if self.variant == "eagle3" and len(self.feature_layers) != 3:
            raise ValueError(f"EAGLE-3 reads 3 target layers, got {self.feature_layers}")
        self.feature_layers = tuple(int(x) for x in self.feature_layers)

    @property
    def num_features(self) -> int:
        """Width of a target feature in units of H (1 or 3)."""
        return 3 if self.variant == "eagle3" else 1

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def for_target(cls, target_config, variant: str = "eagle3",
                   draft_vocab_size: Optional[int] = None,
                   feature_layers: Optional[Sequence[int]] = None) -> "EagleConfig":
        """A head with the target's layer geometry (what the reference trains); EAGLE-3
        feature layers default to :func:`eagle3_feature_layers`."""
        c = target_config
        return cls(variant=variant, hidden_size=c.hidden_size,
                   intermediate_size=c.intermediate_size, num_heads=c.num_heads,
                   num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                   draft_vocab_size=(c.vocab_size if variant == "eagle1"
                                     else (draft_vocab_size or c.vocab_size)),
                   rms_norm_eps=c.rms_norm_eps, fc_bias=variant == "eagle1",
                   attention_bias=c.attention_bias,
                   feature_layers=(() if variant != "eagle3" else
                                   tuple(feature_layers) if feature_layers is not None
                                   else eagle3_feature_layers(c.num_layers)))


class EagleHead(DraftBlock):
    """The trainable part of an EAGLE head (fc, one decoder layer, and for EAGLE-3 the final
    norm, LM head and vocabulary maps). The target's embedding (and for EAGLE-1 its LM head)
    are passed in, never copied.

    The layer is a :class:`DraftBlock` (pieces shared by the paged inference path and the
    training code's dense attention, ``specrt.train.eagle``):
    :meth:`inputs` -> :meth:`qkv` -> attention -> :meth:`finish` -> :meth:`logits`.
    """

    def __init__(self, cfg: EagleConfig, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg
        h, nf = cfg.hidden_size, cfg.num_features

        def p(*shape, ones=False):
            return param(*shape, dtype=dtype, device=device, ones=ones)

        fc_in = 2 * h if cfg.variant == "eagle1" else nf * h
        self.fc_weight = p(h, fc_in)
        self.fc_bias = p(h) if cfg.fc_bias else None
        attn_in = h if cfg.variant == "eagle1" else 2 * h
        if cfg.variant == "eagle3":
            self.input_norm = p(h, ones=True)
            self.hidden_norm = p(h, ones=True)
            self.norm = p(h, ones=True)
            self.lm_head = p(cfg.draft_vocab_size, h)
            d2t = torch.zeros(cfg.draft_vocab_size, dtype=torch.long, device=device)
            t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
            t2d[: cfg.draft_vocab_size] = True
            self.register_buffer("d2t", d2t)
            self.register_buffer("t2d", t2d)
        self._make_block_weights(attn_in, dtype, device)

    # -- pieces ------------------------------------------------------------------------------
    def inputs(self, emb: torch.Tensor, h: torch.Tensor) -> tuple:
        """``(attention input, residual)`` for token embeddings ``emb`` [n, H] and features
        ``h`` [n, H] (the head's own output hidden state) or [n, 3H] (EAGLE-3 target
        features, fused by fc)."""
        c = self.cfg
        if c.variant == "eagle1":
            x = F.linear(torch.cat((emb, h.to(emb.dtype)), dim=-1), self.fc_weight, self.fc_bias)
            return x, x
        if h.shape[-1] != c.hidden_size:
            h = F.linear(h.to(emb.dtype), self.fc_weight, self.fc_bias)
        a = torch.cat((rms_norm(emb, self.input_norm, c.rms_norm_eps),
                       rms_norm(h, self.hidden_norm, c.rms_norm_eps)), dim=-1)
        return a, h

    def block_inputs(self, emb: torch.Tensor, h: torch.Tensor) -> tuple:
        return self.inputs(emb, h)

    def logits(self, h: torch.Tensor, target_lm_head: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits over the draft vocabulary."""
        if self.cfg.variant == "eagle1":
            if target_lm_head is None:
                raise ValueError("EAGLE-1 logits need the target's LM head")
            return F.linear(h, target_lm_head).float()
        return F.linear(rms_norm(h, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft-vocabulary ids."""
        if self.cfg.variant == "eagle1":
            return draft_ids
        return draft_ids + self.d2t[draft_ids]


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


def _read_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _find(path: Path) -> tuple:
    if path.is_file():
        wfile, cfg_file = path, path.parent / "config.json"
    elif path.is_dir():
        wfile = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if wfile is None:
            raise FileNotFoundError(f"{path}: no EAGLE weights (looked for "
                                    f"{', '.join(_WEIGHT_FILES)})")
        cfg_file = path / "config.json"
    else:
        raise FileNotFoundError(f"no EAGLE checkpoint at {path}")
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    return wfile, cfg


_LAYER_KEYS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
               "down": "mlp.down_proj"}


def _detect(tensors: dict) -> tuple:
    """(variant, layer prefix) from the tensor names."""
    if any(k.startswith("midlayer.") for k in tensors):
        return "eagle3", "midlayer."
    if any(k.startswith("layers.0.") for k in tensors):
        if any(k.startswith("layers.1.") for k in tensors):
            raise EagleCheckpointError("EAGLE head with more than one decoder layer: not "
                                       "supported (the public heads have one)")
        return "eagle1", "layers.0."
    raise EagleCheckpointError("not an EAGLE checkpoint: neither 'midlayer.*' (EAGLE-3) nor "
                               "'layers.0.*' (EAGLE-1/2) tensors")


def load_eagle_head(path, target, *, dtype=None, device=None) -> tuple:
    """Load a SafeAILab EAGLE-1/2 or EAGLE-3 head (layout from the tensor names) for ``target``.

    Returns ``(head, info)``; ``info`` holds the checkpoint config's extra entries (e.g. a
    ``specrt`` card section). Raises :class:`EagleCheckpointError` on a hidden size,
    vocabulary, head geometry or layer count that does not fit the target.
    """
    tc = target.config
    p0 = next(target.parameters())
    dtype = dtype or p0.dtype
    device = device or p0.device
    wfile, jc = _find(Path(path))
    t = _read_tensors(wfile)
    # a few conversions prefix everything with "model."
    if not any(k.startswith(("midlayer.", "layers.0.", "fc.")) for k in t):
        t = {k[len("model."):] if k.startswith("model.") else k: v for k, v in t.items()}
    variant, lp = _detect(t)
    src = str(wfile)
    h = tc.hidden_size
    if "fc.weight" not in t:
        raise EagleCheckpointError(f"{src}: no fc.weight")
    fc = t["fc.weight"]
    if fc.shape[0] != h:
        raise EagleCheckpointError(f"{src}: head hidden size {fc.shape[0]}, target has {h}")
    q = t.get(lp + "self_attn.q_proj.weight")
    k = t.get(lp + "self_attn.k_proj.weight")
    if q is None or k is None:
        raise EagleCheckpointError(f"{src}: missing {lp}self_attn.q_proj / k_proj weights")
    nh = int(jc.get("num_attention_heads", tc.num_heads))
    hd = int(jc.get("head_dim") or q.shape[0] // nh)
    nkv = k.shape[0] // hd
    if hd != tc.head_dim:
        raise EagleCheckpointError(f"{src}: head_dim {hd} differs from the target's "
                                   f"{tc.head_dim} (the head shares the target's RoPE)")
    gate = t.get(lp + "mlp.gate_proj.weight")
    if gate is None:
        raise EagleCheckpointError(f"{src}: missing {lp}mlp.gate_proj.weight")
    vocab = int(jc.get("vocab_size", tc.vocab_size))
    if vocab != tc.vocab_size:
        raise EagleCheckpointError(f"{src}: head vocabulary {vocab}, target has "
                                   f"{tc.vocab_size}")
    if "embed_tokens.weight" in t and tuple(t["embed_tokens.weight"].shape) != (tc.vocab_size, h):
        raise EagleCheckpointError(f"{src}: embed_tokens {tuple(t['embed_tokens.weight'].shape)}"
                                   f" does not match the target's ({tc.vocab_size}, {h})")
    if variant == "eagle3":
        if "lm_head.weight" not in t:
            raise EagleCheckpointError(f"{src}: EAGLE-3 checkpoint without lm_head.weight")
        dv = t["lm_head.weight"].shape[0]
        if fc.shape[1] != 3 * h:
            raise EagleCheckpointError(f"{src}: EAGLE-3 fc takes {fc.shape[1]} inputs, "
                                       f"expected 3 x {h}")
        layers = (jc.get("specrt", {}).get("feature_layers")
                  or (jc.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
                  or eagle3_feature_layers(tc.num_layers))
        _check_feature_layers(layers, tc.num_layers, src)
    else:
        dv = tc.vocab_size
        layers = ()
        if fc.shape[1] != 2 * h:
            raise EagleCheckpointError(f"{src}: EAGLE-1 fc takes {fc.shape[1]} inputs, "
                                       f"expected 2 x {h}")
    cfg = EagleConfig(variant=variant, hidden_size=h, intermediate_size=gate.shape[0],
                      num_heads=q.shape[0] // hd, num_kv_heads=nkv, head_dim=hd,
                      vocab_size=tc.vocab_size, draft_vocab_size=dv,
                      rms_norm_eps=float(jc.get("rms_norm_eps", tc.rms_norm_eps)),
                      fc_bias="fc.bias" in t,
                      attention_bias=(lp + "self_attn.q_proj.bias") in t,
                      feature_layers=tuple(layers))
    head = EagleHead(cfg, dtype=dtype, device=device)
    dst = _name_map(head, lp)
    seen = set()
    for name, w in t.items():
        if name in ("embed_tokens.weight",) or name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in dst:
            raise EagleCheckpointError(f"{src}: unexpected tensor {name} for an {variant} head")
        param, rows = dst[name]
        view = param.data if rows is None else param.data[rows]
        if tuple(w.shape) != tuple(view.shape):
            raise EagleCheckpointError(f"{src}: {name} has shape {tuple(w.shape)}, expected "
                                       f"{tuple(view.shape)}")
        view.copy_(w.to(view.dtype))
        seen.add(name)
    missing = [n for n in dst if n not in seen and n not in ("t2d",)]
    if missing:
        raise EagleCheckpointError(f"{src}: missing tensors {', '.join(missing[:6])}")
    if variant == "eagle3":
        tgt = torch.arange(dv, device=head.d2t.device) + head.d2t
        if int(tgt.min()) < 0 or int(tgt.max()) >= tc.vocab_size:
            raise EagleCheckpointError(f"{src}: d2t maps draft ids outside the target "
                                       "vocabulary")
        if "t2d" not in seen:
            head.t2d.zero_()
            head.t2d[tgt] = True
    info = {k: v for k, v in jc.items() if k == "specrt"}
    return head.eval().requires_grad_(False), info


def _name_map(head: EagleHead, lp: str) -> dict:
    """Public tensor name -> (parameter or buffer, row slice or None)."""
    c = head.cfg
    q, kv, it = c.q_size, c.kv_size, c.intermediate_size
    m = {"fc.weight": (head.fc_weight, None)}
    if head.fc_bias is not None:
        m["fc.bias"] = (head.fc_bias, None)
    for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
        m[f"{lp}{_LAYER_KEYS[name]}.weight"] = (head.qkv_weight, rows)
        if head.qkv_bias is not None:
            m[f"{lp}{_LAYER_KEYS[name]}.bias"] = (head.qkv_bias, rows)
    m[f"{lp}self_attn.o_proj.weight"] = (head.o_weight, None)
    m[f"{lp}post_attention_layernorm.weight"] = (head.post_norm, None)
    m[f"{lp}mlp.gate_proj.weight"] = (head.gate_up_weight, slice(0, it))
    m[f"{lp}mlp.up_proj.weight"] = (head.gate_up_weight, slice(it, 2 * it))
    m[f"{lp}mlp.down_proj.weight"] = (head.down_weight, None)
    if c.variant == "eagle3":
        m[f"{lp}input_layernorm.weight"] = (head.input_norm, None)
        m[f"{lp}hidden_norm.weight"] = (head.hidden_norm, None)
        m["norm.weight"] = (head.norm, None)
        m["lm_head.weight"] = (head.lm_head, None)
        m["d2t"] = (head.d2t, None)
        m["t2d"] = (head.t2d, None)
    return m


def save_eagle_head(head: EagleHead, out_dir, target_config=None, extra_config=None,
                    dtype=torch.float16) -> None:
    """Write ``head`` in the SafeAILab layout of its variant (``config.json`` +
    ``model.safetensors``); ``extra_config`` goes under the config's ``specrt`` key."""
    from safetensors.torch import save_file

    c = head.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lp = "midlayer." if c.variant == "eagle3" else "layers.0."
    tensors = {}
    for name, (src, rows) in _name_map(head, lp).items():
        w = src.detach() if rows is None else src.detach()[rows]
        if w.is_floating_point():
            w = w.to(dtype)
        tensors[name] = w.contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLMEagle3" if c.variant == "eagle3"
                             else "LlamaForCausalLM"],
           "model_type": "llama", "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "num_hidden_layers": 1, "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
           "hidden_act": "silu", "bias": c.fc_bias,
           "torch_dtype": str(dtype).replace("torch.", "")}
    if c.variant == "eagle3":
        cfg["draft_vocab_size"] = c.draft_vocab_size
    if target_config is not None:
        cfg["rope_theta"] = target_config.rope_theta
        cfg["max_position_embeddings"] = target_config.max_position_embeddings
    cfg["specrt"] = {"variant": c.variant, "feature_layers": list(c.feature_layers),
                     **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# proposer
# --------------------------------------------------------------------------------------------


def _pack_rows(mask: np.ndarray) -> torch.Tensor:
    """:func:`specrt.tree.pack_mask` of a host bool matrix, with numpy (a few microseconds
    instead of a dozen torch ops per drafting level)."""
    r, w = mask.shape
    words = max(1, (w + 31) // 32)
    b = np.packbits(mask, axis=1, bitorder="little")
    out = np.zeros((r, words * 4), dtype=np.uint8)
    out[:, :b.shape[1]] = b
    return torch.from_numpy(out.view("<i4").astype(np.int32))


class _Draft:
    """One sequence's draft of this step: the scored nodes (creation order is topological)
    and the subset that has run through the head (``run``, in run order = scratch slots)."""

    __slots__ = ("tokens", "parents", "scores", "depths", "run_idx", "run", "anc", "hidden",
                 "frontier", "paths")

    def __init__(self):
        self.tokens, self.parents, self.scores, self.depths = [], [], [], []
        self.run_idx: dict = {}  # node -> run slot
        self.run: list = []  # nodes in run order
        self.anc: list = []  # run slot -> bitmask of visible run slots
        self.hidden: dict = {}  # node -> output hidden state (row tensor)
        self.frontier: list = []
        self.paths: list = []  # static trees: node -> rank path

    def add(self, token, parent, score, depth, path=None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(depth)
        self.paths.append(path)
        return len(self.tokens) - 1


class EagleProposer(Proposer):
    """EAGLE drafting with a dynamic (EAGLE-2) or static tree, batched, on a paged head cache.

    Parameters
    ----------
    target : the target :class:`~specrt.models.LlamaModel` (its embedding, final norm and for
        EAGLE-1 its LM head are used)
    head : :class:`EagleHead` or a checkpoint path (EAGLE-1/2 or EAGLE-3 layout)
    tree : ``"dynamic"`` (EAGLE-2), ``"mc_sim_7b_63"`` or a list of rank paths (static)
    top_k : frontier width and children per node (dynamic trees)
    depth : deepest draft level (also capped per request by the engine's ``max_draft``)
    total_tokens : tree size, root included (dynamic trees), or ``"auto"``: per step from the
        engine's cost table (:meth:`set_costs`)
    page_size, num_pages : the head's cache (default: sized at :meth:`attach` to the target's)
    """

    name = "eagle"
    drafts_trees = True
    needs_hidden = True
    prompt_hidden = "all"

    def __init__(self, target, head, *, tree: Union[str, Sequence] = "dynamic", top_k: int = 8,
                 depth: int = 5, total_tokens: Union[int, str] = 32,
                 page_size: int = 16, num_pages: Optional[int] = None, dtype=None):
        tc = target.config
        p0 = next(target.parameters())
        self.info: dict = {}
        if not isinstance(head, EagleHead):
            head, self.info = load_eagle_head(head, target, dtype=dtype or p0.dtype)
        else:
            if head.cfg.hidden_size != tc.hidden_size or head.cfg.vocab_size != tc.vocab_size:
                raise EagleCheckpointError(
                    f"EAGLE head for hidden {head.cfg.hidden_size} / vocab "
                    f"{head.cfg.vocab_size}, target has {tc.hidden_size} / {tc.vocab_size}")
            if head.cfg.head_dim != tc.head_dim:
                raise EagleCheckpointError("EAGLE head_dim differs from the target's")
            head = head.to(device=p0.device, dtype=dtype or p0.dtype)
        if head.cfg.variant == "eagle3":
            _check_feature_layers(head.cfg.feature_layers, tc.num_layers, "EAGLE-3 head")
        self.head = head.eval().requires_grad_(False)
        self.target = target
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.top_k, self.depth = top_k, depth
        self.auto = total_tokens == "auto"
        if not self.auto:
            if not isinstance(total_tokens, int) or isinstance(total_tokens, bool) or total_tokens < 1:
                raise ValueError(f"total_tokens must be an int >= 1 or 'auto', got {total_tokens!r}")
        self.static = None
        if isinstance(tree, str):
            if tree == "mc_sim_7b_63":
                from .medusa import MC_SIM_7B_63
                tree = MC_SIM_7B_63
            elif tree != "dynamic":
                raise ValueError(f"unknown EAGLE tree {tree!r} (dynamic, mc_sim_7b_63 or a "
                                 "list of rank paths)")
        if not isinstance(tree, str):
            from .medusa import choices_topology

            _, _, ranks = choices_topology(tree)
            paths = sorted({tuple(c) for c in tree}, key=lambda p: (len(p), p))
            self.static = {}  # path -> ranks of its children, in rank order
            for pth in paths:
                self.static.setdefault(pth[:-1], []).append(pth[-1])
            self.depth = max(len(pth) for pth in paths)
            total_tokens = len(paths) + 1
            self.auto = False
            if max(ranks) >= head.cfg.draft_vocab_size:
                raise ValueError("EAGLE choices rank beyond the draft vocabulary")
        # dynamic trees hold at most top_k + (depth-1) * top_k^2 scored nodes
        cap = 1 + top_k + (self.depth - 1) * top_k * top_k
        self.total_tokens = (total_tokens if self.static is not None
                             else min(cap, 64 if self.auto else total_tokens))
        self.max_nodes = self.total_tokens
        if head.cfg.variant == "eagle3":
            # aux_hidden[i] = output of layer i = input of layer i + 1
            self.hidden_layers = tuple(l - 1 for l in head.cfg.feature_layers)
        self._embed = target.embed_tokens
        self._lm_head = target.lm_head
        self._norm = target.norm
        self._cos, self._sin = target.rope_cos, target.rope_sin
        self._page_size, self._num_pages = page_size, num_pages
        self.cache: Optional[PagedKVCache] = None
        self._feats: dict = {}  # seq_id -> list of pending feature tensors [n, nf*H]
        self._last: dict = {}  # seq_id -> head output hidden at the last cached position
        self._costs = None  # the engine's CostTable (auto)
        self.last_sizes: list = []  # tree sizes chosen in the last propose (metrics)
        if num_pages is not None:
            self._make_cache(num_pages)

    @property
    def max_depth(self) -> int:
        """Deepest tree level this proposer drafts (the CLI's default ``max_draft``)."""
        return self.depth

    # -- cache -------------------------------------------------------------------------------
    def _make_cache(self, num_pages: int):
        c = self.head.cfg
        p = next(self.head.parameters())
        self.cache = PagedKVCache(1, c.num_kv_heads, c.head_dim, self._page_size, num_pages,
                                  p.dtype, p.device)

    def attach(self, model, cache) -> None:
        if self.cache is None:
            # the head holds at most what the target holds, plus one tree per sequence
            self._make_cache(cache.num_pages + 64 * 8)

    @property
    def sizes_itself(self) -> bool:
        """Auto trees are sized here, from the nodes' confidences: the engine does not trim."""
        return self.auto

    @property
    def wants_costs(self) -> bool:
        """The engine hands its cost table over (auto trees without one yet)."""
        return self.auto and self._costs is None

    def set_costs(self, costs) -> None:
        self._costs = costs

    def _ensure_cache(self):
        if self.cache is None:
            self._make_cache(4096)

    # -- features ----------------------------------------------------------------------------
    def _features(self, hidden, aux) -> torch.Tensor:
        if self.head.cfg.variant == "eagle3":
            if not aux:
                raise RuntimeError("EAGLE-3 needs the target's intermediate hidden states")
            return torch.cat([aux[l] for l in self.hidden_layers], dim=-1)
        return self._norm(hidden)  # EAGLE-1 reads the final-normed feature

    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        self._ensure_cache()
        if self.cache.has(seq.seq_id):
            self.release(seq.seq_id)
        self.cache.add_sequence(seq.seq_id)
        feats = []
        if hidden is not None and hidden.shape[0] > 0:
            if hidden.shape[0] != seq.committed_len:
                raise RuntimeError(f"EAGLE needs the hidden states of all {seq.committed_len} "
                                   f"cached prompt positions, got {hidden.shape[0]} (the "
                                   "engine honours Proposer.prompt_hidden = 'all')")
            feats.append(self._features(hidden, aux_hidden))
        self._feats[seq.seq_id] = feats

    def release(self, seq_id: int) -> None:
        self._feats.pop(seq_id, None)
        self._last.pop(seq_id, None)
        if self.cache is not None and self.cache.has(seq_id):
            self.cache.free(seq_id)

    def commit(self, seqs, results) -> None:
        for s, r in zip(seqs, results):
            if s.seq_id not in self._feats:
                continue
            if r.num_accepted < 0 or r.hidden is None:
                continue  # the engine is dropping this sequence (release() follows)
            self._feats[s.seq_id].append(self._features(r.hidden, r.aux_hidden))
            # Drop the scratch tree: the cache keeps the catch-up prefix only.
            self.cache.trim(s.seq_id)

    # -- drafting ----------------------------------------------------------------------------
    def _rope(self, pos: torch.Tensor):
        return self._cos[pos].unsqueeze(1), self._sin[pos].unsqueeze(1)

    def _catch_up(self, seqs) -> list:
        """Run every pending (target feature, next token) pair through the head; returns the
        sequences that can draft (their last output hidden state is known)."""
        dev = self._embed.device
        todo, counts, starts, feats = [], [], [], []
        for s in seqs:
            pend = self._feats.get(s.seq_id)
            if pend is None:
                continue
            hc = self.cache.committed_len(s.seq_id)
            n = s.committed_len - hc
            f = torch.cat(pend, dim=0) if len(pend) > 1 else (pend[0] if pend else None)
            if n > 0 and (f is None or f.shape[0] < n):
                # features are missing (cannot happen through the engine): restart
                raise RuntimeError(f"EAGLE: sequence {s.seq_id} has {0 if f is None else f.shape[0]} "
                                   f"pending features for {n} positions")
            if n > 0:
                todo.append(s)
                counts.append(n)
                starts.append(hc)
                feats.append(f[:n])
                self._feats[s.seq_id] = [f[n:]] if f.shape[0] > n else []
        if todo:
            ids = [s.seq_id for s in todo]
            meta = build_metadata(self.cache, ids, counts, dev)
            tok = torch.tensor([t for s, st, n in zip(todo, starts, counts)
                                for t in s.token_ids[st + 1: st + n + 1]], dtype=torch.long,
                               device=dev)
            pos = torch.cat([torch.arange(st, st + n) for st, n in zip(starts, counts)]).to(dev)
            cos, sin = self._rope(pos)
            out = self.head.paged_forward(F.embedding(tok, self._embed), torch.cat(feats, 0),
                                          cos, sin, self.cache.kv, meta)
            last = torch.tensor(counts, device=dev).cumsum(0) - 1
            for i, s in enumerate(todo):
                self.cache.commit(s.seq_id, starts[i] + counts[i])
                self._last[s.seq_id] = out[last[i]]
        return [s for s in seqs if s.seq_id in self._last
                and self.cache.committed_len(s.seq_id) == s.committed_len]

    def _topk(self, logits: torch.Tensor, k: int):
        lp = torch.log_softmax(logits, dim=-1)
        v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        return v, self.head.to_target(i)

    @torch.no_grad()
    def propose(self, seqs):
        self._ensure_cache()
        trees = {s.seq_id: None for s in seqs}
        ready = self._catch_up([s for s in seqs if s.max_draft > 0])
        self.last_sizes = []
        if ready:
            drafts = self._grow(ready)
            self._select(ready, drafts, trees)
        return [trees[s.seq_id] or DraftTree.single(s.token_ids[-1]) for s in seqs]

    def _expand(self, d: _Draft, node: int, lp: list, ids: list, limit: int):
        """Children of ``node`` from its ranked log-probs / target ids (static: the tree's
        ranks; dynamic: the first ``limit``)."""
        depth = d.depths[node] + 1 if node >= 0 else 1
        base = d.scores[node] if node >= 0 else 0.0
        if self.static is not None:
            path = d.paths[node] if node >= 0 else ()
            return [d.add(ids[r], node, base + lp[r], depth, path + (r,))
                    for r in self.static.get(path, ())]
        return [d.add(ids[r], node, base + lp[r], depth) for r in range(min(limit, len(ids)))]

    def _grow(self, seqs) -> list:
        dev = self._embed.device
        k = self.top_k
        need = k if self.static is None else max(k, 1 + max(max(c) for c in self.static.values()))
        roots = torch.stack([self._last[s.seq_id] for s in seqs])
        lp, ids = self._topk(self.head.logits(roots, self._lm_head), need)
        lp, ids = lp.tolist(), ids.tolist()
        drafts = []
        for i, s in enumerate(seqs):
            d = _Draft()
            kids = self._expand(d, -1, lp[i], ids[i], k)
            d.frontier = self._pick_frontier(d, kids)
            drafts.append(d)
        levels = [min(self.depth, s.max_draft) for s in seqs]
        for level in range(1, max(levels)):
            live = [i for i, s in enumerate(seqs) if level < levels[i] and drafts[i].frontier]
            if not live:
                break
            self._run_frontier([seqs[i] for i in live], [drafts[i] for i in live], dev)
            rows = torch.stack([drafts[i].hidden[n] for i in live for n in drafts[i].frontier])
            lp, ids = self._topk(self.head.logits(rows, self._lm_head), need)
            lp, ids = lp.tolist(), ids.tolist()
            r = 0
            for i in live:
                d = drafts[i]
                kids = []
                for n in d.frontier:
                    kids += self._expand(d, n, lp[r], ids[r], k)
                    r += 1
                d.frontier = self._pick_frontier(d, kids)
        return drafts

    def _pick_frontier(self, d: _Draft, kids: list) -> list:
        if self.static is not None:  # every node with children in the tree is expanded
            return [n for n in kids if d.paths[n] in self.static]
        return sorted(kids, key=lambda n: (-d.scores[n], n))[: self.top_k]

    def _run_frontier(self, seqs, drafts, dev):
        """One head forward over every sequence's new frontier. The op's mask only covers the
        forward's own new tokens, so earlier frontiers are query rows again (their K/V stay at
        their slots, slot -1: not rewritten; their outputs are not computed)."""
        toks, hs, pos, counts, new_rows, slots = [], [], [], [], [], []
        masks = []
        c = self.cache
        c.reserve_batch({s.seq_id: s.committed_len + len(d.run) + len(d.frontier)
                         for s, d in zip(seqs, drafts)})
        base = 0
        for s, d in zip(seqs, drafts):
            old = len(d.run)
            for n in d.frontier:
                d.run_idx[n] = len(d.run)
                par = d.parents[n]
                bits = 1 << len(d.run)
                if par >= 0:
                    bits |= d.anc[d.run_idx[par]]
                d.anc.append(bits)
                d.run.append(n)
                toks.append(d.tokens[n])
                hs.append(d.hidden[par] if par >= 0 else self._last[s.seq_id])
                pos.append(s.committed_len - 1 + d.depths[n])
            m = len(d.run)
            new_rows.extend(range(base + old, base + m))
            slots.extend([-1] * old)
            slots.extend(c.slot_mapping(s.seq_id, s.committed_len + old, m - old))
            counts.append(m)
            masks.append(d.anc)
            base += m
        width = max(counts)
        mask = np.zeros((base, width), dtype=bool)
        cols = np.arange(width, dtype=np.int64)
        r = 0
        for anc in masks:
            for bits in anc:  # python ints: any width
                mask[r] = ((bits >> cols) & 1 if width < 63
                           else [(bits >> j) & 1 for j in range(width)])
                r += 1
        indptr = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        meta = AttentionMetadata(
            qo_indptr=torch.from_numpy(indptr).to(device=dev, dtype=torch.int32),
            seq_lens=torch.tensor([s.committed_len + n for s, n in zip(seqs, counts)],
                                  dtype=torch.int32, device=dev),
            block_table=c.block_table([s.seq_id for s in seqs], device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            mask=_pack_rows(mask).to(dev), trusted=True)
        cos, sin = self._rope(torch.tensor(pos, dtype=torch.long, device=dev))
        rows = (None if len(new_rows) == base  # first level: every row is new
                else torch.tensor(new_rows, dtype=torch.long, device=dev))
        out = self.head.paged_forward(F.embedding(torch.tensor(toks, device=dev), self._embed),
                                      torch.stack(hs), cos, sin, c.kv, meta, rows=rows)
        r = 0
        for d in drafts:
            for n in d.frontier:
                d.hidden[n] = out[r]
                r += 1

    def _select(self, seqs, drafts, trees):
        if self.static is not None:
            keep = [list(range(len(d.tokens))) for d in drafts]
        else:
            order = [sorted(range(len(d.tokens)), key=lambda n: (-d.scores[n], n)) for d in drafts]
            caps = [min(self.total_tokens, s.max_nodes) - 1 for s in seqs]
            if self.auto and self._costs is not None:
                depth = max((max(d.depths, default=0) for d in drafts), default=0)
                sizes = self._auto_sizes(drafts, order, caps, depth)
            else:
                sizes = caps
            keep = [sorted(o[:m]) for o, m in zip(order, sizes)]
        for s, d, kp in zip(seqs, drafts, keep):
            if not kp:
                continue
            where = {n: j + 1 for j, n in enumerate(kp)}
            tokens = [s.token_ids[-1]] + [d.tokens[n] for n in kp]
            parents = [-1] + [where[d.parents[n]] if d.parents[n] >= 0 else 0 for n in kp]
            tree = DraftTree(tokens, parents)
            if self.static is not None:
                tree = tree.truncated(s.max_draft, s.max_nodes)  # the step's node budget
            trees[s.seq_id] = tree
            self.last_sizes.append(tree.num_nodes)

    # -- automatic tree size -----------------------------------------------------------------
    def _auto_sizes(self, drafts, order, caps, depth: int) -> list:
        """Per sequence draft-node counts maximising (B + expected accepted) / step time, with
        step time from the engine's cost table (host + drafting at this depth + verify of the
        total rows). Nodes of all sequences compete for one budget, best probability first."""
        cand = []
        for i, (d, o) in enumerate(zip(drafts, order)):
            for n in o[: caps[i]]:
                cand.append((-d.scores[n], i))
        cand.sort()
        b = len(drafts)
        best, best_m, gain = -1.0, 0, float(b)
        for m in range(len(cand) + 1):
            if m:
                gain += math.exp(-cand[m - 1][0])
            rate = gain / self._costs.step(b, depth, b + m)
            if rate > best:
                best, best_m = rate, m
        sizes = [0] * b
        for _, i in cand[:best_m]:
            sizes[i] += 1
        return sizes
