"""Loading of the native extension ``specrt._C`` with one clear message when it is missing
or was built from other op schemas than the sources next to it (a stale editable build)."""
from __future__ import annotations

import hashlib
from pathlib import Path

_BUILD_HINT = (
    "build it with:  pip install torch==2.13.0 pybind11 ninja cmake && "
    "pip install --no-build-isolation -e .   (GPU machines: "
    "pip install --no-build-isolation --no-deps -e .)"
)

_ext = None


class ExtensionError(ImportError):
    """The native extension is missing or stale."""


def load_extension():
    """Import ``specrt._C`` once (registering ``torch.ops.specrt.*``) and return it."""
    global _ext
    if _ext is not None:
        return _ext
    try:
        from . import _C  # noqa: F401  (registers the ops with torch)
    except ImportError as e:
        raise ExtensionError(f"specrt's native extension specrt._C could not be imported ({e}); {_BUILD_HINT}") from e
    src = Path(__file__).resolve().parent.parent / "csrc" / "torch" / "bindings.cpp"
    if src.exists():
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        if getattr(_C, "ABI_TAG", "") != want:
            raise ExtensionError(f"specrt._C is stale: it was built from other op schemas than {src}; rebuild: {_BUILD_HINT}")
    _ext = _C
    return _ext


def has_cuda_kernels() -> bool:
    """Whether the extension was built with the CUDA kernels."""
    return bool(getattr(load_extension(), "WITH_CUDA", False))
