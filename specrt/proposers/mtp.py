"""MTP (multi-token prediction, DeepSeek-V3 / MiMo): D sequential modules on the target's
hidden state, each one transformer block of the target's family.

Module ``k`` (0-based; the paper's module k + 1) at row ``i`` reads the pair (previous hidden
``h^{k-1}_i``, token ``t_{i+k+1}``), where ``h^{-1}`` is the target's final-normed hidden
state, and predicts ``t_{i+k+2}``::

    x   = proj(cat(hidden_norm(h^{k-1}_i), token_norm(embed(t_{i+k+1}))))    2H -> H
    o   = block(x)                     one decoder layer (RoPE, causal over module k's rows)
    p   = softmax(lm_head(final_norm(o)))                     the target's shared LM head
    h^k = final_norm(o)  (MiMo / specrt feed)   or   o  (DeepSeek feed, as vLLM runs it)

Row ``i`` sits at RoPE position ``i + 1`` (the position of module 0's input token). The
embedding and the LM head are the target's; an optional ``token_map`` (specrt's extension)
restricts the logits to a draft vocabulary (a subset of the shared head's rows), which makes a
drafting step cheap on a CPU.

Drafting
--------
The root ``t_c`` (last emitted token) sits at depth 0; the target has cached positions
``0..c-1`` and its hidden state at ``c - 1`` predicted the root. Module ``k`` keeps its own
one-layer paged KV cache of its committed rows ``0..c-k-1`` (those whose input token is
known). A draft node at depth ``j >= 1`` occupies row ``c - k - 1 + j`` of module ``k``; its
hidden input is module ``k-1``'s output at its parent (``j <= k``), so level ``L`` of the tree
(depth ``L``) is predicted by module ``L - 1`` from its row of a depth ``L - 1`` node, whose
attention sees module ``L-1``'s committed rows and the rows of the node's ancestors: exactly
the training formulation (MTP-D, chained modules). With fewer modules than levels (one module
in MiMo / DeepSeek-V3 checkpoints), levels past ``D`` apply the last module recursively, fed
its own output at the parent (``j > k``): for ``D = 1`` this is what vLLM and SGLang do.

Trees: ``top_k`` = 1 drafts a chain; ``top_k`` > 1 a small tree (each frontier node gets its
``top_k`` best children, the ``top_k`` best by cumulative log-probability form the next
frontier; ``total_tokens`` keeps the best nodes overall). Each level is one batched module
forward for the whole batch, with the module's catch-up rows (positions the target verified
since the last step) in the same forward. Verification is the engine's exact rule.

Rollback: after verification every module cache is cut back to its committed rows (a length
change; scratch pages trimmed); the next step's catch-up recomputes the newly committed rows
from the target's hidden states, so a module cache always equals one rebuilt from the
accepted tokens.

Checkpoint layouts (detected from the tensor names, :func:`load_mtp_modules`):

==============  ===========================================================================
MiMo            ``model.mtp_layers.{k}.{token_layernorm, hidden_layernorm, input_proj,
                final_layernorm}.weight`` + the block's ``self_attn.*``, ``mlp.*``,
                ``input_layernorm``, ``post_attention_layernorm`` (Qwen2 / Llama family);
                ``input_proj`` takes ``cat(hidden, token)``; feed: normed output
DeepSeek-V3     ``model.layers.{L+k}.{enorm, hnorm, eh_proj, shared_head.norm,
                shared_head.head, embed_tokens}`` + the block under the same prefix;
                ``eh_proj`` takes ``cat(token, hidden)``; feed: the block's raw output.
                Blocks with MLA attention or MoE MLPs (DeepSeek-V3 itself) are rejected.
==============  ===========================================================================

specrt writes the MiMo layout (+ ``token_map`` when trained on a draft vocabulary, and the
feed convention under ``config.json``'s ``specrt.mtp_feed``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kv_cache import PagedKVCache, build_metadata
from ..tree import DraftTree
from .base import Proposer
from .draft_block import DraftBlock, param, rms_norm
from .eagle import _pack_rows

__all__ = ["MTPConfig", "MTPLayer", "MTPModules", "MTPProposer", "MTPCheckpointError",
           "load_mtp_modules", "save_mtp_modules", "default_mtp_modules", "from_args"]


class MTPCheckpointError(ValueError):
    """An MTP checkpoint does not fit the target, is not a known layout, or holds a block
    type specrt cannot run."""


@dataclass
class MTPConfig:
    """Geometry of D MTP modules (each: one decoder layer of the target's family).

    ``feed_normed``: the hidden state handed to the next module (and to the module itself when
    applied recursively) is ``final_norm(output)`` (MiMo, specrt) rather than the raw block
    output (DeepSeek-V3 as vLLM / SGLang run it).
    """

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_modules: int = 1
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    feed_normed: bool = True

    def __post_init__(self):
        if self.num_modules < 1:
            raise ValueError(f"need at least one MTP module, got {self.num_modules}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def for_target(cls, tc, num_modules: int = 1, feed_normed: bool = True) -> "MTPConfig":
        """Modules with the target's layer geometry (what MiMo and DeepSeek-V3 use)."""
        return cls(hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
                   num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
                   vocab_size=tc.vocab_size, num_modules=num_modules,
                   rms_norm_eps=tc.rms_norm_eps, attention_bias=tc.attention_bias,
                   feed_normed=feed_normed)


class MTPLayer(DraftBlock):
    """One MTP module: input norms and projection, a decoder layer, the final norm.

    A :class:`DraftBlock` (pieces shared by the paged path and the training code's dense
    attention, ``specrt.train.mtp``): :meth:`inputs` -> :meth:`qkv` (after ``input_norm``) ->
    attention -> :meth:`finish` -> :meth:`normed`.
    ``proj`` columns are ``[hidden | token]`` (MiMo's order; DeepSeek's is swapped on load).
    """

    def __init__(self, cfg: MTPConfig, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size

        def p(*shape, ones=False):
            return param(*shape, dtype=dtype, device=device, ones=ones)

        self.token_norm = p(h, ones=True)
        self.hidden_norm = p(h, ones=True)
        self.proj = p(h, 2 * h)
        self.input_norm = p(h, ones=True)
        self._make_block_weights(h, dtype, device)
        self.final_norm = p(h, ones=True)

    def inputs(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Block input ``x`` [n, H] from token embeddings and previous hidden states [n, H]."""
        eps = self.cfg.rms_norm_eps
        return F.linear(torch.cat((rms_norm(h.to(emb.dtype), self.hidden_norm, eps),
                                   rms_norm(emb, self.token_norm, eps)), dim=-1), self.proj)

    def block_inputs(self, emb: torch.Tensor, h: torch.Tensor) -> tuple:
        x = self.inputs(emb, h)
        return x, x

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.input_norm, self.cfg.rms_norm_eps)

    def normed(self, out: torch.Tensor) -> torch.Tensor:
        """``final_norm(out)``: what the shared LM head reads."""
        return rms_norm(out, self.final_norm, self.cfg.rms_norm_eps)

    def feed(self, out: torch.Tensor) -> torch.Tensor:
        """The hidden state the next module (or this one, recursively) reads."""
        return self.normed(out) if self.cfg.feed_normed else out


class MTPModules(nn.Module):
    """D MTP modules and the optional draft vocabulary (``token_map``: draft id -> target
    id). The target's embedding and LM head are passed in, never copied."""

    def __init__(self, cfg: MTPConfig, token_map: Optional[torch.Tensor] = None,
                 dtype=torch.float32, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(MTPLayer(cfg, dtype, device) for _ in range(cfg.num_modules))
        if token_map is not None:
            token_map = _check_token_map(token_map, cfg.vocab_size).to(device)
        self.register_buffer("token_map", token_map)
        self.info: dict = {}
        self.layout = "mimo"
        self._rows = None  # (lm_head, gathered rows)

    @property
    def num_modules(self) -> int:
        return self.cfg.num_modules

    @property
    def draft_vocab_size(self) -> int:
        return self.cfg.vocab_size if self.token_map is None else self.token_map.numel()

    def head_rows(self, lm_head: torch.Tensor) -> torch.Tensor:
        """The shared LM head's rows of the draft vocabulary [Vd, H]."""
        if self.token_map is None:
            return lm_head
        c = self._rows
        if c is None or c[0] is not lm_head or c[1].device != lm_head.device:
            c = self._rows = (lm_head, lm_head.index_select(0, self.token_map.to(lm_head.device)))
        return c[1]

    def logits(self, normed: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """float32 logits over the draft vocabulary of final-normed outputs [n, H]."""
        return F.linear(normed, self.head_rows(lm_head)).float()

    def to_target(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.token_map is None else self.token_map.to(idx.device)[idx]


def _check_token_map(t, vocab_size: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise MTPCheckpointError(f"token_map must be a non-empty 1-D integer tensor, got "
                                 f"{t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise MTPCheckpointError(f"token_map holds ids outside the target vocabulary "
                                 f"[0, {vocab_size})")
    if torch.unique(t).numel() != t.numel():
        raise MTPCheckpointError("token_map holds duplicate token ids")
    return t


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_MIMO = re.compile(r"^(?:model\.)?mtp_layers\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_DS_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
           "shared_head.head.weight", "embed_tokens.weight")
_MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm",
        "q_a_layernorm")
_MOE = ("mlp.experts.", "mlp.gate.weight", "mlp.shared_experts.", "e_score_correction_bias")


def _block_names(cfg: MTPConfig) -> dict:
    """Block sub-name -> (attribute, row slice or None)."""
    q, kv, it = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    m = {"input_layernorm.weight": ("input_norm", None),
         "post_attention_layernorm.weight": ("post_norm", None),
         "self_attn.o_proj.weight": ("o_weight", None),
         "mlp.gate_proj.weight": ("gate_up_weight", slice(0, it)),
         "mlp.up_proj.weight": ("gate_up_weight", slice(it, 2 * it)),
         "mlp.down_proj.weight": ("down_weight", None)}
    for name, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)),
                       ("v", slice(q + kv, q + 2 * kv))):
        m[f"self_attn.{name}_proj.weight"] = ("qkv_weight", rows)
        if cfg.attention_bias:
            m[f"self_attn.{name}_proj.bias"] = ("qkv_bias", rows)
    return m


def _own_names(layout: str) -> dict:
    """Module-own sub-name -> attribute ('proj_swapped': DeepSeek's [token | hidden])."""
    if layout == "mimo":
        return {"token_layernorm.weight": "token_norm", "hidden_layernorm.weight": "hidden_norm",
                "input_proj.weight": "proj", "final_layernorm.weight": "final_norm"}
    return {"enorm.weight": "token_norm", "hnorm.weight": "hidden_norm",
            "eh_proj.weight": "proj_swapped", "shared_head.norm.weight": "final_norm"}


def _weight_files(path: Path) -> list:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no MTP checkpoint at {path}")
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    for n in ("pytorch_model.bin", "model.pt"):
        if (path / n).is_file():
            return [path / n]
    raise FileNotFoundError(f"{path}: no MTP weights (*.safetensors, pytorch_model.bin, "
                            "model.pt)")


def _read_selected(files: list) -> dict:
    """Every tensor an MTP loader may want (MiMo ``mtp_layers``, DeepSeek MTP layers, the
    ``token_map``) from (possibly sharded, possibly whole-model) files, reading only those."""
    keys: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as h:
                    keys.update({k: f for k in h.keys()})
            except Exception as e:  # safetensors raises its own error types
                raise MTPCheckpointError(f"{f}: unreadable safetensors file: {e}") from e
        else:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
            except Exception as e:
                raise MTPCheckpointError(f"{f}: unreadable PyTorch checkpoint: {e}") from e
            if not isinstance(sd, dict):
                raise MTPCheckpointError(f"{f}: expected a state dict")
            wanted = _selector(list(sd))
            return {k: v for k, v in sd.items() if wanted(k)}
    wanted = _selector(list(keys))
    out = {}
    want = [k for k in keys if wanted(k)]
    by_file: dict = {}
    for k in want:
        by_file.setdefault(keys[k], []).append(k)
    from safetensors import safe_open

    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for k in ks:
                out[k] = h.get_tensor(k)
    return out


def _ds_layers(names) -> set:
    """Indices of the DeepSeek-layout MTP layers (those with enorm / hnorm / eh_proj)."""
    out = set()
    for k in names:
        m = _LAYER.match(k)
        if m and m.group(2) in ("eh_proj.weight", "enorm.weight", "hnorm.weight"):
            out.add(int(m.group(1)))
    return out


def _selector(names):
    """Predicate: is this tensor name part of an MTP checkpoint (given all the names)?"""
    ds = _ds_layers(names)

    def wanted(k: str) -> bool:
        if k == "token_map" or _MIMO.match(k):
            return True
        m = _LAYER.match(k)
        return bool(m) and int(m.group(1)) in ds
    return wanted


def load_mtp_modules(path, target, *, dtype=None, device=None) -> MTPModules:
    """Load MTP modules for ``target`` from a MiMo- or DeepSeek-layout checkpoint (a
    directory, possibly the whole sharded model, or one weights file); the layout is detected
    from the tensor names. Returns :class:`MTPModules` with ``.layout`` and ``.info`` (the
    config's ``specrt`` section). Raises :class:`MTPCheckpointError` for an unknown layout,
    a geometry that does not fit the target, or a block specrt cannot run (MLA, MoE,
    quantized tensors)."""
    tc = target.config
    p0 = next(target.parameters())
    dtype = dtype or p0.dtype
    device = device or p0.device
    path = Path(path)
    files = _weight_files(path)
    src = str(path)
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    jc = {}
    if cfg_file.is_file():
        try:
            jc = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise MTPCheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    t = _read_selected(files)
    token_map = t.pop("token_map", None)
    mimo = {}
    ds = {}
    for k, v in t.items():
        m = _MIMO.match(k)
        if m:
            mimo.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        m = _LAYER.match(k)
        if m:
            ds.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if mimo and ds:
        raise MTPCheckpointError(f"{src}: both MiMo (mtp_layers.*) and DeepSeek (enorm / "
                                 "hnorm / eh_proj) MTP tensors: ambiguous layout")
    if not mimo and not ds:
        raise MTPCheckpointError(f"{src}: not an MTP checkpoint: no 'model.mtp_layers.*' "
                                 "(MiMo) nor 'model.layers.N.{enorm,hnorm,eh_proj}' "
                                 "(DeepSeek-V3) tensors")
    layout = "mimo" if mimo else "deepseek"
    groups = mimo or ds
    idx = sorted(groups)
    if layout == "mimo" and idx != list(range(len(idx))):
        raise MTPCheckpointError(f"{src}: MTP modules {idx} are not numbered 0..{len(idx) - 1}")
    if layout == "deepseek" and idx != list(range(idx[0], idx[0] + len(idx))):
        raise MTPCheckpointError(f"{src}: MTP layers {idx} are not consecutive")
    mods = []
    for i in idx:
        sub = {}
        for k, v in groups[i].items():
            sub[k[len("mtp_block."):] if k.startswith("mtp_block.") else k] = v
        for k in sub:
            if any(x in k for x in _MLA):
                raise MTPCheckpointError(f"{src}: MTP module {i} has an MLA attention block "
                                         f"({k}): not supported (specrt runs Llama-family "
                                         "blocks: Llama, Mistral, Qwen2)")
            if any(x in k for x in _MOE):
                raise MTPCheckpointError(f"{src}: MTP module {i} has a mixture-of-experts MLP "
                                         f"({k}): not supported (dense SwiGLU blocks only)")
            if k.endswith(("weight_scale_inv", "weight_scale", "qweight", "scales")):
                raise MTPCheckpointError(f"{src}: MTP module {i} holds quantized tensors "
                                         f"({k}): not supported; dequantize first")
        mods.append(sub)
    h = tc.hidden_size
    first = mods[0]
    q = first.get("self_attn.q_proj.weight")
    k_ = first.get("self_attn.k_proj.weight")
    gate = first.get("mlp.gate_proj.weight")
    if q is None or k_ is None or gate is None:
        raise MTPCheckpointError(f"{src}: MTP module 0 lacks self_attn.q_proj / k_proj or "
                                 "mlp.gate_proj weights")
    if q.shape[1] != h:
        raise MTPCheckpointError(f"{src}: MTP hidden size {q.shape[1]}, the target has {h}")
    nh = int(jc.get("num_attention_heads") or q.shape[0] // tc.head_dim)
    hd = int(jc.get("head_dim") or q.shape[0] // nh)
    if hd != tc.head_dim:
        raise MTPCheckpointError(f"{src}: MTP head_dim {hd} differs from the target's "
                                 f"{tc.head_dim} (the modules share the target's RoPE)")
    vocab = int(jc.get("vocab_size", tc.vocab_size))
    if vocab != tc.vocab_size:
        raise MTPCheckpointError(f"{src}: MTP vocabulary {vocab}, the target has "
                                 f"{tc.vocab_size}")
    nl = jc.get("num_nextn_predict_layers")
    if nl is not None and int(nl) != len(mods):
        raise MTPCheckpointError(f"{src}: config says {nl} MTP modules, the weights hold "
                                 f"{len(mods)}")
    feed = (jc.get("specrt") or {}).get("mtp_feed")
    if feed not in (None, "normed", "raw"):
        raise MTPCheckpointError(f"{src}: specrt.mtp_feed must be 'normed' or 'raw', got "
                                 f"{feed!r}")
    feed_normed = (feed == "normed") if feed is not None else layout == "mimo"
    cfg = MTPConfig(hidden_size=h, intermediate_size=gate.shape[0], num_heads=q.shape[0] // hd,
                    num_kv_heads=k_.shape[0] // hd, head_dim=hd, vocab_size=tc.vocab_size,
                    num_modules=len(mods),
                    rms_norm_eps=float(jc.get("rms_norm_eps", tc.rms_norm_eps)),
                    attention_bias="self_attn.q_proj.bias" in first, feed_normed=feed_normed)
    out = MTPModules(cfg, token_map=token_map, dtype=dtype, device=device)
    block = _block_names(cfg)
    own = _own_names(layout)
    for i, (sub, layer) in enumerate(zip(mods, out.layers)):
        seen = set()
        for name, w in sub.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if layout == "deepseek" and name in ("shared_head.head.weight",
                                                 "embed_tokens.weight"):
                if tuple(w.shape) != (tc.vocab_size, h):
                    raise MTPCheckpointError(f"{src}: module {i} {name} has shape "
                                             f"{tuple(w.shape)}, the target's is "
                                             f"({tc.vocab_size}, {h})")
                continue  # the target's shared head / embedding are used
            if name in own:
                attr, rows = own[name], None
            elif name in block:
                attr, rows = block[name]
            else:
                raise MTPCheckpointError(f"{src}: unexpected tensor {name!r} in MTP module {i} "
                                         f"({layout} layout)")
            if attr == "proj_swapped":  # DeepSeek: cat(token, hidden) -> ours: cat(hidden, token)
                if tuple(w.shape) != (h, 2 * h):
                    raise MTPCheckpointError(f"{src}: module {i} {name} has shape "
                                             f"{tuple(w.shape)}, expected ({h}, {2 * h})")
                w = torch.cat((w[:, h:], w[:, :h]), dim=1)
                attr = "proj"
            dst = getattr(layer, attr).data
            view = dst if rows is None else dst[rows]
            if tuple(w.shape) != tuple(view.shape):
                raise MTPCheckpointError(f"{src}: module {i} {name} has shape "
                                         f"{tuple(w.shape)}, expected {tuple(view.shape)}")
            view.copy_(w.to(view.dtype))
            seen.add(name)
        missing = [n for n in list(own) + list(block) if n not in seen]
        if missing:
            raise MTPCheckpointError(f"{src}: MTP module {i} misses {', '.join(missing[:6])}")
    out.layout = layout
    out.info = {k: v for k, v in jc.items() if k == "specrt"}
    return out.eval().requires_grad_(False)


def save_mtp_modules(mods: MTPModules, out_dir, target_config=None, extra_config=None,
                     dtype=torch.float16) -> None:
    """Write ``mods`` in the MiMo layout (``config.json`` + ``model.safetensors``, plus
    ``token_map`` for a draft vocabulary); ``extra_config`` goes under ``specrt``."""
    from safetensors.torch import save_file

    c = mods.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    block = _block_names(c)
    own = _own_names("mimo")
    tensors = {}
    for i, layer in enumerate(mods.layers):
        pre = f"model.mtp_layers.{i}."
        for name, attr in own.items():
            tensors[pre + name] = getattr(layer, attr).detach()
        for name, (attr, rows) in block.items():
            w = getattr(layer, attr).detach()
            tensors[pre + name] = w if rows is None else w[rows]
    tensors = {k: v.to(dtype).contiguous().cpu() for k, v in tensors.items()}
    if mods.token_map is not None:
        tensors["token_map"] = mods.token_map.detach().to(torch.int64).cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = {"architectures": ["MiMoMTPModules"], "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, "hidden_act": "silu",
           "num_nextn_predict_layers": c.num_modules,
           "torch_dtype": str(dtype).replace("torch.", "")}
    if target_config is not None:
        cfg["model_type"] = target_config.architecture
        cfg["rope_theta"] = target_config.rope_theta
        cfg["max_position_embeddings"] = target_config.max_position_embeddings
    cfg["specrt"] = {"mtp_feed": "normed" if c.feed_normed else "raw",
                     "draft_vocab_size": mods.draft_vocab_size, **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def default_mtp_modules(target) -> str:
    """The MTP-3 modules shipped for the default model (SmolLM2-135M-Instruct)."""
    path = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-mtp"
    c = target.config
    if (c.hidden_size, c.vocab_size, c.num_layers) != (576, 49152, 30):
        raise ValueError("--proposer mtp needs --mtp-modules PATH: specrt ships MTP modules "
                         "for the default model (smollm2-135m) only")
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"the shipped MTP modules are missing ({path}); pass --mtp-modules")
    return str(path)


# --------------------------------------------------------------------------------------------
# proposer
# --------------------------------------------------------------------------------------------


class _Draft:
    """One sequence's draft of this step. Nodes in creation order (topological); per module
    ``k``: ``runs[k]`` its draft rows in slot order, ``anc[k]`` their visibility bitmasks
    over that list, ``out[k]`` node -> block output."""

    __slots__ = ("tokens", "parents", "scores", "depths", "frontier", "runs", "run_idx", "anc",
                 "out")

    def __init__(self, num_modules: int):
        self.tokens, self.parents, self.scores, self.depths = [], [], [], []
        self.frontier: list = []
        self.runs = [[] for _ in range(num_modules)]
        self.run_idx = [{} for _ in range(num_modules)]
        self.anc = [[] for _ in range(num_modules)]
        self.out = [{} for _ in range(num_modules)]

    def add(self, token, parent, score, depth) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(depth)
        return len(self.tokens) - 1

    def path(self, n: int) -> list:
        """Ancestors-or-self of node ``n`` (depth >= 1), root side first."""
        out = []
        while n >= 0:
            out.append(n)
            n = self.parents[n]
        return out[::-1]


class MTPProposer(Proposer):
    """MTP drafting (chains or small top-k trees), batched, one paged cache per module.

    Parameters
    ----------
    target : the target :class:`~specrt.models.LlamaModel` (embedding, final norm, LM head)
    modules : :class:`MTPModules` or a checkpoint path (MiMo or DeepSeek layout)
    depth : deepest draft level (default: the number of modules, 3 for a single module);
        levels past the module count apply the last module recursively
    top_k : children per frontier node and frontier width (1: a chain)
    total_tokens : tree size cap, root included (default: every scored node)
    page_size, num_pages : the module caches (default: sized at :meth:`attach`)
    """

    name = "mtp"
    needs_hidden = True
    prompt_hidden = "all"

    def __init__(self, target, modules, *, depth: Optional[int] = None, top_k: int = 1,
                 total_tokens: Optional[int] = None, page_size: int = 16,
                 num_pages: Optional[int] = None, dtype=None):
        tc = target.config
        p0 = next(target.parameters())
        if not isinstance(modules, MTPModules):
            modules = load_mtp_modules(modules, target, dtype=dtype or p0.dtype)
        else:
            c = modules.cfg
            if (c.hidden_size, c.vocab_size, c.head_dim) != (tc.hidden_size, tc.vocab_size,
                                                              tc.head_dim):
                raise MTPCheckpointError(
                    f"MTP modules for hidden {c.hidden_size} / vocab {c.vocab_size} / head_dim "
                    f"{c.head_dim}, the target has {tc.hidden_size} / {tc.vocab_size} / "
                    f"{tc.head_dim}")
            modules = modules.to(device=p0.device, dtype=dtype or p0.dtype)
        self.modules = modules.eval().requires_grad_(False)
        self.info = modules.info
        d = modules.num_modules
        depth = (d if d > 1 else 3) if depth is None else depth
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if top_k > modules.draft_vocab_size:
            raise ValueError(f"top_k {top_k} exceeds the draft vocabulary "
                             f"({modules.draft_vocab_size})")
        self.depth, self.top_k = depth, top_k
        # modules past the depth are never used
        self.num_used = min(d, depth)
        cap = 1 + top_k + (depth - 1) * top_k * top_k
        if total_tokens is not None and (not isinstance(total_tokens, int) or total_tokens < 1):
            raise ValueError(f"total_tokens must be an int >= 1, got {total_tokens!r}")
        self.total_tokens = cap if total_tokens is None else min(total_tokens, cap)
        self.max_nodes = self.total_tokens
        self.drafts_trees = top_k > 1
        self.target = target
        self._embed = target.embed_tokens
        self._lm_head = target.lm_head
        self._norm = target.norm
        self._cos, self._sin = target.rope_cos, target.rope_sin
        self._page_size = page_size
        self.caches: Optional[list] = None
        # per module k: seq_id -> pending hidden inputs for its next committed rows
        self._pend = [{} for _ in range(self.num_used)]
        # per module k: seq_id -> block output at its last committed row
        self._last = [{} for _ in range(self.num_used)]
        self.last_sizes: list = []
        if num_pages is not None:
            self._make_caches(num_pages)

    @property
    def max_depth(self) -> int:
        return self.depth

    # -- caches ------------------------------------------------------------------------------
    def _make_caches(self, num_pages: int):
        c = self.modules.cfg
        p = next(self.modules.parameters())
        self.caches = [PagedKVCache(1, c.num_kv_heads, c.head_dim, self._page_size, num_pages,
                                    p.dtype, p.device) for _ in range(self.num_used)]

    def attach(self, model, cache) -> None:
        if self.caches is None:
            # a module holds at most what the target holds, plus one draft per sequence
            self._make_caches(cache.num_pages + 64 * 8)

    def _ensure(self):
        if self.caches is None:
            self._make_caches(4096)

    def add(self, seq, hidden=None, aux_hidden=None) -> None:
        self._ensure()
        if self.caches[0].has(seq.seq_id):
            self.release(seq.seq_id)
        for c in self.caches:
            c.add_sequence(seq.seq_id)
        pend = []
        if hidden is not None and hidden.shape[0] > 0:
            if hidden.shape[0] != seq.committed_len:
                raise RuntimeError(f"MTP needs the hidden states of all {seq.committed_len} "
                                   f"cached prompt positions, got {hidden.shape[0]} (the "
                                   "engine honours Proposer.prompt_hidden = 'all')")
            pend.append(self._norm(hidden))
        self._pend[0][seq.seq_id] = pend
        for k in range(1, self.num_used):
            self._pend[k][seq.seq_id] = []

    def release(self, seq_id: int) -> None:
        for k in range(self.num_used):
            self._pend[k].pop(seq_id, None)
            self._last[k].pop(seq_id, None)
            if self.caches is not None and self.caches[k].has(seq_id):
                self.caches[k].free(seq_id)

    def commit(self, seqs, results) -> None:
        for s, r in zip(seqs, results):
            if s.seq_id not in self._pend[0]:
                continue
            if r.num_accepted < 0 or r.hidden is None:
                continue  # the engine is dropping this sequence (release() follows)
            self._pend[0][s.seq_id].append(self._norm(r.hidden))
            for c in self.caches:  # drop the draft rows: committed rows only
                c.trim(s.seq_id)

    # -- drafting ----------------------------------------------------------------------------
    def _limit(self, s) -> int:
        """Deepest level this sequence can draft now: level L <= D needs module L-2's last
        committed row, i.e. ``c >= L - 1`` (and ``c >= 1`` for the first)."""
        lim = min(self.depth, s.max_draft)
        c = s.committed_len
        if c < 1 or s.seq_id not in self._pend[0]:
            return 0
        if c + 1 < self.num_used:
            lim = min(lim, c + 1)
        return lim

    @torch.no_grad()
    def propose(self, seqs):
        self._ensure()
        live = [(s, self._limit(s)) for s in seqs]
        live = [(s, lim) for s, lim in live if lim > 0]
        trees = {s.seq_id: None for s in seqs}
        self.last_sizes = []
        if live:
            drafts = {s.seq_id: _Draft(self.num_used) for s, _ in live}
            limits = {s.seq_id: lim for s, lim in live}
            level_seqs = [s for s, _ in live]
            for level in range(1, max(limits.values()) + 1):
                level_seqs = [s for s in level_seqs if limits[s.seq_id] >= level
                              and (level == 1 or drafts[s.seq_id].frontier)]
                if not level_seqs:
                    break
                k = min(level, self.num_used) - 1
                self._run_module(k, level, level_seqs, drafts)
                self._expand(k, level, level_seqs, drafts)
            for s, _ in live:
                trees[s.seq_id] = self._tree(s, drafts[s.seq_id])
        return [trees[s.seq_id] or DraftTree.single(s.token_ids[-1]) for s in seqs]

    def _root_hidden(self, k: int, sid) -> torch.Tensor:
        return self._last[k][sid]

    def _run_module(self, k: int, level: int, seqs, drafts) -> None:
        """One forward of module ``k``: each sequence's catch-up rows (newly committed rows,
        causal) followed by its draft rows for this level (ancestors-or-self of the frontier
        nodes; rows already in the module's cache from an earlier level are query rows only)."""
        layer = self.modules.layers[k]
        cache = self.caches[k]
        dev = self._embed.device
        ids, counts, toks, hs, pos, comp, new_rows, old_rows = [], [], [], [], [], [], [], []
        masks = []  # per sequence: (n_cu, anc list)
        cu_info = []  # per sequence: (n_cu, start)
        base = 0
        for s in seqs:
            sid = s.seq_id
            c = s.committed_len
            d = drafts[sid]
            hc = cache.committed_len(sid)
            n_cu = max(0, c - k - hc)
            if n_cu == 0 and level == 1:
                continue  # nothing new (the root's output is known)
            if n_cu:
                pend = self._pend[k][sid]
                f = torch.cat(pend, 0) if len(pend) > 1 else pend[0] if pend else None
                if f is None or f.shape[0] < n_cu:
                    raise RuntimeError(f"MTP module {k}: sequence {sid} has "
                                       f"{0 if f is None else f.shape[0]} pending hidden "
                                       f"states for {n_cu} rows")
                self._pend[k][sid] = [f[n_cu:]] if f.shape[0] > n_cu else []
                toks.extend(s.token_ids[hc + k + 1: hc + k + 1 + n_cu])
                hs.append(f[:n_cu])
                pos.extend(range(hc + 1, hc + 1 + n_cu))
                comp.extend(range(base, base + n_cu))
            # draft rows: ancestors-or-self of the frontier (level 1: none)
            old = len(d.runs[k])
            if level > 1:
                need = sorted({n for f_ in d.frontier for n in d.path(f_)})
                for n in need:
                    if n in d.run_idx[k]:
                        continue
                    par = d.parents[n]
                    j = d.depths[n]
                    src = k - 1 if j <= k else k
                    if par >= 0:
                        hin = d.out[src][par]
                    else:
                        hin = self._root_hidden(src, sid)
                    hin = self.modules.layers[src].feed(hin.unsqueeze(0))[0]
                    bits = 1 << len(d.runs[k])
                    if par >= 0 and par in d.run_idx[k]:
                        bits |= d.anc[k][d.run_idx[k][par]]
                    d.run_idx[k][n] = len(d.runs[k])
                    d.runs[k].append(n)
                    d.anc[k].append(bits)
                    toks.append(d.tokens[n])
                    hs.append(hin.unsqueeze(0))
                    pos.append(c - k + j)
            m = len(d.runs[k])
            old_rows.extend(range(base + n_cu, base + n_cu + old))
            comp.extend(range(base + n_cu + old, base + n_cu + m))
            new_rows.append((sid, list(range(base + n_cu + old, base + n_cu + m)),
                             d.runs[k][old:]))
            ids.append(sid)
            counts.append(n_cu + m)
            masks.append((n_cu, d.anc[k]))
            cu_info.append((n_cu, hc))
            base += n_cu + m
        if not ids:
            return
        mask = None
        if any(len(a) for _, a in masks):
            width = max(counts)
            mk = np.zeros((base, width), dtype=bool)
            r = 0
            for n_cu, anc in masks:
                if n_cu:
                    mk[r:r + n_cu, :n_cu] = np.tri(n_cu, dtype=bool)
                    r += n_cu
                cols = np.arange(len(anc), dtype=np.int64)
                for bits in anc:
                    mk[r, :n_cu] = True
                    mk[r, n_cu:n_cu + len(anc)] = ((bits >> cols) & 1 if len(anc) < 63
                                                   else [(bits >> j) & 1
                                                         for j in range(len(anc))])
                    r += 1
            mask = _pack_rows(mk).to(dev)
        meta = build_metadata(cache, ids, counts, dev, mask=mask)
        if old_rows:
            meta.slot_mapping[torch.tensor(old_rows, dtype=torch.long)] = -1
        p = torch.tensor(pos, dtype=torch.long, device=dev)
        cos, sin = self._cos[p].unsqueeze(1), self._sin[p].unsqueeze(1)
        emb = F.embedding(torch.tensor(toks, dtype=torch.long, device=dev), self._embed)
        h = torch.cat(hs, 0)
        rows = None if not old_rows else torch.tensor(comp, dtype=torch.long, device=dev)
        out = layer.paged_forward(emb, h, cos, sin, cache.kv, meta, rows=rows)
        # out rows follow ``comp`` order: per sequence, catch-up rows then new draft rows
        r = 0
        for (n_cu, hc), (sid, _, nodes) in zip(cu_info, new_rows):
            if n_cu:
                o = out[r:r + n_cu]
                cache.commit(sid, hc + n_cu)
                self._last[k][sid] = o[-1]
                if k + 1 < self.num_used:
                    self._pend[k + 1][sid].append(layer.feed(o))
                r += n_cu
            d = drafts[sid]
            for n in nodes:
                d.out[k][n] = out[r]
                r += 1

    def _expand(self, k: int, level: int, seqs, drafts) -> None:
        """Children (depth ``level``) of every frontier node, from module ``k``'s output at it
        (level 1: at the root, the module's last committed row)."""
        layer = self.modules.layers[k]
        rows = []
        for s in seqs:
            d = drafts[s.seq_id]
            if level == 1:
                rows.append(self._last[0][s.seq_id])
            else:
                rows.extend(d.out[k][n] for n in d.frontier)
        lg = self.modules.logits(layer.normed(torch.stack(rows)), self._lm_head)
        lp = torch.log_softmax(lg, dim=-1)
        v, i = lp.topk(self.top_k, dim=-1)
        v, i = v.tolist(), self.modules.to_target(i).tolist()
        r = 0
        for s in seqs:
            d = drafts[s.seq_id]
            parents = [-1] if level == 1 else d.frontier
            kids = []
            for par in parents:
                base = d.scores[par] if par >= 0 else 0.0
                for lv, tok in zip(v[r], i[r]):
                    kids.append(d.add(tok, par, base + lv, level))
                r += 1
            d.frontier = sorted(kids, key=lambda n: (-d.scores[n], n))[: self.top_k]

    def _tree(self, s, d: _Draft):
        if not d.tokens:
            return None
        order = sorted(range(len(d.tokens)), key=lambda n: (-d.scores[n], n))
        kp = sorted(order[: min(self.total_tokens, s.max_nodes) - 1])
        if not kp:
            return None
        where = {n: j + 1 for j, n in enumerate(kp)}
        tokens = [s.token_ids[-1]] + [d.tokens[n] for n in kp]
        parents = [-1] + [where[d.parents[n]] if d.parents[n] >= 0 else 0 for n in kp]
        self.last_sizes.append(len(tokens))
        # the modules' path log-probabilities: the policy trims node by node on them
        return DraftTree(tokens, parents, node_logp=[0.0] + [min(0.0, d.scores[n]) for n in kp])


def from_args(target, args=None) -> MTPProposer:
    """``--proposer mtp`` from CLI arguments (all optional): ``mtp_modules`` (a checkpoint;
    default: the modules shipped for the default model), ``mtp_depth`` or ``num_draft`` (levels;
    default: the module count), ``mtp_top_k`` (1: chains, the default; >1: small trees),
    ``total_tokens`` (tree cap)."""
    path = getattr(args, "mtp_modules", None) or default_mtp_modules(target)
    depth = getattr(args, "mtp_depth", None) or getattr(args, "num_draft", None)
    total = getattr(args, "total_tokens", None)
    if total is not None and total != "auto":
        try:
            total = int(total)
        except ValueError:
            raise ValueError(f"--total-tokens must be an integer, got {total!r}") from None
    else:
        total = None
    return MTPProposer(target, path, depth=depth, top_k=getattr(args, "mtp_top_k", None) or 1,
                       total_tokens=total)
