"""Training of speculative-decoding proposers (``specrt train ...``).

One pipeline for every trained proposer: a frozen target, hidden states computed once and
cached on disk, optional self-distillation (the target writes the training text), a two-stage
schedule (corpus, then self-distilled data), checkpoints with exact resume, and ``torchrun``
(DDP on the trainable module, optional FSDP2 on the frozen target) past one process.

Methods plug in through :class:`specrt.train.base.Method`: :mod:`specrt.train.medusa`
(Medusa-1 heads) and :mod:`specrt.train.eagle` (EAGLE-3 heads with training-time test, and
EAGLE-1 heads). Inference code never imports this package.
"""
from __future__ import annotations

__all__ = ["METHODS"]

#: method name -> "module:class" (imported lazily)
METHODS = {"medusa": "specrt.train.medusa:MedusaMethod",
           "eagle3": "specrt.train.eagle:Eagle3Method",
           "eagle": "specrt.train.eagle:Eagle1Method"}
