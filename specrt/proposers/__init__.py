"""Proposers: every drafting method behind one interface (``base.Proposer``)."""
from __future__ import annotations

from .base import NoProposer, Proposer, SeqView, StepResult
from .cascade import HorizontalCascade, vertical_cascade
from .draft_model import AutoregressiveDrafter, DraftModelProposer
from .eagle import EagleHead, EagleProposer, load_eagle_head
from .lookahead import LookaheadProposer
from .medusa import MedusaHeads, MedusaProposer
from .mlp_speculator import (MLPSpeculator, MLPSpeculatorProposer, default_mlp_speculator,
                            load_mlp_speculator)
from .mtp import MTPProposer, default_mtp_modules, load_mtp_modules
from .multi import ProposerSet
from .ngram import NgramProposer
from .self_spec import SelfSpecProposer, default_self_spec, load_self_spec, save_self_spec

__all__ = ["Proposer", "NoProposer", "SeqView", "StepResult", "NgramProposer",
           "DraftModelProposer", "AutoregressiveDrafter", "MedusaHeads",
           "MedusaProposer", "LookaheadProposer", "EagleHead", "EagleProposer", "load_eagle_head", "create",
           "default_medusa_heads", "default_eagle_head", "HorizontalCascade", "vertical_cascade",
           "SelfSpecProposer", "default_self_spec", "load_self_spec", "save_self_spec",
           "MTPProposer", "default_mtp_modules", "load_mtp_modules", "MLPSpeculator",
           "MLPSpeculatorProposer", "default_mlp_speculator", "load_mlp_speculator",
           "ProposerSet"]


def _shipped(target, name: str, what: str, option: str) -> str:
    """A head shipped for the default model (SmolLM2-135M-Instruct), if ``target`` has its
    geometry; raises ValueError otherwise."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "heads" / name
    c = target.config
    if (c.hidden_size, c.vocab_size, c.num_layers) != (576, 49152, 30):
        raise ValueError(f"{what} needs {option} PATH: specrt ships heads for the default "
                         "model (smollm2-135m) only")
    if not path.is_dir():
        raise ValueError(f"the shipped heads are missing ({path}); pass {option}")
    return str(path)


def default_medusa_heads(target) -> str:
    """The Medusa heads shipped for the default model."""
    return _shipped(target, "smollm2-135m-medusa", "--proposer medusa", "--medusa-heads")


def default_eagle_head(target) -> str:
    """The EAGLE-3 head shipped for the default model."""
    return _shipped(target, "smollm2-135m-eagle3", "--proposer eagle", "--eagle-head")


def _tree_arg(tree):
    if isinstance(tree, str) and tree.endswith(".json"):
        import json

        with open(tree) as f:
            return json.load(f)
    return tree


def create(name: str, target, args=None) -> Proposer:
    """Build a proposer by CLI name: ``none``, ``ngram``, ``draft``, ``self-spec`` (alias
    ``layer-skip``), ``medusa``, ``eagle``, ``lookahead``, ``cascade``, ``mtp``,
    ``mlp-speculator``; ``A|B[|C]`` for a :class:`ProposerSet` of those (e.g.
    ``ngram|eagle``: the policy picks the member per sequence and step)."""
    k = (getattr(args, "num_draft", None) if args is not None else None) or 4
    if name in ("none", None):
        return NoProposer()
    if "|" in name:
        parts = name.split("|")
        if any(p in ("none", "") for p in parts):
            raise ValueError(f"bad proposer set {name!r}: members are drafting proposers")
        return ProposerSet([create(p, target, args) for p in parts])
    if name == "ngram":
        return NgramProposer(k=k, max_branches=2)
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
        tree = _tree_arg(getattr(args, "medusa_tree", None) or "dynamic")
        return MedusaProposer(target, heads, tree=tree,
                              num_nodes=getattr(args, "num_nodes", None) or 16)
    if name == "eagle":
        head = getattr(args, "eagle_head", None) or default_eagle_head(target)
        tree = _tree_arg(getattr(args, "eagle_tree", None) or "dynamic")
        total = getattr(args, "total_tokens", None) or "auto"
        if total != "auto":
            try:
                total = int(total)
            except ValueError:
                raise ValueError(f"--total-tokens must be an integer or 'auto', got {total!r}")
        # Defaults by device, as measured (bench/results/eagle_*): a GPU verifies big trees
        # for the price of one node (EAGLE-2's top_k 8 / depth 5); on a 2-core CPU each head
        # level costs ~2.5 ms, so a narrow frontier (top_k 2, depth 4) is fastest.
        gpu = next(target.parameters()).is_cuda
        return EagleProposer(target, head, tree=tree, total_tokens=total,
                             top_k=getattr(args, "eagle_top_k", None) or (8 if gpu else 2),
                             depth=getattr(args, "eagle_depth", None) or (5 if gpu else 4))
    if name == "cascade":
        # --cascade SPEC (cascade.SPEC_HELP); default: Medusa's shipped heads, then n-gram
        from .cascade import from_spec

        spec = getattr(args, "cascade", None) or "medusa+ngram"
        return from_spec(spec, lambda part: create(part, target, args))
    if name in ("self-spec", "layer-skip"):
        # Self-speculation by sublayer skipping; "layer-skip" is the old name (its early-exit
        # drafts were replaced: docs/self_spec.md). --self-spec-config FILE (from `specrt tune
        # self-spec`); default: the skip set shipped for smollm2-135m. --num-draft overrides
        # the tuned k.
        path = getattr(args, "self_spec_config", None) or default_self_spec(target)
        return SelfSpecProposer(target, path, k=getattr(args, "num_draft", None))
    if name == "lookahead":
        # --lookahead-window/-ngram/-guesses; defaults by device (docs/lookahead.md): on a
        # 2-core CPU every row past ~4 costs ~5-7% of a step and the Jacobi window's n-grams
        # never paid for their rows (measured), so the window is off and one pooled guess goes
        # with the prompt-lookup chain; on a GPU rows are nearly free: W 7, N 5, G 7 (not
        # measured yet: no GPU lent).
        gpu = next(target.parameters()).is_cuda
        dflt = {"window": 7, "ngram": 5, "guesses": 7} if gpu else {"window": 0, "ngram": 3,
                                                                    "guesses": 1}
        opts = {o: getattr(args, f"lookahead_{o}", None) for o in dflt}
        return LookaheadProposer(**{o: dflt[o] if v is None else v for o, v in opts.items()})
    if name == "mtp":
        # --mtp-modules PATH (MiMo or DeepSeek-V3 layout; default: the MTP-3 modules shipped
        # for smollm2-135m), --num-draft levels (default: the module count), --mtp-top-k
        # (1: chains, the default), --total-tokens (tree cap)
        from .mtp import from_args

        return from_args(target, args)
    if name == "mlp-speculator":
        # --mlp-speculator PATH (fms-extras / vLLM layout; default: the one shipped for
        # smollm2-135m); tree size from --num-nodes, else the checkpoint's defaults
        path = getattr(args, "mlp_speculator", None) or default_mlp_speculator(target)
        return MLPSpeculatorProposer(target, path, num_nodes=getattr(args, "num_nodes", None))
    raise ValueError(f"unknown proposer {name!r} (none, ngram, draft, self-spec, medusa, eagle, "
                     "lookahead, cascade, mtp, mlp-speculator)")
