"""Timing and provenance helpers shared by the benchmarks (roofline.py, e2e.py).

Timing method
-------------
GPU (:func:`time_cuda`): ``warmup`` untimed calls, then ``reps`` calls each bracketed by its own
pair of CUDA events; before each timed call (outside the events) an optional ``pre`` hook runs
(e.g. restoring state an op mutates) and an :class:`L2Flusher` overwrites a buffer larger than
the L2 cache, so every rep starts with a cold L2 the way a kernel in a real step does. One
device synchronize at the end; the figure is the median of the per-rep times (min and
interquartile range are kept). The number of reps adapts to the call's cost, within limits.

CPU (:func:`time_cpu`): ``time.perf_counter`` around each call, median of the reps; no cache
flush (the last-level cache of the CPU is small next to the working sets measured).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class Timing:
    """Per-rep times of one measured callable, in seconds."""

    times: list = field(default_factory=list)
    warmup: int = 0
    flushed_l2: bool = False

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return {"time_s": self.median, "time_min_s": self.min, "time_iqr_s": self.iqr,
                "reps": len(self.times), "warmup": self.warmup, "l2_flushed": self.flushed_l2}


class L2Flusher:
    """Evicts the L2 cache by writing a buffer of at least twice its size."""

    def __init__(self, device):
        device = torch.device(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        self.bytes = max(2 * l2, 128 << 20)
        self.buf = torch.empty(self.bytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.fill_(0)


def time_cuda(fn: Callable[[], object], *, pre: Optional[Callable[[], object]] = None,
              flusher: Optional[L2Flusher] = None, warmup: int = 5, min_reps: int = 10,
              max_reps: int = 100, target_s: float = 0.3) -> Timing:
    """Median-of-reps GPU time of ``fn`` with CUDA events (see the module docstring)."""
    for _ in range(warmup):
        if pre is not None:
            pre()
        fn()
    torch.cuda.synchronize()
    # One probe rep sizes the loop so a point costs about target_s.
    t = time.perf_counter()
    if pre is not None:
        pre()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if pre is not None:
            pre()
        if flusher is not None:
            flusher()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)], warmup,
                  flusher is not None)


def time_cpu(fn: Callable[[], object], *, pre: Optional[Callable[[], object]] = None,
             warmup: int = 1, min_reps: int = 3, max_reps: int = 20,
             target_s: float = 0.2) -> Timing:
    """Median-of-reps wall time of ``fn`` on the host."""
    for _ in range(warmup):
        if pre is not None:
            pre()
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < target_s):
        if pre is not None:
            pre()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        times.append(dt)
        spent += dt
    return Timing(times, warmup, False)


def time_fn(fn, device, **kw) -> Timing:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` otherwise."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, **kw)
    kw.pop("flusher", None)
    return time_cpu(fn, **{k: v for k, v in kw.items() if k in ("pre", "warmup", "target_s")})


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# the device's own ceilings
# --------------------------------------------------------------------------------------------


def copy_ceiling(device, nbytes: int, **timing_kw) -> dict:
    """Bytes/s of a large copy (``2 * nbytes`` moved: read + write)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timing_kw)
    return {"bytes_per_s": 2 * n * 4 / t.median, "buffer_bytes": n * 4,
            "method": "device-to-device copy_ (read + write) / median time", **t.as_dict()}


def matmul_ceiling(device, n: int, dtype: torch.dtype, **timing_kw) -> dict:
    """FLOP/s of an ``n x n x n`` matmul (``2 n^3`` FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b, out=c), device, **timing_kw)
    return {"flops_per_s": 2 * n**3 / t.median, "n": n, "dtype": str(dtype).replace("torch.", ""),
            **t.as_dict()}


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------


def git_commit() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    return {"commit": run("rev-parse", "HEAD") or None,
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Device name, date, versions, git commit and the exact command line of this run."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = {"sm_count": props.multi_processor_count,
                 "l2_bytes": getattr(props, "L2_cache_size", None),
                 "memory_bytes": props.total_memory}
    else:
        name = cpu_name()
        extra = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    return {"device": name, "device_type": device.type, **extra,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git": git_commit(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}
