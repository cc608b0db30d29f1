"""Architecture description of a Llama-family decoder, read from HF ``config.json`` or GGUF.

One dataclass covers Llama (1/2/3.x, incl. llama3 RoPE scaling), Mistral, Qwen2 and
SmolLM look-alikes: they differ only in biases, head geometry and RoPE parameters.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# HF ``architectures`` entry / ``model_type`` -> our canonical architecture name.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Geometry and hyper-parameters of a Llama-family model.

    ``rope_scaling`` is ``None`` (plain RoPE) or a dict with ``rope_type`` in
    {"linear", "llama3"}; llama3 needs ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``; linear needs ``factor``. ``rope_freq_factors`` are
    per-frequency divisors of the inverse frequencies, as GGUF files store llama3 scaling
    (tensor ``rope_freqs.weight``) instead of the parameters.

    ``attention_bias`` is the bias of the Q/K/V projections (Qwen2 always has it);
    ``o_proj_bias`` / ``mlp_bias`` are Llama's rarely used extra biases.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_freq_factors: Optional[list] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    architecture: str = "llama"
    # Sliding-window attention is not implemented: the runtime attends to the full context.
    # Kept so that callers can cap the context at the window when it matters.
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in _ROPE_TYPES:
                raise ValueError(f"unsupported rope scaling type {kind!r} (supported: "
                                 f"{', '.join(_ROPE_TYPES)})")

    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed HF ``config.json`` (transformers 4.x or 5.x layout).

        Raises ``ValueError`` naming the architecture when it is not a supported one.
        """
        arch = _architecture_of(d)
        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = d.get("head_dim") or hidden // heads
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {act!r} (only SwiGLU/silu models)")

        # transformers 5.x moves rope_theta (and the scaling) into ``rope_parameters``; 4.x
        # has top-level ``rope_theta`` and ``rope_scaling``. Accept both, prefer explicit values.
        rope_params = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or None
        theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = kind
            if kind == "default":
                scaling = None

        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else
                                          [int(e) for e in eos])
        # Qwen2's bias on q/k/v is unconditional; Llama's ``attention_bias`` covers o_proj too.
        qkv_bias = arch == "qwen2" or bool(d.get("attention_bias", False))
        o_bias = arch != "qwen2" and bool(d.get("attention_bias", False))
        window = None
        if arch == "mistral" or d.get("use_sliding_window", False):
            window = d.get("sliding_window")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
            sliding_window=window,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))

    # ----------------------------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def inv_freq(self):
        """RoPE inverse frequencies ``float32 [head_dim / 2]``, scaling applied.

        Computed exactly as transformers does (fp32 ``base ** (arange / dim)``), so that the
        native model's cos/sin tables agree bit for bit with the reference's.
        """
        import torch

        dim = self.head_dim
        exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        inv = 1.0 / (self.rope_theta ** exps)
        s = self.rope_scaling
        if s is not None:
            kind = s["rope_type"] if "rope_type" in s else s.get("type")
            if kind == "linear":
                inv = inv / float(s["factor"])
            elif kind == "llama3":
                inv = _llama3_scale(inv, s, self.max_position_embeddings)
        if self.rope_freq_factors is not None:
            factors = torch.tensor(self.rope_freq_factors, dtype=torch.float32)
            if factors.numel() != inv.numel():
                raise ValueError(f"rope_freq_factors has {factors.numel()} entries, expected "
                                 f"{inv.numel()} (head_dim / 2)")
            inv = inv / factors
        return inv


def _llama3_scale(inv, s, max_pos):
    """Llama 3.1 frequency-dependent RoPE scaling: long wavelengths are slowed by ``factor``,
    short ones kept, a smooth ramp in between."""
    import torch

    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s.get("original_max_position_embeddings", max_pos))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _architecture_of(d: dict) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
    if archs:
        raise ValueError(f"unsupported architecture {archs[0]!r} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    mt = d.get("model_type")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    raise ValueError(f"unsupported architecture (model_type {mt!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)})")
