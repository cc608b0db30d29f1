"""Proposers: every drafting method behind one interface (``base.Proposer``)."""
from __future__ import annotations

from .base import NoProposer, Proposer, SeqView, StepResult
from .draft_model import AutoregressiveDrafter, DraftModelProposer
from .layer_skip import LayerSkipProposer
from .ngram import NgramProposer

__all__ = ["Proposer", "NoProposer", "SeqView", "StepResult", "NgramProposer",
           "DraftModelProposer", "LayerSkipProposer", "AutoregressiveDrafter", "create"]


def create(name: str, target, args=None) -> Proposer:
    """Build a proposer by CLI name: ``none``, ``ngram``, ``draft``, ``layer-skip``."""
    k = getattr(args, "num_draft", 4) if args is not None else 4
    if name in ("none", None):
        return NoProposer()
    if name == "ngram":
        return NgramProposer(k=k, max_branches=2)
    if name == "layer-skip":
        n = getattr(args, "skip_layers", None) or max(1, target.config.num_layers // 2)
        return LayerSkipProposer(target, n, k=k)
    if name == "draft":
        path = getattr(args, "draft_model", None)
        if not path:
            raise ValueError("--proposer draft needs --draft-model PATH|NAME")
        from ..hub import resolve_model
        from ..models import load_model

        p = next(target.parameters())
        draft, _ = load_model(resolve_model(path), dtype=p.dtype, device=p.device)
        return DraftModelProposer(draft, target.config.vocab_size, k=k)
    raise ValueError(f"unknown proposer {name!r} (none, ngram, draft, layer-skip)")
