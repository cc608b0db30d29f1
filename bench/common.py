"""Timing and provenance helpers shared by the benchmarks (roofline.py, e2e.py).

Timing method
-------------
GPU (:func:`time_cuda`): ``warmup`` untimed calls, then ``reps`` calls each bracketed by its own
pair of CUDA events; before each timed call (outside the events) an optional ``pre`` hook runs
(e.g. restoring state an op mutates) and an :class:`L2Flusher` overwrites a buffer larger than
the L2 cache, so every rep starts with a cold L2 the way a kernel in a real step does. One
device synchronize at the end; the figure is the median of the per-rep times (min and
interquartile range are kept). The number of reps adapts to the call's cost, within limits.

CPU (:func:`time_cpu`): ``time.perf_counter`` around each call, median of the reps. Before each
timed call (outside the timed region) an optional :class:`CacheFlusher` writes a buffer of twice
the last-level cache, so the call starts from DRAM like the GPU's does from HBM; without it a
point whose working set fits in the last-level cache is measured warm (the figures then say so:
:func:`fits_in_cache`).

Provenance (:func:`git_state`, :func:`require_clean_tree`): every results file records the git
commit it was produced from and whether the tree had uncommitted changes to tracked files; the
benchmarks refuse to write results from such a dirty tree unless told ``--allow-dirty``, and then
say "dirty" beside the commit.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
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
    """Per-rep times of one measured callable, in seconds. ``flushed``: which cache was evicted
    before every rep ("L2" on GPU, "LLC" on CPU), or None when nothing was."""

    times: list = field(default_factory=list)
    warmup: int = 0
    flushed: Optional[str] = None

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
                "reps": len(self.times), "warmup": self.warmup, "cache_flushed": self.flushed,
                "l2_flushed": self.flushed == "L2"}


class L2Flusher:
    """Evicts the L2 cache by writing a buffer of at least twice its size."""

    kind = "L2"

    def __init__(self, device):
        device = torch.device(device)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        self.cache_bytes = l2
        self.bytes = max(2 * l2, 128 << 20)
        self.buf = torch.empty(self.bytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.fill_(0)


def last_level_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> Optional[int]:
    """Size of the host CPU's last-level (highest-level data or unified) cache, or None."""
    best: tuple[int, int] = (-1, 0)
    try:
        for d in sorted(sysfs.glob("index*")):
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level = int((d / "level").read_text())
            size = _parse_size((d / "size").read_text())
            if size and level > best[0]:
                best = (level, size)
    except (OSError, ValueError):
        best = (-1, 0)
    if best[1]:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if v and v > 0:
            return int(v)
    return None


def _parse_size(text: str) -> int:
    """'266240K' / '2048K' / '32M' / '1024' (sysfs cache sizes) -> bytes."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


class CacheFlusher:
    """Evicts the host CPU's caches by writing a buffer of twice the last-level cache (at least
    64 MiB; 256 MiB assumed when the size cannot be read)."""

    kind = "LLC"

    def __init__(self, cache_bytes: Optional[int] = None, factor: int = 2):
        self.cache_bytes = cache_bytes if cache_bytes is not None else last_level_cache_bytes()
        assumed = self.cache_bytes or (256 << 20)
        self.bytes = max(factor * assumed, 64 << 20)
        self.buf = torch.empty(self.bytes // 4, dtype=torch.int32)
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.buf.fill_(self.calls & 0xFF)  # a new value each time: every line is written


def fits_in_cache(nbytes: Optional[int], cache_bytes: Optional[int]) -> Optional[bool]:
    """Whether a working set of ``nbytes`` fits in a cache of ``cache_bytes`` (None: unknown)."""
    if nbytes is None or not cache_bytes:
        return None
    return nbytes <= cache_bytes


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
                  getattr(flusher, "kind", "L2") if flusher is not None else None)


def time_cpu(fn: Callable[[], object], *, pre: Optional[Callable[[], object]] = None,
             flusher: Optional[Callable[[], object]] = None, warmup: int = 1, min_reps: int = 3,
             max_reps: int = 20, target_s: float = 0.2) -> Timing:
    """Median-of-reps wall time of ``fn`` on the host. ``flusher`` (e.g. a
    :class:`CacheFlusher`) runs before every timed call, after ``pre``, outside the timing."""
    for _ in range(warmup):
        if pre is not None:
            pre()
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < target_s):
        if pre is not None:
            pre()
        if flusher is not None:
            flusher()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        times.append(dt)
        spent += dt
    return Timing(times, warmup, getattr(flusher, "kind", "LLC") if flusher is not None else None)


def time_fn(fn, device, **kw) -> Timing:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` otherwise."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, **kw)
    keep = ("pre", "flusher", "warmup", "min_reps", "max_reps", "target_s")
    return time_cpu(fn, **{k: v for k, v in kw.items() if k in keep})


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


class DirtyTreeError(RuntimeError):
    """Results were about to be written from a tree that does not match a commit."""


def package_dir(name: str) -> Optional[Path]:
    """Folder the package ``name`` is imported from (without importing it), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent


def git_state(repo: Path = REPO, package: Optional[str] = "specrt") -> dict:
    """Commit of ``repo`` and whether the code results come from matches it.

    ``dirty`` is True when a tracked file has staged or unstaged changes (``git describe
    --dirty``'s rule; the changed paths are listed in ``dirty_files``), or when ``package`` is
    imported from outside ``repo`` (another checkout or an installed copy: then the commit does
    not describe the code that ran); None when no commit can be read (not a git checkout, git
    missing). Untracked files do not make a tree dirty; their count is kept (``untracked``).
    """
    def run(*args) -> Optional[str]:
        try:
            p = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    pkg = package_dir(package) if package else None
    outside = pkg is not None and not pkg.is_relative_to(Path(repo).resolve())
    commit = (run("rev-parse", "HEAD") or "").strip() or None
    if commit is None:
        return {"commit": None, "dirty": None, "dirty_files": [], "untracked": None,
                "package_dir": str(pkg) if pkg else None, "package_outside_repo": outside}
    status = run("status", "--porcelain=v1", "--untracked-files=all") or ""
    lines = [ln for ln in status.splitlines() if ln.strip()]
    changed = [ln[3:] for ln in lines if not ln.startswith("??")]
    return {"commit": commit, "dirty": bool(changed) or outside, "dirty_files": changed[:50],
            "untracked": sum(ln.startswith("??") for ln in lines),
            "package_dir": str(pkg) if pkg else None, "package_outside_repo": outside}


def git_label(state: dict) -> str:
    """Short form for titles and tables: ``<commit[:10]>``, ``<commit[:10]>-dirty``, or
    ``unknown``."""
    if not state.get("commit"):
        return "unknown"
    return state["commit"][:10] + ("-dirty" if state.get("dirty") else "")


def require_clean_tree(allow_dirty: bool = False, repo: Path = REPO,
                       package: Optional[str] = "specrt") -> dict:
    """The :func:`git_state` results will be written under; raises :class:`DirtyTreeError` when
    the tree is dirty (or ``package`` comes from elsewhere), or its commit cannot be read,
    unless ``allow_dirty`` (then the state is returned as is and the results say "dirty").
    Call it before measuring anything."""
    state = git_state(repo, package)
    if allow_dirty:
        return state
    if state["commit"] is None:
        raise DirtyTreeError(f"{repo}: no git commit could be read, so results could not be traced "
                             "to the code that produced them; pass --allow-dirty to write them anyway")
    if state["package_outside_repo"]:
        raise DirtyTreeError(f"{package} is imported from {state['package_dir']}, not from {repo}: its "
                             "commit would not describe the code that ran; pass --allow-dirty to "
                             "write results anyway")
    if state["dirty"]:
        files = ", ".join(state["dirty_files"][:8]) + (" ..." if len(state["dirty_files"]) > 8 else "")
        raise DirtyTreeError(f"{repo}: uncommitted changes to tracked files ({files}); commit them "
                             "first, or pass --allow-dirty (the results will then say 'dirty')")
    return state


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, git: Optional[dict] = None) -> dict:
    """Device name, date, versions, git commit (``git``: a :func:`git_state` already taken, e.g.
    by :func:`require_clean_tree`) and the exact command line of this run."""
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
            "git": git if git is not None else git_state(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])}
