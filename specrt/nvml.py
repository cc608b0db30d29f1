"""NVML instrumentation: the device's nominal limits and the DRAM bandwidth a region achieved.

``pynvml`` (package ``nvidia-ml-py``) is imported on first use, never at ``import specrt``.
Everything here degrades to a clear "not available" on machines without NVML or a GPU:
:func:`device_info` returns None and :class:`BandwidthMonitor` becomes a no-op that says why.

Measurement methods, best first:

``gpm``
    GPU Performance Monitoring (Hopper and newer): two counter samples taken right after a
    device synchronize at the region's entry and exit; ``nvmlGpmMetricsGet`` turns the counter
    difference into DRAM bandwidth utilization (% of the theoretical maximum), SM utilization
    and SM occupancy over exactly that interval. NVML refreshes the counters about every
    100 ms, so a region shorter than that gets a value flagged ``short_region`` (repeat the
    work inside the region to measure a short kernel). A sampler thread cuts regions longer
    than ``long_region_s`` into ~``interval_s`` intervals; the headline value is the
    time-weighted mean of the intervals (which tile the region exactly) and the intervals are
    kept as ``series``.
``utilization``
    ``nvmlDeviceGetUtilizationRates`` where GPM is unsupported: the % of time device memory
    was being read or written over NVML's last sample period (a busy-time fraction, not a
    bandwidth fraction: an upper bound on DRAM bandwidth utilization). Polled by the sampler
    thread and averaged; a short region gets a single reading at exit.
``none``
    Nothing could be measured (``reason`` says why).

``achieved_gbps`` is reported when the caller states the bytes the region moved
(``BandwidthMonitor(bytes=...)`` or ``monitor.bytes = ...`` inside the region).
"""
from __future__ import annotations

import atexit
import contextlib
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

__all__ = ["DeviceInfo", "device_info", "peak_bandwidth_bytes", "BandwidthMonitor",
           "gpm_vs_copy_check", "nvml_status"]

# NVML GPM metric ids (nvml.h, nvmlGpmMetricId_t); pynvml exposes the same names.
GPM_DRAM_BW_UTIL = 10
GPM_SM_UTIL = 2
GPM_SM_OCCUPANCY = 3
_GPM_METRICS = (("dram_bw_util_pct", GPM_DRAM_BW_UTIL), ("sm_util_pct", GPM_SM_UTIL),
                ("sm_occupancy_pct", GPM_SM_OCCUPANCY))

_lock = threading.Lock()
_state: Optional[tuple[Any, Optional[str]]] = None  # (pynvml module or None, reason)


def _nvml():
    """``(pynvml, None)`` once NVML is initialised, else ``(None, reason)``; cached."""
    global _state
    with _lock:
        if _state is None:
            try:
                import pynvml  # noqa: PLC0415  (lazy on purpose)
            except ImportError as e:
                _state = (None, f"pynvml is not installed ({e}); pip install nvidia-ml-py")
            else:
                try:
                    pynvml.nvmlInit()
                    if pynvml.nvmlDeviceGetCount() < 1:
                        raise RuntimeError("NVML sees no GPU")
                    atexit.register(_shutdown, pynvml)
                    _state = (pynvml, None)
                except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                    _state = (None, f"NVML unavailable: {type(e).__name__}: {e}")
        return _state


def _shutdown(pynvml) -> None:
    with contextlib.suppress(Exception):
        pynvml.nvmlShutdown()


def _reset() -> None:
    """Forget the cached NVML state (tests swap in a fake ``pynvml``)."""
    global _state
    with _lock:
        _state = None


def nvml_status() -> tuple[bool, Optional[str]]:
    """``(available, reason)``: whether NVML and a GPU can be used here."""
    mod, reason = _nvml()
    return mod is not None, reason


def peak_bandwidth_bytes(bus_width_bits: int, max_mem_clock_mhz: float) -> float:
    """Nominal DRAM bandwidth in bytes/s: bus width / 8 x max memory clock x 2 (DDR).

    H100 SXM: 5120-bit HBM3 at 2619 MHz -> 3.35e12 B/s.
    """
    return bus_width_bits / 8 * max_mem_clock_mhz * 1e6 * 2


def _cuda_index(device) -> int:
    if device is None:
        try:
            import torch

            return torch.cuda.current_device() if torch.cuda.is_available() else 0
        except Exception:
            return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        import torch

        device = torch.device(device)
    return int(getattr(device, "index", None) or 0)


def _handle(pynvml, index: int):
    """NVML handle of CUDA device ``index``: matched by PCI bus id when torch sees the device
    (CUDA and NVML orders differ under CUDA_VISIBLE_DEVICES), else by NVML index."""
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            p = torch.cuda.get_device_properties(index)
            bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:
        pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _sm_count(pynvml, handle, index: int) -> Optional[int]:
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            return int(torch.cuda.get_device_properties(index).multi_processor_count)
    except Exception:
        pass
    with contextlib.suppress(Exception):
        return int(pynvml.nvmlDeviceGetAttributes(handle).multiprocessorCount)
    return None


def _gpm_supported(pynvml, handle) -> bool:
    try:
        return bool(pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)
    except Exception:  # old driver (function not found), no permission, ...
        return False


@dataclass(slots=True)
class DeviceInfo:
    """What NVML says about one GPU (clocks in MHz, sizes in bytes)."""

    index: int
    name: str
    bus_width_bits: int
    max_mem_clock_mhz: int
    peak_bandwidth: float  # bytes/s, bus width / 8 x max memory clock x 2
    sm_count: Optional[int]
    sm_clock_mhz: Optional[int]
    mem_clock_mhz: Optional[int]
    max_sm_clock_mhz: Optional[int]
    memory_used: Optional[int]
    memory_total: Optional[int]
    gpm_supported: bool

    @property
    def peak_gbps(self) -> float:
        return self.peak_bandwidth / 1e9

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_gbps"] = self.peak_gbps
        return d


def device_info(index: int = 0) -> Optional[DeviceInfo]:
    """Name, nominal peak DRAM bandwidth, SM count, clocks and memory use of CUDA device
    ``index``; None (not an exception) when NVML or the GPU is absent."""
    pynvml, _ = _nvml()
    if pynvml is None:
        return None
    try:
        h = _handle(pynvml, index)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        bus = int(pynvml.nvmlDeviceGetMemoryBusWidth(h))
        mclk_max = int(pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM))
    except Exception:
        return None

    def opt(fn, *args):
        try:
            return int(fn(*args))
        except Exception:
            return None

    used = total = None
    with contextlib.suppress(Exception):
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        used, total = int(mem.used), int(mem.total)
    return DeviceInfo(
        index=index, name=name, bus_width_bits=bus, max_mem_clock_mhz=mclk_max,
        peak_bandwidth=peak_bandwidth_bytes(bus, mclk_max),
        sm_count=_sm_count(pynvml, h, index),
        sm_clock_mhz=opt(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
        mem_clock_mhz=opt(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
        max_sm_clock_mhz=opt(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
        memory_used=used, memory_total=total, gpm_supported=_gpm_supported(pynvml, h))


def _time_weighted_mean(intervals: list[dict], key: str) -> Optional[float]:
    """Mean of ``key`` over intervals weighted by their duration ``dt`` (None if no value)."""
    num = den = 0.0
    for iv in intervals:
        v = iv.get(key)
        if v is None:
            continue
        num += v * iv["dt"]
        den += iv["dt"]
    return num / den if den > 0 else None


def _sync(device_index: int) -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize(device_index)
    except Exception:
        pass


class BandwidthMonitor(contextlib.ContextDecorator):
    """Measure DRAM bandwidth utilization (and SM utilization/occupancy) of a code region.

    Use as ``with BandwidthMonitor(bytes=n) as m: ...; m.result()`` or as a decorator
    (``@BandwidthMonitor()``; the last call's result stays in ``result()``). Entry and exit
    synchronize the device, so the region covers the GPU work launched inside it.

    Parameters
    ----------
    device : int, torch.device or str, optional
        CUDA device (default: the current one).
    bytes : int, optional
        Bytes the region moves (read + written); gives ``achieved_gbps``. May also be set as
        ``monitor.bytes`` inside the region.
    label : str, optional
    interval_s : float
        Sampler period (NVML's counters refresh about every 100 ms).
    long_region_s : float
        Regions longer than this are reported as the mean over sampler intervals.
    use_gpm : bool
        False forces the ``utilization`` fallback.
    """

    def __init__(self, device=None, *, bytes: Optional[int] = None, label: Optional[str] = None,
                 interval_s: float = 0.1, long_region_s: float = 1.0, use_gpm: bool = True):
        self.bytes = bytes
        self.label = label
        self.interval_s = float(interval_s)
        self.long_region_s = float(long_region_s)
        self._index = _cuda_index(device)
        self._pynvml, self.reason = _nvml()
        self._h = None
        self._peak: Optional[float] = None
        self.method = "none"
        if self._pynvml is not None:
            try:
                self._h = _handle(self._pynvml, self._index)
                info = device_info(self._index)
                self._peak = info.peak_bandwidth if info else None
                self._name = info.name if info else None
                if use_gpm and _gpm_supported(self._pynvml, self._h):
                    self.method = "gpm"
                else:
                    self._pynvml.nvmlDeviceGetUtilizationRates(self._h)
                    self.method = "utilization"
            except Exception as e:
                self.reason = f"NVML device {self._index} unusable: {type(e).__name__}: {e}"
                self._pynvml = None
        self.available = self._pynvml is not None
        self._result: dict = self._empty_result()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # -- public -------------------------------------------------------------------------------

    def result(self) -> dict:
        """What the last region measured (keys are always present; unmeasured values None)."""
        r = dict(self._result)
        r["bytes"] = self.bytes
        el = r.get("elapsed_s")
        r["achieved_gbps"] = (self.bytes / el / 1e9) if (self.bytes and el) else None
        r["achieved_pct_of_peak"] = (100.0 * self.bytes / el / self._peak
                                     if (self.bytes and el and self._peak) else None)
        util = r.get("dram_bw_util_pct")
        r["dram_gbps_from_util"] = (util / 100.0 * self._peak / 1e9
                                    if (util is not None and self._peak and r["method"] == "gpm")
                                    else None)
        return r

    def __enter__(self):
        self._result = self._empty_result()
        self._intervals: list[dict] = []
        self._readings: list[dict] = []
        self._fallback_note = self._sampler_error = None
        if not self.available:
            return self
        _sync(self._index)
        self._t0 = time.perf_counter()
        try:
            self._start_sample = self._gpm_sample() if self.method == "gpm" else None
        except Exception as e:  # GPM may still refuse at sample time (permissions, MIG, ...)
            self.method, self._start_sample = "utilization", None
            self._fallback_note = f"GPM sample failed ({type(e).__name__}: {e}); used utilization"
        self._stop.clear()
        self._thread = threading.Thread(target=self._sampler, name="specrt-bw-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self.available:
            return False
        _sync(self._index)
        t1 = time.perf_counter()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elapsed = t1 - self._t0
        r = self._result
        r.update(elapsed_s=elapsed, short_region=elapsed < 0.1)
        try:
            if self.method == "gpm":
                self._finish_gpm(t1, elapsed)
            else:
                self._finish_utilization(elapsed)
        except Exception as e:
            r.update(method="none", reason=f"NVML read failed: {type(e).__name__}: {e}")
        if self._fallback_note:
            r["note"] = self._fallback_note
        return False

    # -- internals ----------------------------------------------------------------------------

    def _empty_result(self) -> dict:
        return {"available": self.available if hasattr(self, "available") else False,
                "reason": self.reason, "method": "none" if self._pynvml is None else self.method,
                "label": self.label, "device": getattr(self, "_name", None),
                "elapsed_s": None, "short_region": None, "samples": 0,
                "dram_bw_util_pct": None, "sm_util_pct": None, "sm_occupancy_pct": None,
                "mem_busy_pct": None, "gpu_busy_pct": None,
                "peak_gbps": self._peak / 1e9 if self._peak else None, "series": []}

    def _gpm_sample(self):
        s = self._pynvml.nvmlGpmSampleAlloc()
        self._pynvml.nvmlGpmSampleGet(self._h, s)
        return s

    def _gpm_metrics(self, s1, s2) -> dict:
        p = self._pynvml
        mg = p.c_nvmlGpmMetricsGet_t()
        mg.version = p.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(_GPM_METRICS)
        mg.sample1, mg.sample2 = s1, s2
        for i, (_, mid) in enumerate(_GPM_METRICS):
            mg.metrics[i].metricId = mid
        p.nvmlGpmMetricsGet(mg)
        out = {}
        for i, (key, _) in enumerate(_GPM_METRICS):
            m = mg.metrics[i]
            out[key] = float(m.value) if int(m.nvmlReturn) == 0 else None
        return out

    def _free(self, s) -> None:
        with contextlib.suppress(Exception):
            self._pynvml.nvmlGpmSampleFree(s)

    def _sampler(self) -> None:
        """Ticks every ``interval_s`` until exit. GPM: closes an interval per tick, keeping the
        last two samples so exit can fold a too-short final piece into the previous interval.
        Utilization: one reading per tick."""
        prev = (self._t0, self._start_sample)
        before_prev = None  # (t, sample, index of the interval that ended at prev)
        try:
            while not self._stop.wait(self.interval_s):
                t = time.perf_counter()
                if self.method == "gpm":
                    s = self._gpm_sample()
                    vals = self._gpm_metrics(prev[1], s)
                    self._intervals.append({"t0": prev[0] - self._t0, "dt": t - prev[0], **vals})
                    if before_prev is not None:
                        self._free(before_prev[1])
                    before_prev, prev = prev, (t, s)
                else:
                    u = self._pynvml.nvmlDeviceGetUtilizationRates(self._h)
                    self._readings.append({"t": t - self._t0, "mem_busy_pct": float(u.memory),
                                           "gpu_busy_pct": float(u.gpu)})
        except Exception as e:
            self._sampler_error = f"{type(e).__name__}: {e}"
        self._last, self._before_last = prev, before_prev

    def _finish_gpm(self, t1: float, elapsed: float) -> None:
        end = self._gpm_sample()
        prev, before = self._last, self._before_last
        ivs = self._intervals
        try:
            if before is not None and t1 - prev[0] < self.interval_s:
                # The closing piece is shorter than NVML's refresh: merge it into the previous
                # interval so every interval stays long enough to be meaningful.
                ivs.pop()
                vals = self._gpm_metrics(before[1], end)
                ivs.append({"t0": before[0] - self._t0, "dt": t1 - before[0], **vals})
            else:
                vals = self._gpm_metrics(prev[1], end)
                ivs.append({"t0": prev[0] - self._t0, "dt": t1 - prev[0], **vals})
        finally:
            for s in {id(x[1]): x[1] for x in (prev, before) if x is not None}.values():
                self._free(s)
            self._free(end)
        r = self._result
        r["samples"] = len(ivs)
        # One interval (a short region) is GPM over exactly [entry, exit]; several tile it.
        for key, _ in _GPM_METRICS:
            r[key] = _time_weighted_mean(ivs, key)
        if elapsed > self.long_region_s and len(ivs) > 1:
            r["series"] = ivs
        r["method"] = "gpm"
        if self._sampler_error:
            r["note"] = f"sampler stopped early: {self._sampler_error}"

    def _finish_utilization(self, elapsed: float) -> None:
        r = self._result
        reads = self._readings
        if not reads or elapsed <= self.long_region_s:
            # One reading at exit covers NVML's last sample period (1/6 s to 1 s), i.e. the
            # tail of the region: the best a short region can get from this API.
            u = self._pynvml.nvmlDeviceGetUtilizationRates(self._h)
            reads = reads + [{"t": elapsed, "mem_busy_pct": float(u.memory),
                              "gpu_busy_pct": float(u.gpu)}]
        if elapsed > self.long_region_s and len(reads) > 1:
            r["series"] = reads
        r["mem_busy_pct"] = sum(x["mem_busy_pct"] for x in reads) / len(reads)
        r["gpu_busy_pct"] = sum(x["gpu_busy_pct"] for x in reads) / len(reads)
        r["dram_bw_util_pct"] = r["mem_busy_pct"]  # upper bound: busy time, not bandwidth
        r["samples"] = len(reads)
        r["method"] = "utilization"


def gpm_vs_copy_check(size_bytes: int = 1 << 31, *, device=None, min_seconds: float = 1.5) -> dict:
    """Check GPM's DRAM utilization against bytes/time on a device-to-device copy.

    Copies a ``size_bytes`` buffer into another (``2 * size_bytes`` moved per copy) back to
    back for at least ``min_seconds`` inside a :class:`BandwidthMonitor`, timed with CUDA
    events. Returns the copy's bytes/time fraction of the nominal peak, GPM's DRAM
    utilization fraction over the same region, and their difference.
    """
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "reason": "no CUDA device"}
    idx = _cuda_index(device)
    dev = torch.device("cuda", idx)
    info = device_info(idx)
    n = size_bytes // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up (clocks, allocator)
        dst.copy_(src)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize(dev)
    reps = max(10, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
    moved = 2 * n * 4 * reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with BandwidthMonitor(idx, bytes=moved, label="gpm_vs_copy_check") as mon:
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
    seconds = start.elapsed_time(end) / 1e3
    res = mon.result()
    bw = moved / seconds
    frac = bw / info.peak_bandwidth if info else None
    gpm = res["dram_bw_util_pct"] / 100.0 if (res["method"] == "gpm" and res["dram_bw_util_pct"] is not None) else None
    return {"available": True, "device": info.name if info else torch.cuda.get_device_name(dev),
            "size_bytes": size_bytes, "reps": reps, "seconds": seconds,
            "copy_bytes_per_s": bw, "peak_bytes_per_s": info.peak_bandwidth if info else None,
            "copy_fraction_of_peak": frac, "gpm_dram_util_fraction": gpm,
            "difference": (gpm - frac) if (gpm is not None and frac is not None) else None,
            "method": res["method"], "monitor": res}
