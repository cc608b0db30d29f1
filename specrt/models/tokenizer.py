"""Tokenizers for the native models: HF ``tokenizer.json`` or GGUF metadata, both run by the
``tokenizers`` library; chat templates; incremental (streaming) detokenization.

GGUF files carry byte-level BPE vocabularies as metadata (``tokenizer.ggml.tokens``, ``merges``,
``token_type``) plus a pre-tokenizer name (``tokenizer.ggml.pre``) that tells how llama.cpp splits
text before BPE. We rebuild the equivalent ``tokenizers`` pipeline from those.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

# llama.cpp pre-tokenizer names -> how text is split before the byte-level BPE.
# "digits+gpt2": each digit alone, then GPT-2's regex (SmolLM/StarCoder family).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "codeshell": "digits+gpt2", "command-r": "digits+gpt2", "exaone": "digits+gpt2",
    "minerva-7b": "digits+gpt2",
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
}

# GGUF token types (llama.cpp): 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table of byte-level BPE vocabularies."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def fix_eos_ids(eos_ids: Iterable[int], vocab: dict) -> list:
    """Stop tokens: the declared ones plus the chat-turn terminators of the vocabulary.

    Converted checkpoints often declare a single eos that is not what instruct models end their
    turn with (MODELS.md: SmolLM2 ends with ``<|im_end|>`` = 2, Qwen2.5 with ``<|im_end|>`` =
    151645, while ``<|endoftext|>`` or ``<|im_start|>`` get declared); generation must stop on
    the turn terminator too.
    """
    out = []
    for i in eos_ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
        i = vocab.get(tok)
        if i is not None and i not in out:
            out.append(i)
    return out


class Tokenizer:
    """Text <-> token ids for a native model.

    Attributes
    ----------
    eos_token_ids : list[int]
        Every token that ends generation (see :func:`fix_eos_ids`).
    bos_token_id : int or None
    chat_template : str or None
        Jinja template of the checkpoint (None: ChatML is used).
    """

    def __init__(self, backend, eos_token_ids: Sequence[int] = (), bos_token_id=None,
                 chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None):
        self.backend = backend
        self.vocab = backend.get_vocab(with_added_tokens=True)
        self.eos_token_ids = fix_eos_ids(eos_token_ids, self.vocab)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.bos_token = bos_token or (backend.id_to_token(bos_token_id)
                                       if bos_token_id is not None else None)
        first_eos = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = eos_token or (backend.id_to_token(first_eos)
                                       if first_eos is not None else None)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS where the checkpoint asks for
        it (like transformers' ``tokenizer(text)``). Special tokens written in the text
        (``<|im_start|>``) are matched whole."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs):
        """Render a conversation (``[{"role": ..., "content": ...}]``) with the checkpoint's
        chat template (jinja2), or ChatML when it has none or jinja2 is missing. Returns the
        prompt text, or its ids when ``tokenize``."""
        template = self.chat_template
        text = None
        if template:
            try:
                text = _render(template, messages, add_generation_prompt, self.bos_token,
                               self.eos_token, kwargs)
            except ImportError:
                warnings.warn("jinja2 is not installed: using ChatML instead of the "
                              "checkpoint's chat template")
        if text is None:
            text = _render_chatml(messages, add_generation_prompt)
        # The template writes BOS itself where the model wants it.
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ----------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_hf_dir(cls, path: str | Path, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """From ``tokenizer.json`` (+ ``tokenizer_config.json`` for the chat template and
        special tokens) in a HF checkpoint directory."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are "
                                    "supported)")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:
            raise ValueError(f"{tj}: cannot be read as a tokenizers file: {e}") from e
        cfg = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            with open(tc, encoding="utf-8") as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        ct = path / "chat_template.jinja"
        if template is None and ct.is_file():
            template = ct.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        bos, eos = tok_str(cfg.get("bos_token")), tok_str(cfg.get("eos_token"))
        eos_ids = list(eos_token_ids)
        if eos is not None and backend.token_to_id(eos) is not None:
            eos_ids.append(backend.token_to_id(eos))
        bos_id = backend.token_to_id(bos) if bos is not None else None
        return cls(backend, eos_ids, bos_id, template, bos, eos)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """From the ``tokenizer.*`` metadata of a GGUF file (a dict of decoded values, as
        returned by ``specrt.models.loader.read_gguf_metadata``). Byte-level BPE only
        (``tokenizer.ggml.model == "gpt2"``: Llama 3, Qwen2, SmolLM, StarCoder, ...)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise NotImplementedError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                "tokenizer.ggml.model = 'gpt2')")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Tokens outside the byte alphabet (mislabelled specials) are respelled byte-wise,
        # as llama.cpp and transformers do, so the vocabulary keeps its size and ids.
        vocab = {}
        for i, t in enumerate(tokens):
            if not set(t) <= alphabet:
                t = "".join(spelling[b] for b in t.encode("utf-8"))
            vocab.setdefault(t, i)
        backend = Backend(models.BPE(vocab, merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        split = _PRE_TOKENIZERS.get(pre)
        if split is None:
            warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}: splitting text like GPT-2")
            split = "gpt2"
        if split == "gpt2":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)
        elif split == "digits+gpt2":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        added = [AddedToken(t, special=False, normalized=False)
                 for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
        if specials:
            backend.add_special_tokens(specials)
        if added:
            backend.add_tokens(added)
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
            bos = tokens[bos_id]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        eos_ids = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
        return cls(backend, [i for i in eos_ids if i is not None], bos_id,
                   meta.get("tokenizer.chat_template"))


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, emitting only complete UTF-8 characters.

    A byte-level token may end in the middle of a multi-byte character. Each push decodes a
    small window of recent tokens (starting one step back, so that decoders that drop a leading
    space see their context) and emits the new text up to, not including, a trailing run of
    U+FFFD (an incomplete sequence), which is held until its last byte arrives. Each step is
    O(window). :meth:`flush` returns whatever is left, incomplete bytes as U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # text of ids[_prefix:_read] has been emitted in full
        self._partial = 0  # chars emitted beyond that (complete chars of a pending token run)

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids) -> str:
        """Add one id or a list of ids; return the newly completed text (maybe '')."""
        if isinstance(ids, int):
            ids = [ids]
        self.ids.extend(int(i) for i in ids)
        start = len(self._decode(self.ids[self._prefix:self._read])) + self._partial
        text = self._decode(self.ids[self._prefix:])
        if not text.endswith("\ufffd"):
            self._prefix, self._read, self._partial = self._read, len(self.ids), 0
            return text[start:]
        stable = text.rstrip("\ufffd")
        if len(stable) <= start:
            return ""
        self._partial += len(stable) - start
        return stable[start:]

    def flush(self) -> str:
        start = len(self._decode(self.ids[self._prefix:self._read])) + self._partial
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        self._partial = 0
        return text[start:]


def _render_chatml(messages, add_generation_prompt):
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _render(template, messages, add_generation_prompt, bos_token, eos_token, extra):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "", eos_token=eos_token or "", **extra)
