"""Native Llama-family model vs Hugging Face transformers on tiny random configs.

Tolerance: fp32 on CPU, logits within atol = rtol = 1e-4 of transformers' (the two differ only
by matmul blocking and the fused q/k/v, gate/up projections); greedy tokens must be identical.
"""
from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from specrt.batch import AttentionMetadata  # noqa: E402
from specrt.models import LlamaModel, ModelConfig  # noqa: E402

ATOL = RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers shared with test_loaders.py / test_real_model.py


def hf_config(kind: str, **over):
    """A tiny transformers config of the given family; ``over`` overrides fields."""
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if kind == "llama3":
        base.update(rope_theta=50000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cls = transformers.LlamaConfig
    elif kind == "llama":
        base.update(num_key_value_heads=4, tie_word_embeddings=True)
        cls = transformers.LlamaConfig
    elif kind == "qwen2":
        base.update(tie_word_embeddings=True, rope_theta=1e6)
        cls = transformers.Qwen2Config
    elif kind == "mistral":
        base.update(head_dim=24, num_key_value_heads=1, sliding_window=None)
        cls = transformers.MistralConfig
    else:
        raise ValueError(kind)
    base.update(over)
    return cls(**base)


def hf_model(cfg, seed=0):
    """transformers model with every parameter (biases and norms included) randomised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def native_from_hf(hf) -> LlamaModel:
    cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
    model = LlamaModel(cfg, torch.float32, "cpu")
    model.load_hf_weights(hf.state_dict())
    return model


class Pager:
    """Minimal page allocator for tests: shuffled page ids, one block-table row per sequence."""

    def __init__(self, model: LlamaModel, page_size: int, max_len: int, num_seqs: int, seed=0):
        self.page_size = page_size
        per_seq = -(-max_len // page_size)
        num_pages = per_seq * num_seqs + 3
        ids = list(range(num_pages))
        random.Random(seed).shuffle(ids)
        self.block_table = torch.tensor(ids[: per_seq * num_seqs],
                                        dtype=torch.int32).view(num_seqs, per_seq)
        self.kv = model.new_kv_cache(num_pages, page_size)
        self.device = model.device
        self.lens = [0] * num_seqs

    def slots(self, seq: int, positions):
        pos = torch.as_tensor(positions, dtype=torch.int64)
        pages = self.block_table[seq].long()[pos // self.page_size]
        return pages * self.page_size + pos % self.page_size

    def step(self, seqs, counts, mask=None, depths=None):
        """Metadata for appending ``counts[i]`` new tokens to sequence ``seqs[i]`` (positions
        ``lens + depth``; depths default to 0..T-1). Returns (metadata, positions)."""
        qo = [0]
        slot_rows, pos_rows = [], []
        for j, (s, t) in enumerate(zip(seqs, counts)):
            qo.append(qo[-1] + t)
            slot_rows.append(self.slots(s, range(self.lens[s], self.lens[s] + t)))
            d = torch.arange(t) if depths is None else torch.as_tensor(depths[j])
            pos_rows.append(self.lens[s] + d)
        seq_lens = torch.tensor([self.lens[s] + t for s, t in zip(seqs, counts)],
                                dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            qo_indptr=torch.tensor(qo, dtype=torch.int32, device=dev),
            seq_lens=seq_lens.to(dev),
            block_table=self.block_table[list(seqs)].contiguous().to(dev),
            slot_mapping=torch.cat(slot_rows).to(dev),
            mask=None if mask is None else mask.to(dev))
        return meta, torch.cat(pos_rows).long().to(dev)

    def commit(self, seqs, counts):
        for s, t in zip(seqs, counts):
            self.lens[s] += t


def pack_mask(parents):
    """Packed ancestor-or-self visibility rows (docs/ops.md) of one tree."""
    t = len(parents)
    words = torch.zeros(t, (t + 31) // 32, dtype=torch.int64)
    for i in range(t):
        j = i
        while j >= 0:
            words[i, j // 32] |= 1 << (j % 32)
            j = parents[j]
    # Store the bit patterns as int32 (two's complement), as the kernels read them.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def native_prefill(model, pager, prompts, seqs=None, **kw):
    seqs = list(range(len(prompts))) if seqs is None else seqs
    counts = [len(p) for p in prompts]
    meta, pos = pager.step(seqs, counts)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=model.device)
    if isinstance(kw.get("logits_rows"), torch.Tensor):
        kw["logits_rows"] = kw["logits_rows"].to(model.device)
    out = model(ids, pos, pager.kv, meta, **kw)
    pager.commit(seqs, counts)
    return out


ARCHS = ["llama3", "llama", "qwen2", "mistral"]


# --------------------------------------------------------------------------------------------
# tests


def test_config_from_hf_dicts():
    c = ModelConfig.from_hf_dict(hf_config("llama3").to_dict())
    assert c.architecture == "llama" and c.rope_theta == 50000.0
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
    q = ModelConfig.from_hf_dict(hf_config("qwen2").to_dict())
    assert q.attention_bias and not q.o_proj_bias and q.tie_word_embeddings
    assert q.rope_theta == 1e6
    m = ModelConfig.from_hf_dict(hf_config("mistral").to_dict())
    assert m.head_dim == 24 and m.num_kv_heads == 1
    # transformers 4.x layout: top-level rope_theta / rope_scaling, eos list.
    old = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_theta": 500000.0, "eos_token_id": [128001, 128009],
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    c = ModelConfig.from_hf_dict(old)
    assert c.rope_theta == 500000.0 and c.eos_token_ids == [128001, 128009]
    assert c.num_kv_heads == 2 and c.head_dim == 4
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_dict(dict(old, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf_dict(dict(old, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize("kind", ARCHS)
def test_rope_tables_match_transformers(kind):
    hf = hf_model(hf_config(kind))
    native = native_from_hf(hf)
    pos = torch.arange(200)[None]
    x = torch.zeros(1, 200, 8)
    cos, sin = hf.model.rotary_emb(x, pos)
    half = native.config.head_dim // 2
    torch.testing.assert_close(native.rope_cos[:200], cos[0, :, :half], atol=0, rtol=0)
    torch.testing.assert_close(native.rope_sin[:200], sin[0, :, :half], atol=0, rtol=0)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", ARCHS)
def test_prompt_logits_ragged_batch(kind, page_size):
    hf = hf_model(hf_config(kind))
    native = native_from_hf(hf)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 1, 23)]
    pager = Pager(native, page_size, 40, len(prompts))
    out = native_prefill(native, pager, prompts)
    want = torch.cat([hf_logits(hf, p) for p in prompts])
    assert out.logits.dtype == torch.float32 and out.logits.shape == want.shape
    torch.testing.assert_close(out.logits, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("kind", ARCHS)
def test_greedy_decode_through_paged_cache(kind, page_size):
    hf = hf_model(hf_config(kind))
    native = native_from_hf(hf)
    prompts = [[5, 9, 100, 3, 7, 42, 8], [17, 4]]
    steps = 20
    pager = Pager(native, page_size, 40, len(prompts), seed=page_size)
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    out = native_prefill(native, pager, prompts, logits_rows=last)
    seqs = [list(p) for p in prompts]
    nxt = out.logits.argmax(-1).tolist()
    for _ in range(steps):
        for s, t in zip(seqs, nxt):
            s.append(t)
        meta, pos = pager.step([0, 1], [1, 1])
        out = native(torch.tensor(nxt), pos, pager.kv, meta)
        pager.commit([0, 1], [1, 1])
        nxt = out.logits.argmax(-1).tolist()
    for s, t in zip(seqs, nxt):
        s.append(t)
    for p, got in zip(prompts, seqs):
        ids = list(p)
        for _ in range(steps + 1):
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        assert got == ids


def _random_tree(t, rng):
    return [-1] + [rng.randrange(i) for i in range(1, t)]


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_tree_verify_matches_path_decoding(kind, page_size):
    """Each node of a draft tree gets the logits of causal decoding along its root path."""
    hf = hf_model(hf_config(kind))
    native = native_from_hf(hf)
    rng = random.Random(3)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (6, 19)]
    trees = [_random_tree(7, rng), _random_tree(40, rng)]
    tokens = [[rng.randrange(211) for _ in tr] for tr in trees]
    pager = Pager(native, page_size, 64, 2)
    native_prefill(native, pager, prompts)

    def depth(parents, i):
        d = 0
        while parents[i] >= 0:
            i, d = parents[i], d + 1
        return d

    masks = [pack_mask(tr) for tr in trees]
    w = max(m.shape[1] for m in masks)
    mask = torch.cat([torch.nn.functional.pad(m, (0, w - m.shape[1])) for m in masks])
    depths = [[depth(tr, i) for i in range(len(tr))] for tr in trees]
    meta, pos = pager.step([0, 1], [len(t) for t in trees], mask=mask, depths=depths)
    ids = torch.tensor([t for tk in tokens for t in tk])
    out = native(ids, pos, pager.kv, meta)
    row = 0
    for p, tr, tk in zip(prompts, trees, tokens):
        for i in range(len(tr)):
            path, j = [], i
            while j >= 0:
                path.append(tk[j])
                j = tr[j]
            want = hf_logits(hf, p + path[::-1])[-1]
            torch.testing.assert_close(out.logits[row], want, atol=ATOL, rtol=RTOL)
            row += 1


@pytest.mark.parametrize("kind", ["llama3", "mistral"])
def test_layer_skip_and_hidden_states(kind):
    hf = hf_model(hf_config(kind, num_hidden_layers=4))
    native = native_from_hf(hf)
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32]
    captured = {}
    hook = hf.model.layers[-1].register_forward_hook(
        lambda mod, inp, outp: captured.__setitem__("last", outp[0] if isinstance(outp, tuple)
                                                    else outp))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt]), output_hidden_states=True)
    hook.remove()
    hs = [h[0] for h in ref.hidden_states]  # hs[i + 1] = after layer i (last one normed)

    pager = Pager(native, 16, 16, 1)
    out = native_prefill(native, pager, [prompt], hidden_layers=(0, 2, 3))
    torch.testing.assert_close(out.logits, ref.logits[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.hidden, captured["last"].reshape(out.hidden.shape),
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.aux_hidden[0], hs[1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.aux_hidden[2], hs[3], atol=ATOL, rtol=RTOL)
    assert out.aux_hidden[3] is out.hidden or torch.equal(out.aux_hidden[3], out.hidden)

    # Layer skip: the first k layers, then the final norm and LM head, on rows 2 and 8 only.
    for k in (1, 2):
        pager = Pager(native, 1, 16, 1, seed=k)
        rows = torch.tensor([2, 8])
        out = native_prefill(native, pager, [prompt], num_layers=k, logits_rows=rows,
                             hidden_layers=(k - 1,))
        with torch.no_grad():
            want = hf.lm_head(hf.model.norm(hs[k][rows]))
        torch.testing.assert_close(out.hidden, hs[k][rows], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(out.logits, want, atol=ATOL, rtol=RTOL)
        # Only the executed layers' cache pages were written.
        assert pager.kv[k:].abs().sum() == 0 and pager.kv[:k].abs().sum() > 0

    with pytest.raises(ValueError, match="num_layers"):
        native_prefill(native, Pager(native, 1, 16, 1), [prompt], num_layers=0)
    with pytest.raises(ValueError, match="hidden_layers"):
        native_prefill(native, Pager(native, 1, 16, 1), [prompt], num_layers=2,
                       hidden_layers=(2,))


def test_load_weights_errors():
    hf = hf_model(hf_config("llama3"))
    native = LlamaModel(ModelConfig.from_hf_dict(hf.config.to_dict()))
    sd = dict(hf.state_dict())
    from specrt.models import CheckpointError

    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.mlp.up_proj"):
        native.load_hf_weights(bad)
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="k_proj.weight has shape"):
        native.load_hf_weights(bad)
    bad = dict(sd, **{"model.layers.0.self_attn.q_norm.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected tensors.*q_norm"):
        native.load_hf_weights(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_model_matches_cpu_fp32(dtype):
    """The CUDA path (half weights, CUDA kernels) against the fp32 CPU model: prompts, then a
    verify step over trees. Tolerance: half-precision round-off through 3 layers on logits of
    std ~1.3 (measured with CPU half models: bf16 max 0.23 / mean 0.03, fp16 max 0.03 / mean
    0.004): max |diff| <= 0.35 / 0.06 and mean <= 0.05 / 0.008; argmax agrees on >= 90% rows."""
    max_tol, mean_tol = (0.35, 0.05) if dtype == torch.bfloat16 else (0.06, 0.008)
    hf = hf_model(hf_config("llama3", hidden_size=256, intermediate_size=384,
                            num_attention_heads=4, num_key_value_heads=2))  # head_dim 64
    cpu = native_from_hf(hf)
    gpu = LlamaModel(cpu.config, dtype, "cuda")
    gpu.load_hf_weights(hf.state_dict())
    assert gpu.embed_tokens.dtype == dtype and gpu.embed_tokens.is_cuda
    rng = random.Random(5)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (1, 37, 130)]
    trees = [_random_tree(t, rng) for t in (1, 7, 64)]
    tokens = [[rng.randrange(211) for _ in tr] for tr in trees]
    masks = [pack_mask(tr) for tr in trees]
    w = max(m.shape[1] for m in masks)
    mask = torch.cat([torch.nn.functional.pad(m, (0, w - m.shape[1])) for m in masks])
    ids = torch.tensor([t for tk in tokens for t in tk])
    results = []
    for model in (cpu, gpu):
        pager = Pager(model, 16, 200, 3, seed=11)
        pre = native_prefill(model, pager, prompts).logits.cpu()
        depths = []
        for tr in trees:
            d = [0] * len(tr)
            for i in range(1, len(tr)):
                d[i] = d[tr[i]] + 1
            depths.append(d)
        meta, pos = pager.step([0, 1, 2], [len(t) for t in trees], mask=mask, depths=depths)
        ver = model(ids.to(model.device), pos, pager.kv, meta).logits.cpu()
        results.append((pre, ver))
    for want, got in zip(results[0], results[1]):
        assert got.dtype == torch.float32
        diff = (got - want).abs()
        assert diff.max().item() <= max_tol and diff.mean().item() <= mean_tol, diff.max()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.9, agree
