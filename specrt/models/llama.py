"""Native Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) on specrt's paged KV cache.

One forward handles any ragged batch of new tokens: prompts (causal), single decode tokens,
chains and draft trees (packed mask) alike, because all attention goes through
``specrt.ops.tree_attention`` after ``specrt.ops.append_kv`` has written the new K/V.

Weights are stored fused: ``qkv`` = [q; k; v] rows and ``gate_up`` = [gate; up] rows, so each
layer runs 4 matmuls. Numerics follow transformers' reference implementation op for op (RMSNorm
in fp32, RoPE in the model dtype with fp32-computed tables), which is what lets the tests
compare logits at fp32 round-off.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..batch import AttentionMetadata
from .config import ModelConfig



#: Most rows a CPU GEMM sends to ``ops.linear`` (the decode / verify shapes); larger ones
#: (prompts) go to torch's GEMM. ``$SPECRT_CPU_LINEAR_ROWS`` overrides; 0 turns it off.
CPU_LINEAR_MAX_ROWS = int(os.environ.get("SPECRT_CPU_LINEAR_ROWS", "64"))

# weight id -> (weakref to the weight, its version counter, data pointer, PackedLinear)
_PACKED: dict = {}


def _packed(weight) -> "ops.PackedLinear":
    """The packed copy of ``weight`` for ``ops.linear``, made on first use and remade when the
    weight changes in place (its version counter moves) or is replaced. Costs one more copy of
    each projection weight in memory (the price of streaming it at full bandwidth)."""
    key = id(weight)
    hit = _PACKED.get(key)
    if (hit is not None and hit[0]() is weight and hit[1] == weight._version
            and hit[2] == weight.data_ptr()):
        return hit[3]
    packed = ops.pack_linear(weight)
    ref = weakref.ref(weight, lambda _r, key=key: _PACKED.pop(key, None))
    _PACKED[key] = (ref, weight._version, weight.data_ptr(), packed)
    return packed


def _linear(x, weight, bias=None, residual=None):
    """``F.linear`` (plus ``residual`` when given); on the CPU, the few rows of a decode or
    verify step go through ``specrt.ops.linear`` on a packed copy of the weight (fp32 / bf16
    with AVX-512): it streams the weight at up to twice the bandwidth of torch's GEMM at these
    shapes, and each row's result is independent of the other rows, so a token verified inside
    a draft tree gets the logits it would get decoded alone (docs/cpu_linear.md). The residual
    add is fused into it there. Autograd inputs stay on ``F.linear``."""
    if (x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= CPU_LINEAR_MAX_ROWS
            and x.dtype == weight.dtype and ops.linear_isa(x.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and (residual is None or residual.stride(-1) == 1)):
        return ops.linear(x if x.stride(-1) == 1 else x.contiguous(), _packed(weight), bias,
                          residual=residual, validate=False)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


#: Fused CPU row-wise ops (``ops.rms_norm``, ``ops.rope_``, ``ops.silu_mul``) for inference on
#: the CPU: one call each instead of 5-10 small tensor ops per layer (the Python and dispatch
#: overhead of those was about a quarter of a decode step). ``$SPECRT_CPU_FUSED=0`` turns them
#: off (the reference's tensor ops then run; results differ at round-off level only).
CPU_FUSED_OPS = os.environ.get("SPECRT_CPU_FUSED", "1") != "0"
_ROW_DTYPES = (torch.float32, torch.bfloat16)


def _fused(x) -> bool:
    """Whether ``x``'s rows go through the fused CPU ops (CPU, fp32 / bf16, 2-D, no autograd)."""
    return (CPU_FUSED_OPS and x.device.type == "cpu" and x.dtype in _ROW_DTYPES
            and x.dim() == 2 and not torch.is_grad_enabled())


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors, or an
    unreadable file."""


@dataclass(slots=True)
class ModelOutput:
    """Result of :meth:`LlamaModel.forward` for the selected rows (``n`` = all tokens, or
    ``len(logits_rows)``).

    Attributes
    ----------
    logits : float32 [n, V]
    hidden : [n, H], model dtype
        Residual stream after the last executed layer, before the final norm.
    aux_hidden : dict[int, [n, H]]
        Residual stream after each requested layer (0-based layer index).
    """

    logits: torch.Tensor
    hidden: torch.Tensor
    aux_hidden: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x) and x.stride(-1) == 1:
            return ops.rms_norm(x, self.weight, self.eps)
        # Variance in fp32, weight applied in the model dtype: the reference's exact order.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _param(shape, dtype, device, enabled=True):
    if not enabled:
        return None
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.inter = cfg.intermediate_size
        self.input_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.post_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, device)
        self.qkv_weight = _param((cfg.q_size + 2 * cfg.kv_size, h), dtype, device)
        self.qkv_bias = _param((cfg.q_size + 2 * cfg.kv_size,), dtype, device, cfg.attention_bias)
        self.o_weight = _param((h, cfg.q_size), dtype, device)
        self.o_bias = _param((h,), dtype, device, cfg.o_proj_bias)
        self.gate_up_weight = _param((2 * cfg.intermediate_size, h), dtype, device)
        self.gate_up_bias = _param((2 * cfg.intermediate_size,), dtype, device, cfg.mlp_bias)
        self.down_weight = _param((h, cfg.intermediate_size), dtype, device)
        self.down_bias = _param((h,), dtype, device, cfg.mlp_bias)
        self.sm_scale = d ** -0.5

    def forward(self, x, cos, sin, k_cache, v_cache, attn: AttentionMetadata,
                skip_attn: bool = False, skip_mlp: bool = False):
        """One decoder layer; ``skip_attn`` / ``skip_mlp`` leave the residual stream unchanged
        for that sublayer (a skipped attention writes and reads no K/V)."""
        if not skip_attn:
            x = self._attention(x, cos, sin, k_cache, v_cache, attn)
        return x if skip_mlp else self._mlp(x)

    def _attention(self, x, cos, sin, k_cache, v_cache, attn: AttentionMetadata):
        n = x.shape[0]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = _linear(self.input_norm(x), self.qkv_weight, self.qkv_bias)
        # RoPE on q and k heads in one pass (rotate-half layout, as HF checkpoints expect).
        if _fused(qkv):
            ops.rope_(qkv, cos.squeeze(1), sin.squeeze(1), hq + hkv, d)
            q = qkv[:, : self.q_size].view(n, hq, d)
            k = qkv[:, self.q_size: self.q_size + self.kv_size].view(n, hkv, d)
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(n, hq + hkv, d)
            x1, x2 = qk[..., : d // 2], qk[..., d // 2:]
            qk = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, self.q_size + self.kv_size:].view(n, hkv, d)
        ops.append_kv(k, v, k_cache, v_cache, attn.slot_mapping, validate=not attn.trusted)
        o = ops.tree_attention(q, k_cache, v_cache, attn.block_table, attn.seq_lens,
                               attn.qo_indptr, attn.mask, sm_scale=self.sm_scale,
                               plan=attn.plan, workspace=attn.workspace,
                               validate=not attn.trusted)
        return _linear(o.view(n, hq * d), self.o_weight, self.o_bias, residual=x)

    def _mlp(self, x):
        gate_up = _linear(self.post_norm(x), self.gate_up_weight, self.gate_up_bias)
        if _fused(gate_up):
            act = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return _linear(act, self.down_weight, self.down_bias, residual=x)


@dataclass(frozen=True, slots=True)
class SkipSet:
    """Sublayers a self-speculative draft leaves out (Draft & Verify, Zhang et al. 2023;
    SWIFT, Xia et al. 2024).

    ``attn`` / ``mlp``: 0-based indices of the layers whose attention / MLP sublayer is
    skipped (the residual stream passes through unchanged; a skipped attention writes no K/V
    and reads none). Stored sorted and without duplicates, so equal sets compare and hash
    equal. An empty set is the full model.
    """

    attn: tuple = ()
    mlp: tuple = ()

    def __post_init__(self):
        for name in ("attn", "mlp"):
            vals = getattr(self, name)
            try:
                vals = tuple(sorted({int(v) for v in vals}))
            except (TypeError, ValueError):
                raise ValueError(f"skip set: {name} must be a sequence of layer indices, "
                                 f"got {getattr(self, name)!r}") from None
            object.__setattr__(self, name, vals)

    @classmethod
    def early_exit(cls, num_layers: int, keep: int) -> "SkipSet":
        """Every sublayer of layers ``keep .. num_layers - 1`` (the first ``keep`` layers run)."""
        rest = tuple(range(keep, num_layers))
        return cls(rest, rest)

    def __len__(self) -> int:
        return len(self.attn) + len(self.mlp)

    def validate(self, num_layers: int) -> "SkipSet":
        """Raise ValueError unless every index is a layer of a ``num_layers``-layer model and
        at least one sublayer still runs; returns ``self``."""
        for name in ("attn", "mlp"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"skip set: {name} layer {bad[0]} out of range for a model of "
                                 f"{num_layers} layers (valid: 0..{num_layers - 1})")
        if len(self.attn) == num_layers and len(self.mlp) == num_layers:
            raise ValueError(f"skip set skips every sublayer of all {num_layers} layers: "
                             "nothing would run")
        return self

    def flags(self, num_layers: int) -> list:
        """[(skip_attn, skip_mlp)] per layer."""
        a, m = set(self.attn), set(self.mlp)
        return [(i in a, i in m) for i in range(num_layers)]

    def as_dict(self) -> dict:
        return {"attn": list(self.attn), "mlp": list(self.mlp)}

    def __str__(self) -> str:
        return f"attn {list(self.attn)}, mlp {list(self.mlp)}"


class LlamaModel(nn.Module):
    """Llama-family causal LM whose attention runs on a paged KV cache.

    Parameters
    ----------
    config : ModelConfig
    dtype : torch.dtype, default fp32 on CPU, bf16 on CUDA
    device : str or torch.device
    """

    def __init__(self, config: ModelConfig, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.config, self.dtype, self.device = config, dtype, device
        c = config
        self.embed_tokens = _param((c.vocab_size, c.hidden_size), dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, device) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.lm_head = (self.embed_tokens if c.tie_word_embeddings
                        else _param((c.vocab_size, c.hidden_size), dtype, device))
        # cos/sin for every position, computed in fp32 like the reference, stored in the model
        # dtype (the reference casts them before use). [max_pos, head_dim / 2].
        pos = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        freqs = pos[:, None] * c.inv_freq()[None, :]
        self.register_buffer("rope_cos", freqs.cos().to(dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("rope_sin", freqs.sin().to(dtype=dtype, device=device),
                             persistent=False)

    # ----------------------------------------------------------------------------------------

    def kv_cache_shape(self, num_pages: int, page_size: int) -> tuple:
        """Shape of the paged cache this model reads and writes."""
        c = self.config
        return (c.num_layers, 2, num_pages, page_size, c.num_kv_heads, c.head_dim)

    def new_kv_cache(self, num_pages: int, page_size: int) -> torch.Tensor:
        return torch.zeros(self.kv_cache_shape(num_pages, page_size), dtype=self.dtype,
                           device=self.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                attn: AttentionMetadata, logits_rows: Optional[torch.Tensor] = None,
                hidden_layers: tuple = (), num_layers: Optional[int] = None,
                hidden_rows: Optional[torch.Tensor] = None,
                skip: Optional[SkipSet] = None) -> ModelOutput:
        """Run the new tokens of a ragged batch through the model.

        Parameters
        ----------
        input_ids : int64 [N]
        positions : int64 [N]
            Absolute position of each token (``< max_position_embeddings``; not checked, to
            avoid a host sync).
        kv_cache : [L, 2, num_pages, page_size, Hkv, D]
            The new tokens' K/V are written at ``attn.slot_mapping`` in every executed layer.
        attn : AttentionMetadata
        logits_rows : int64 [n], optional
            Rows for which logits / hidden states are returned (e.g. the last token of each
            prompt); default all ``N`` rows.
        hidden_layers : tuple of int
            Layers whose output (residual stream) is returned in ``aux_hidden``.
        hidden_rows : int64 [m], optional
            Rows for which ``hidden`` / ``aux_hidden`` are returned, when they differ from
            ``logits_rows`` (e.g. every prompt row for EAGLE, logits for none).
        num_layers : int, optional
            Run only the first ``num_layers`` layers, then the final norm and LM head
            (early exit; shares weights and cache pages).
        skip : SkipSet, optional
            Attention / MLP sublayers to leave out (self-speculative drafting,
            ``specrt.proposers.SelfSpecProposer``): a skipped sublayer adds nothing to the
            residual stream and a skipped attention neither writes nor reads the cache of its
            layer. Indices must be layers of the model (ValueError otherwise); combined with
            ``num_layers``, the skip set applies within the executed layers.

        Returns
        -------
        ModelOutput
        """
        n_run = self.config.num_layers if num_layers is None else num_layers
        if not 1 <= n_run <= self.config.num_layers:
            raise ValueError(f"num_layers must be in [1, {self.config.num_layers}], got {n_run}")
        for i in hidden_layers:
            if not 0 <= i < n_run:
                raise ValueError(f"hidden_layers entry {i} outside the executed layers "
                                 f"[0, {n_run})")
        cos = self.rope_cos[positions].unsqueeze(1)  # [N, 1, D/2], shared by all layers
        sin = self.rope_sin[positions].unsqueeze(1)
        x = F.embedding(input_ids, self.embed_tokens)
        wanted = set(hidden_layers)
        aux = {}
        hrows = logits_rows if hidden_rows is None else hidden_rows
        flags = None
        if skip is not None and len(skip):
            flags = self._skip_flags(skip)
        for i in range(n_run):
            if flags is None:
                x = self.layers[i](x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], attn)
            else:
                x = self.layers[i](x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], attn, *flags[i])
            if i in wanted:
                aux[i] = x if hrows is None else x[hrows]
        hidden = x if hrows is None else x[hrows]
        last = hidden if hidden_rows is None else (x if logits_rows is None else x[logits_rows])
        logits = _linear(self.norm(last), self.lm_head).float()
        return ModelOutput(logits=logits, hidden=hidden, aux_hidden=aux)

    def _skip_flags(self, skip: SkipSet) -> list:
        """Per-layer (skip_attn, skip_mlp), validated once per distinct skip set."""
        cached = getattr(self, "_skip_cache", None)
        if cached is not None and cached[0] == skip:
            return cached[1]
        if not isinstance(skip, SkipSet):
            raise ValueError(f"skip must be a SkipSet, got {type(skip).__name__}")
        flags = skip.validate(self.config.num_layers).flags(self.config.num_layers)
        self._skip_cache = (skip, flags)
        return flags

    # ----------------------------------------------------------------------------------------
    # weight loading (HF parameter names)

    def _targets(self) -> dict:
        """HF tensor name -> (destination parameter, row slice or None)."""
        c = self.config
        t = {"model.embed_tokens.weight": (self.embed_tokens, None),
             "model.norm.weight": (self.norm.weight, None)}
        if not c.tie_word_embeddings:
            t["lm_head.weight"] = (self.lm_head, None)
        q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = (layer.input_norm.weight, None)
            t[p + "post_attention_layernorm.weight"] = (layer.post_norm.weight, None)
            parts = (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)),
                     ("v_proj", slice(q + kv, q + 2 * kv)))
            for name, rows in parts:
                t[f"{p}self_attn.{name}.weight"] = (layer.qkv_weight, rows)
                if layer.qkv_bias is not None:
                    t[f"{p}self_attn.{name}.bias"] = (layer.qkv_bias, rows)
            t[p + "self_attn.o_proj.weight"] = (layer.o_weight, None)
            if layer.o_bias is not None:
                t[p + "self_attn.o_proj.bias"] = (layer.o_bias, None)
            for name, rows in (("gate_proj", slice(0, inter)),
                               ("up_proj", slice(inter, 2 * inter))):
                t[f"{p}mlp.{name}.weight"] = (layer.gate_up_weight, rows)
                if layer.gate_up_bias is not None:
                    t[f"{p}mlp.{name}.bias"] = (layer.gate_up_bias, rows)
            t[p + "mlp.down_proj.weight"] = (layer.down_weight, None)
            if layer.down_bias is not None:
                t[p + "mlp.down_proj.bias"] = (layer.down_bias, None)
        return t

    def expected_weight_names(self) -> list:
        return list(self._targets())

    @torch.no_grad()
    def load_hf_weights(self, tensors: Union[Mapping, Iterable], source: str = "checkpoint"):
        """Copy HF-named tensors (``model.layers.0.self_attn.q_proj.weight``, ...) into the
        fused parameters, casting to the model's dtype and device.

        ``tensors`` is a mapping or an iterable of ``(name, tensor)`` pairs (streamed, so a
        large checkpoint never has to sit in memory twice). A tied model ignores
        ``lm_head.weight``. Raises :class:`CheckpointError` naming missing, unexpected or
        mis-shaped tensors.
        """
        targets = self._targets()
        seen = set()
        unexpected = []
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        for name, w in items:
            if name not in targets:
                if name.endswith("rotary_emb.inv_freq") or (
                        name == "lm_head.weight" and self.config.tie_word_embeddings):
                    continue
                unexpected.append(name)
                continue
            dst, rows = targets[name]
            view = dst if rows is None else dst[rows]
            if tuple(w.shape) != tuple(view.shape):
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(w.shape)}, "
                                      f"the model expects {tuple(view.shape)}")
            view.copy_(w)
            seen.add(name)
        if unexpected:
            raise CheckpointError(f"{source}: unexpected tensors for a {self.config.architecture} "
                                  f"model: {', '.join(sorted(unexpected)[:8])}"
                                  + (" ..." if len(unexpected) > 8 else ""))
        missing = [n for n in targets if n not in seen]
        if missing:
            raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:8])}"
                                  + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
