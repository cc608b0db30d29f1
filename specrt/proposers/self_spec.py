"""Self-speculation by sublayer skipping (Draft & Verify, Zhang et al. 2023; SWIFT, Xia et al.
2024): the draft is the target itself with a chosen set of attention and MLP sublayers left
out, drafting a chain (``AutoregressiveDrafter``: sampled with the draft's probabilities, so
verification stays lossless; optionally adaptive ``k``).

It shares the target's weights and its paged cache. A layer the draft runs writes K/V at the
draft tokens' slots ``committed + j``; the verify step writes every layer at exactly those
slots again (a chain's node ``j`` sits at ``committed + j`` in both passes), so nothing the
draft wrote survives verification. A skipped attention sublayer writes no K/V and reads none.
The committed prefix the draft attends to holds the full model's K/V, as in both papers.

Which sublayers to skip is found by ``specrt.tune.tune_self_spec`` (``specrt tune self-spec``)
and stored as JSON (format below, docs/self_spec.md) with a fingerprint of the model it was
tuned for; loading it for another model raises ValueError naming the mismatch.

JSON layout::

    {"format": "specrt-self-spec/1",
     "model": {"architecture": ..., "num_layers": ..., "hidden_size": ..., "vocab_size": ...,
               "num_heads": ..., "num_kv_heads": ..., "intermediate_size": ...,
               "weight_probe": [5 floats]},
     "skip": {"attn": [layer, ...], "mlp": [layer, ...]},
     "k": 4,
     "search": {measured figures: acceptance, costs, date, device, dtype, command, ...}}
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.llama import SkipSet
from .draft_model import AutoregressiveDrafter

FORMAT = "specrt-self-spec/1"
_GEOMETRY = ("architecture", "num_layers", "hidden_size", "intermediate_size", "vocab_size",
             "num_heads", "num_kv_heads")
# Relative tolerance of the weight probe: loose enough for the same model in another dtype or
# quantization (GGUF Q4_1 vs safetensors), tight enough to tell fine-tunes apart in practice.
_PROBE_RTOL = 0.03


def model_fingerprint(model) -> dict:
    """Geometry of ``model`` plus a probe of its weights (mean |w| of a few RMSNorm weights,
    which checkpoints keep unquantized, and the mean magnitude of 64 embedding rows)."""
    c = model.config
    fp = {k: getattr(c, k) for k in _GEOMETRY}
    L = c.num_layers
    with torch.no_grad():
        probe = [model.norm.weight, model.layers[0].input_norm.weight,
                 model.layers[L // 2].post_norm.weight, model.layers[L - 1].input_norm.weight]
        vals = [float(w.float().abs().mean()) for w in probe]
        vals.append(float(model.embed_tokens[:64].float().abs().mean()))
    fp["weight_probe"] = [float(f"{v:.6g}") for v in vals]
    return fp


def check_fingerprint(recorded: dict, model, source: str = "skip set") -> None:
    """Raise ValueError naming the first difference between ``recorded`` and ``model``."""
    mine = model_fingerprint(model)
    for k in _GEOMETRY:
        if k in recorded and recorded[k] != mine[k]:
            raise ValueError(f"{source} was tuned for {k}={recorded[k]}, this model has "
                             f"{mine[k]}: run `specrt tune self-spec` for this model")
    probe = recorded.get("weight_probe")
    if probe is not None:
        if len(probe) != len(mine["weight_probe"]) or any(
                not math.isclose(a, b, rel_tol=_PROBE_RTOL, abs_tol=1e-6)
                for a, b in zip(probe, mine["weight_probe"])):
            raise ValueError(f"{source} was tuned for other weights of the same geometry "
                             f"(weight_probe {probe}, this model {mine['weight_probe']}): "
                             "run `specrt tune self-spec` for this model")


@dataclass
class SelfSpecConfig:
    """A tuned skip set: what to skip, the chain length ``k``, the model it was tuned for
    (``model_fingerprint``) and the search's measured figures (free-form)."""

    skip: SkipSet
    k: int = 4
    model: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "model": dict(self.model), "skip": self.skip.as_dict(),
                "k": int(self.k), "search": dict(self.search)}

    @classmethod
    def from_json(cls, d: dict, source: str = "skip set") -> "SelfSpecConfig":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a specrt self-spec file (expected "
                             f"\"format\": \"{FORMAT}\")")
        sk = d.get("skip")
        if not isinstance(sk, dict) or not set(sk) <= {"attn", "mlp"}:
            raise ValueError(f"{source}: \"skip\" must be {{\"attn\": [...], \"mlp\": [...]}}")
        k = d.get("k", 4)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{source}: \"k\" must be a positive integer, got {k!r}")
        skip = SkipSet(sk.get("attn", ()), sk.get("mlp", ()))
        model = d.get("model") or {}
        if "num_layers" in model:
            skip.validate(int(model["num_layers"]))
        return cls(skip, k, model, d.get("search") or {})


def save_self_spec(config: SelfSpecConfig, path: Union[str, Path]) -> None:
    """Write ``config`` as JSON (see the module docstring)."""
    Path(path).write_text(json.dumps(config.to_json(), indent=1) + "\n")


def load_self_spec(path: Union[str, Path], model=None) -> SelfSpecConfig:
    """Read a self-spec JSON file; with ``model``, check it was tuned for that model and that
    the skip set fits it (ValueError naming the mismatch otherwise)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"self-spec file {str(path)!r} does not exist")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    cfg = SelfSpecConfig.from_json(d, source=str(p))
    if model is not None:
        check_fingerprint(cfg.model, model, source=f"skip set {p.name}")
        cfg.skip.validate(model.config.num_layers)
    return cfg


class SelfSpecProposer(AutoregressiveDrafter):
    """The target with sublayers skipped drafts chains on the target's own cache pages.

    Parameters
    ----------
    target : the engine's target model (``LlamaModel``)
    skip : SkipSet, SelfSpecConfig, or the path of a self-spec JSON file
    k : draft tokens per step (default: the config's ``k``, else 4)
    adaptive : see :class:`AutoregressiveDrafter`

    The engine calls :meth:`attach` with its cache before the first step.
    """

    name = "self-spec"

    def __init__(self, target, skip: Union[SkipSet, SelfSpecConfig, str, Path],
                 k: Optional[int] = None, adaptive: bool = False):
        if isinstance(skip, (str, Path)):
            skip = load_self_spec(skip, target)
        if isinstance(skip, SelfSpecConfig):
            check_fingerprint(skip.model, target)
            k = k or skip.k
            skip = skip.skip
        if not isinstance(skip, SkipSet):
            raise ValueError(f"skip must be a SkipSet, SelfSpecConfig or JSON path, got "
                             f"{type(skip).__name__}")
        super().__init__(k or 4, adaptive)
        self.skip = skip.validate(target.config.num_layers)
        self.model = target
        self.target_vocab = target.config.vocab_size
        self.cache = None

    def attach(self, model, cache) -> None:
        if model is not self.model:
            raise ValueError("self-spec proposer must run on the engine's target model")
        self.cache = cache

    def _cached_len(self, seq) -> int:
        return seq.committed_len  # the target's cache holds every committed position

    def _forward(self, ids, pos, meta, rows):
        return self.model(ids, pos, self.cache.kv, meta, logits_rows=rows, skip=self.skip).logits


def default_self_spec(target) -> str:
    """Path of the skip set shipped for the default model (SmolLM2-135M-Instruct); ValueError
    for any other model (run ``specrt tune self-spec``)."""
    path = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-self-spec.json"
    c = target.config
    if (c.hidden_size, c.vocab_size, c.num_layers) != (576, 49152, 30):
        raise ValueError("--proposer self-spec needs --self-spec-config FILE for this model: "
                         "specrt ships a skip set for the default model (smollm2-135m) only; "
                         "make one with `specrt tune self-spec --model MODEL --out FILE`")
    if not path.is_file():
        raise ValueError(f"the shipped skip set is missing ({path}); pass --self-spec-config")
    return str(path)
