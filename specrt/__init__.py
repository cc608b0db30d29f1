"""specrt: a speculative-decoding runtime.

``import specrt`` works on machines without a GPU or CUDA runtime; the native extension is
loaded on first use of an op (``specrt.ops``), with a clear message if it is missing or stale.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (no native import happens here)
from ._ext import ExtensionError, has_cuda_kernels, load_extension  # noqa: E402,F401

__all__ = ["ops", "ExtensionError", "has_cuda_kernels", "load_extension", "__version__"]


def __getattr__(name):
    # Heavier modules load lazily so `import specrt` stays cheap.
    if name in ("Engine", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'specrt' has no attribute {name!r}")
