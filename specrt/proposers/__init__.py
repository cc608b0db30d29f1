"""Proposers: every drafting method behind one interface (``base.Proposer``)."""
from __future__ import annotations

from .base import NoProposer, Proposer, SeqView, StepResult
from .draft_model import AutoregressiveDrafter, DraftModelProposer
from .layer_skip import LayerSkipProposer
from .medusa import MedusaHeads, MedusaProposer
from .ngram import NgramProposer

__all__ = ["Proposer", "NoProposer", "SeqView", "StepResult", "NgramProposer",
           "DraftModelProposer", "LayerSkipProposer", "AutoregressiveDrafter", "MedusaHeads",
           "MedusaProposer", "create", "default_medusa_heads"]


def default_medusa_heads(target) -> str:
    """The Medusa heads shipped for the default model (SmolLM2-135M-Instruct), if ``target``
    has its geometry; raises ValueError otherwise."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "heads" / "smollm2-135m-medusa"
    c = target.config
    if (c.hidden_size, c.vocab_size, c.num_layers) != (576, 49152, 30):
        raise ValueError("--proposer medusa needs --medusa-heads PATH: specrt ships heads for "
                         "the default model (smollm2-135m) only")
    if not path.is_dir():
        raise ValueError(f"the shipped Medusa heads are missing ({path}); pass --medusa-heads")
    return str(path)


def create(name: str, target, args=None) -> Proposer:
    """Build a proposer by CLI name: ``none``, ``ngram``, ``draft``, ``layer-skip``,
    ``medusa``."""
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
    if name == "medusa":
        heads = getattr(args, "medusa_heads", None) or default_medusa_heads(target)
        tree = getattr(args, "medusa_tree", None) or "dynamic"
        if tree.endswith(".json"):
            import json

            with open(tree) as f:
                tree = json.load(f)
        return MedusaProposer(target, heads, tree=tree,
                              num_nodes=getattr(args, "num_nodes", None) or 16)
    raise ValueError(f"unknown proposer {name!r} (none, ngram, draft, layer-skip, medusa)")
