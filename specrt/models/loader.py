"""Load a native model (and its tokenizer) from a local HF checkpoint directory (config.json +
safetensors, sharded or not) or a GGUF file (dequantized on load with the ``gguf`` package).

No network: names of downloadable models are resolved by ``specrt.hub``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .llama import CheckpointError, LlamaModel
from .tokenizer import Tokenizer, fix_eos_ids

_GGUF_MAGIC = b"GGUF"
# GGUF ``general.architecture`` -> our architecture name. llama.cpp writes Mistral (and
# SmolLM) checkpoints as "llama", with the Q/K permutation that only that name implies.
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def load_model(path, dtype: Optional[torch.dtype] = None, device="cpu",
               tokenizer: bool = True) -> Tuple[LlamaModel, Optional[Tokenizer]]:
    """Load a checkpoint as a :class:`LlamaModel` on ``device``.

    Parameters
    ----------
    path : str or Path
        A HF directory (``config.json`` + ``*.safetensors``), a ``.gguf`` file, or a directory
        holding exactly one ``.gguf`` file.
    dtype : torch.dtype, default fp32 on CPU, bf16 on CUDA
    device : str or torch.device
    tokenizer : bool
        Also build the tokenizer (None when the checkpoint has none).

    Returns
    -------
    (LlamaModel, Tokenizer or None)

    Raises
    ------
    FileNotFoundError : the path or a file it needs does not exist.
    CheckpointError : unreadable/truncated file, missing or mis-shaped tensors.
    ValueError : unsupported architecture (CheckpointError is a ValueError too).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "config.json").is_file():
            return _load_hf_dir(p, dtype, device, tokenizer)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, device, tokenizer)
        raise FileNotFoundError(f"{p}: neither a HF checkpoint (no config.json) nor a directory "
                                f"with one .gguf file ({len(ggufs)} found)")
    return _load_gguf(p, dtype, device, tokenizer)


# --------------------------------------------------------------------------------------------
# HF directories


def _load_hf_dir(path: Path, dtype, device, want_tokenizer):
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON: {e}") from e
    cfg = ModelConfig.from_hf_dict(raw)
    gen = path / "generation_config.json"
    if gen.is_file():
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = cfg.eos_token_ids + [int(e) for e in
                                                     (eos if isinstance(eos, list) else [eos])]
    files = _safetensors_files(path)
    model = LlamaModel(cfg, dtype, device)
    model.load_hf_weights(_iter_safetensors(files), source=str(path))
    tok = None
    if want_tokenizer and (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_hf_dir(path, cfg.eos_token_ids)
    cfg.eos_token_ids = tok.eos_token_ids if tok is not None else fix_eos_ids(cfg.eos_token_ids, {})
    return model.eval(), tok


def _safetensors_files(path: Path) -> list:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index: {e}") from e
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        extra = (" (PyTorch .bin checkpoints are not supported: convert to safetensors)"
                 if list(path.glob("*.bin")) else "")
        raise FileNotFoundError(f"{path}: no *.safetensors weights{extra}")
    return files


def _iter_safetensors(files) -> Iterator:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # SafetensorError, OSError on short reads, ...
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file: {e}") from e


# --------------------------------------------------------------------------------------------
# GGUF files


def _open_gguf(path: Path):
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file: {e}") from e
    # The reader maps tensors lazily; a truncated file shows as short tensor views.
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise CheckpointError(f"{path}: corrupt or truncated GGUF file: tensor {t.name} has "
                                  f"{t.data.nbytes} of its {t.n_bytes} bytes")
    return reader


def read_gguf_metadata(reader) -> dict:
    """All key/value metadata of an open ``GGUFReader`` as plain Python values."""
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def gguf_config(meta: dict, tensor_shapes: dict) -> ModelConfig:
    """ModelConfig from GGUF metadata (``llama.*``, ``qwen2.*`` keys) and the tensor shapes
    (GGUF order, ``{name: [ne0, ne1, ...]}``)."""
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} in GGUF file (supported: "
                         f"{', '.join(sorted(_GGUF_ARCHS))}; HF: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    # The embedding's rows are the truth: tokenizer lists may be shorter (padded vocabularies).
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError("GGUF file has no token_embd.weight tensor")
    vocab = int(tensor_shapes["token_embd.weight"][-1])
    scaling = None
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ValueError(f"unsupported rope scaling type {kind!r} in GGUF file")
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab_map = {t: i for i, t in enumerate(tokens)}
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias=(arch == "qwen2" or "blk.0.attn_q.bias" in tensor_shapes),
        o_proj_bias="blk.0.attn_output.bias" in tensor_shapes,
        mlp_bias="blk.0.ffn_up.bias" in tensor_shapes,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=fix_eos_ids([e for e in eos if e is not None], vocab_map),
        architecture=_GGUF_ARCHS[arch],
    )


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> Optional[str]:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K (its converter interleaves the two rotary halves
    of each head, for ggml's adjacent-pair RoPE) to get back HF's rotate-half layout."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _dequantize(path, t) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name} "
                              f"({t.tensor_type.name}): {e}") from e
    # Unquantized tensors come back as read-only views of the memory-mapped file.
    return w if w.flags.writeable else w.copy()


def _iter_gguf(path, reader, cfg: ModelConfig, llama_permuted: bool):
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # consumed into the config
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name} for a "
                                  f"{cfg.architecture} model")
        w = _dequantize(path, t)
        if llama_permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, cfg.num_heads)
        elif llama_permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, cfg.num_kv_heads)
        yield hf, torch.from_numpy(w)


def _load_gguf(path: Path, dtype, device, want_tokenizer):
    reader = _open_gguf(path)
    meta = read_gguf_metadata(reader)
    names = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    cfg = gguf_config(meta, names)
    if "rope_freqs.weight" in names:
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        cfg.rope_freq_factors = _dequantize(path, t).reshape(-1).tolist()
    model = LlamaModel(cfg, dtype, device)
    permuted = meta.get("general.architecture") == "llama"
    model.load_hf_weights(_iter_gguf(path, reader, cfg, permuted), source=str(path))
    tok = None
    if want_tokenizer and "tokenizer.ggml.tokens" in meta:
        try:
            tok = Tokenizer.from_gguf_metadata(meta)
        except NotImplementedError as e:
            warnings.warn(f"{path}: no tokenizer: {e}")
    if tok is not None:
        cfg.eos_token_ids = fix_eos_ids(cfg.eos_token_ids + tok.eos_token_ids, tok.vocab)
        tok.eos_token_ids = list(cfg.eos_token_ids)
    return model.eval(), tok
