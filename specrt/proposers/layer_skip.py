"""Self-speculative layer skip: the target's first ``N`` layers plus its final norm and LM head
draft a chain. It shares the target's weights and the target's cache pages of those layers:
layer ``l``'s K/V at a position depends only on the tokens and layers ``< l``, so the draft
writes exactly the values the verify step will write again at the same slots (sound for a
chain, whose node ``j`` sits at slot ``committed + j`` in both passes).
"""
from __future__ import annotations

from .draft_model import AutoregressiveDrafter


class LayerSkipProposer(AutoregressiveDrafter):
    """Parameters: ``target`` model, ``num_layers`` kept (1 <= N < L), ``k``, ``adaptive``.
    The engine calls :meth:`attach` with its cache before the first step."""

    name = "layer-skip"

    def __init__(self, target, num_layers: int, k: int = 4, adaptive: bool = False):
        super().__init__(k, adaptive)
        L = target.config.num_layers
        if not 1 <= num_layers < L:
            raise ValueError(f"layer skip keeps 1..{L - 1} of the target's {L} layers, got {num_layers}")
        self.model = target
        self.num_layers = num_layers
        self.target_vocab = target.config.vocab_size
        self.cache = None

    def attach(self, model, cache) -> None:
        if model is not self.model:
            raise ValueError("layer-skip proposer must run on the engine's target model")
        self.cache = cache

    def _cached_len(self, seq) -> int:
        return seq.committed_len  # the target's cache holds every committed position

    def _forward(self, ids, pos, meta, rows):
        return self.model(ids, pos, self.cache.kv, meta, logits_rows=rows,
                          num_layers=self.num_layers).logits
