"""Tiny random native models for engine / proposer tests (no weights needed)."""
from __future__ import annotations

import torch

from specrt.models import LlamaModel, ModelConfig


def tiny_config(vocab=97, hidden=64, layers=4, heads=4, kv_heads=2, arch="llama", max_pos=512,
                **kw):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=max_pos,
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


def write_corpus(tmp_path, n_docs: int = 40):
    """``tmp_path/corpus.jsonl``: documents of a repeated pattern (each char determines the
    next ones). Written once: training ranks that call this again must not rewrite the file
    another rank is reading."""
    import json

    p = tmp_path / "corpus.jsonl"
    if p.exists():
        return p
    pat = "abcdefghijklmnopqrstuvwxyz0123456789"
    with open(p, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": pat[i % 7:] + pat * 4}) + "\n")
    return p


class ByteTok:
    """Characters -> ids ``ord(c) % 96`` (96 = eos), enough for tiny-model pipelines."""

    eos_token_ids = [96]

    def encode(self, text):
        return [ord(c) % 96 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages):
        return "u:" + messages[-1]["content"] + "\na:"


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


def random_eagle_head(target, variant="eagle3", seed=0, draft_vocab=None, feature_layers=None,
                      scale=1.0):
    """An EAGLE head with random weights for ``target`` (EAGLE-3: a random reduced draft
    vocabulary of ``draft_vocab`` target ids when given)."""
    from specrt.proposers.eagle import EagleConfig, EagleHead

    cfg = EagleConfig.for_target(target.config, variant, draft_vocab_size=draft_vocab,
                                 feature_layers=feature_layers)
    h = EagleHead(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in h.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[-1] ** 0.5))
        if variant == "eagle3":
            v, d = cfg.vocab_size, cfg.draft_vocab_size
            ids = torch.randperm(v, generator=g)[:d].sort().values
            h.d2t.copy_(ids - torch.arange(d))
            h.t2d.zero_()
            h.t2d[ids] = True
    return h.eval().requires_grad_(False)
