"""Training text: sources, train / held-out split, token chunks, self-distillation prompts.

Sources (``--data``, repeatable):

* ``stdlib``: the CPython standard-library ``.py`` files of this interpreter
  (``site-packages`` excluded);
* a directory: every regular UTF-8 file under it (recursive);
* a glob pattern (contains ``*``, ``?`` or ``[``), e.g. ``src/**/*.py``;
* a ``.jsonl`` file: one record per line with ``"text"``, or ``"prompt"`` (+ optional
  ``"response"`` / ``"completion"``).

Every document has a stable key (its path relative to the source root, or ``line:N`` in a
JSONL file). The split is a stable hash of the key: about ``heldout_pct`` percent of the
documents are held out, on every machine and every run. Documents are visited in an order
fixed by another hash of the key (so a token cap samples the whole source, not the
alphabetically first files).
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = ["Document", "iter_documents", "stdlib_root", "split_of", "tokenize_chunks",
           "pad_rows", "stdlib_def_prompts", "load_prompts", "CHAT_PROMPTS", "DataError",
           "PAD"]

#: token id of padding in chunk arrays
PAD = -1

#: the chat prompts shipped with specrt (self-distillation of the default model)
CHAT_PROMPTS = Path(__file__).resolve().parent / "chat_prompts.jsonl"


class DataError(ValueError):
    """Bad training-data specification or unusable data."""


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def _h(s: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha1((salt + s).encode()).digest()[:8], "big")


def split_of(key: str, heldout_pct: float = 5.0) -> str:
    """``"train"`` or ``"heldout"`` for a document key (stable across machines and runs)."""
    return "heldout" if (_h(key, "split:") % 10000) < heldout_pct * 100 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text(p: Path) -> Optional[str]:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _file_keys(source: str) -> tuple[Path, list]:
    """(root, sorted relative keys) of a file source; raises DataError for an unknown one."""
    if source == "stdlib":
        root = stdlib_root()
        keys = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
                if "site-packages" not in p.parts and "__pycache__" not in p.parts
                and p.is_file()]
        return root, sorted(keys)
    if any(c in source for c in "*?["):
        files = [Path(f) for f in glob.glob(source, recursive=True)]
        files = [f for f in files if f.is_file()]
        return Path("."), sorted(f.as_posix() for f in files)
    p = Path(source).expanduser()
    if p.is_dir():
        keys = [f.relative_to(p).as_posix() for f in p.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts and ".git" not in f.parts]
        return p, sorted(keys)
    raise DataError(f"unknown data source {source!r}: expected 'stdlib', a directory, a glob "
                    "pattern or a .jsonl file")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1}: invalid JSON: {e}") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i + 1}: expected a JSON object")
            yield i, rec


def _record_text(rec: dict, where: str) -> str:
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("prompt"), str):
        tail = rec.get("response", rec.get("completion", ""))
        return rec["prompt"] + (tail if isinstance(tail, str) else "")
    raise DataError(f"{where}: a record needs a 'text' or 'prompt' string")


def iter_documents(source: str, split: str = "train", heldout_pct: float = 5.0
                   ) -> Iterator[Document]:
    """Documents of one source and split (``"train"``, ``"heldout"`` or ``"all"``), in the
    source's stable shuffled order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    p = Path(source).expanduser()
    if p.suffix == ".jsonl" and not any(c in source for c in "*?["):
        if not p.is_file():
            raise DataError(f"data source {source!r}: no such JSONL file")
        docs = [Document(f"line:{i}", _record_text(r, f"{p}:{i + 1}"))
                for i, r in _jsonl_records(p)]
    else:
        root, keys = _file_keys(source)
        docs = [Document(k, "") for k in keys]  # read lazily below
        docs = [d for d in docs if split == "all" or split_of(d.key, heldout_pct) == split]
        docs.sort(key=lambda d: (_h(d.key, "order:"), d.key))
        for d in docs:
            text = _read_text(root / d.key)
            if text:
                yield Document(d.key, text)
        return
    docs = [d for d in docs if split == "all" or split_of(d.key, heldout_pct) == split]
    docs.sort(key=lambda d: (_h(d.key, "order:"), d.key))
    yield from (d for d in docs if d.text)


def tokenize_chunks(tokenizer, sources: Sequence[str], seq_len: int, split: str = "train",
                    max_tokens: Optional[int] = None, heldout_pct: float = 5.0,
                    eos_id: Optional[int] = None) -> np.ndarray:
    """Documents of ``sources`` tokenised, joined with ``eos_id`` and cut into rows of
    ``seq_len`` tokens: int32 [N, seq_len]; the last row is padded with :data:`PAD`.
    ``max_tokens`` caps the total (over all sources, taken in turn)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if not sources:
        raise DataError("no data source given")
    buf: list = []
    per = None if max_tokens is None else max(1, max_tokens // len(sources))
    for src in sources:
        n0 = len(buf)
        for doc in iter_documents(src, split, heldout_pct):
            ids = list(tokenizer.encode(doc.text))
            if eos_id is not None:
                ids.append(int(eos_id))
            buf.extend(ids)
            if per is not None and len(buf) - n0 >= per:
                del buf[n0 + per:]
                break
    if not buf:
        raise DataError(f"data sources {list(sources)} hold no {split} text")
    n = (len(buf) + seq_len - 1) // seq_len
    out = np.full((n, seq_len), PAD, dtype=np.int32)
    out.reshape(-1)[:len(buf)] = np.asarray(buf, dtype=np.int32)
    return out


def pad_rows(seqs: Sequence[Sequence[int]], seq_len: int) -> np.ndarray:
    """One row per sequence (truncated to / padded up to ``seq_len``): int32 [N, seq_len]."""
    seqs = [s for s in seqs if len(s) > 0]
    if not seqs:
        raise DataError("no sequences to pad")
    out = np.full((len(seqs), seq_len), PAD, dtype=np.int32)
    for i, s in enumerate(seqs):
        s = list(s)[:seq_len]
        out[i, :len(s)] = s
    return out


# --------------------------------------------------------------------------------------------
# self-distillation prompts
# --------------------------------------------------------------------------------------------


def stdlib_def_prompts(max_prompts: int, heldout_pct: float = 5.0, per_file: int = 2,
                       split: str = "train") -> list:
    """HumanEval-like completion prompts from the standard library: a function's ``def``
    line(s) and its docstring, dedented, for the model to complete the body. Train split
    only by default, so held-out files stay unseen."""
    out: list = []
    for doc in iter_documents("stdlib", split, heldout_pct):
        if len(out) >= max_prompts:
            break
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines(keepends=True)
        taken = 0
        for node in ast.walk(tree):
            if taken >= per_file or len(out) >= max_prompts:
                break
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            first = node.body[0]
            if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                continue
            doc_str = first.value.value.strip()
            if len(doc_str) < 20 or first.end_lineno - node.lineno > 30:
                continue
            src = "".join(lines[node.lineno - 1:first.end_lineno])
            out.append(textwrap.dedent(src))
            taken += 1
    return out


def load_prompts(path: str) -> list:
    """Prompts of a JSONL file: ``{"prompt": ...}`` (or ``"text"``), with an optional
    ``"chat": false`` for a plain completion prompt. Returns [(text, chat)]."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"prompt file {path!r} does not exist")
    out = []
    for i, rec in _jsonl_records(p):
        text = rec.get("prompt", rec.get("text"))
        if not isinstance(text, str) or not text:
            raise DataError(f"{p}:{i + 1}: a prompt record needs a non-empty 'prompt' string")
        out.append((text, bool(rec.get("chat", True))))
    if not out:
        raise DataError(f"prompt file {path!r} holds no prompts")
    return out
