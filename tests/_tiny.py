"""Tiny random native models for engine / proposer tests (no weights needed)."""
from __future__ import annotations

import torch

from specrt.models import LlamaModel, ModelConfig


def tiny_config(vocab=97, hidden=64, layers=4, heads=4, kv_heads=2, arch="llama", **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=512,
                       attention_bias=(arch == "qwen2"), architecture=arch, **kw)


def tiny_model(seed=0, scale=1.0, **kw) -> LlamaModel:
    """A random fp32 model; ``scale`` sharpens its next-token distributions."""
    cfg = tiny_config(**kw)
    m = LlamaModel(cfg, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[-1] ** 0.5))
    return m.eval()


class CharTokenizer:
    """Token id i <-> chr(ord('a') + i % 26) (stop strings / streaming tests)."""

    def __init__(self, eos=None):
        self.eos_token_ids = [] if eos is None else [eos]

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + (i % 26)) for i in ids)

    def apply_chat_template(self, messages):
        return messages[-1]["content"]
