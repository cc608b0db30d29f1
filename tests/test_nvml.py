"""specrt.nvml: no-op behaviour without NVML, and the GPM / utilization arithmetic against a
fake ``pynvml`` whose counters we control."""
from __future__ import annotations

import sys
import time
import types

import pytest
import torch

from specrt import nvml


@pytest.fixture(autouse=True)
def _fresh_nvml_state():
    nvml._reset()
    yield
    nvml._reset()


# --------------------------------------------------------------------------------------------
# a fake pynvml
# --------------------------------------------------------------------------------------------


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


class _Sample:
    def __init__(self, serial: int):
        self.serial = serial
        self.filled = False


class _MetricsGet:
    def __init__(self):
        self.version = 0
        self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [types.SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)]


def _fake_pynvml(*, gpm=True, gpm_sample_raises=False, dram_of_serial=lambda s: 10.0 * s,
                 mem_util=42, gpu_util=77):
    """A module with the pynvml calls specrt.nvml makes. GPM's DRAM utilization between two
    samples is ``dram_of_serial(sample2.serial)`` (samples are numbered in the order they are
    read), SM utilization is 50, SM occupancy is 'not supported'."""
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 1, 2
    m.NVML_GPM_METRICS_GET_VERSION = 1
    m.NVMLError, m.NVMLError_NotSupported = _NVMLError, _NotSupported
    m.c_nvmlGpmMetricsGet_t = _MetricsGet
    m.stats = {"alloc": 0, "free": 0, "read": 0, "metrics_calls": []}
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    m.nvmlDeviceGetHandleByPciBusId = lambda bus: ("gpu", 0)
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetMemoryBusWidth = lambda h: 5120
    m.nvmlDeviceGetMaxClockInfo = lambda h, t: {1: 1980, 2: 2619}[t]
    m.nvmlDeviceGetClockInfo = lambda h, t: {1: 1755, 2: 2619}[t]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=1 << 30, total=80 << 30)
    m.nvmlDeviceGetAttributes = lambda h: types.SimpleNamespace(multiprocessorCount=132)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=gpu_util, memory=mem_util)

    def query_support(h):
        if not gpm:
            raise _NotSupported("Not Supported")
        return types.SimpleNamespace(isSupportedDevice=1)

    def sample_alloc():
        m.stats["alloc"] += 1
        return _Sample(-1)

    def sample_get(h, s):
        if gpm_sample_raises:
            raise _NotSupported("Not Supported")
        s.serial = m.stats["read"]
        m.stats["read"] += 1
        s.filled = True
        return s

    def sample_free(s):
        m.stats["free"] += 1

    def metrics_get(mg):
        assert mg.version == 1 and mg.sample1.filled and mg.sample2.filled
        assert mg.sample2.serial > mg.sample1.serial
        m.stats["metrics_calls"].append((mg.sample1.serial, mg.sample2.serial))
        for i in range(mg.numMetrics):
            met = mg.metrics[i]
            if met.metricId == nvml.GPM_DRAM_BW_UTIL:
                met.value, met.nvmlReturn = dram_of_serial(mg.sample2.serial), 0
            elif met.metricId == nvml.GPM_SM_UTIL:
                met.value, met.nvmlReturn = 50.0, 0
            else:
                met.value, met.nvmlReturn = 0.0, 3  # NVML_ERROR_NOT_SUPPORTED
        return mg

    m.nvmlGpmQueryDeviceSupport = query_support
    m.nvmlGpmSampleAlloc = sample_alloc
    m.nvmlGpmSampleGet = sample_get
    m.nvmlGpmSampleFree = sample_free
    m.nvmlGpmMetricsGet = metrics_get
    return m


def _install(monkeypatch, fake):
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    nvml._reset()
    return fake


RESULT_KEYS = {"available", "reason", "method", "label", "device", "elapsed_s", "short_region",
               "samples", "dram_bw_util_pct", "sm_util_pct", "sm_occupancy_pct", "mem_busy_pct",
               "gpu_busy_pct", "peak_gbps", "series", "bytes", "achieved_gbps",
               "achieved_pct_of_peak", "dram_gbps_from_util"}


# --------------------------------------------------------------------------------------------
# no NVML / no GPU (this machine)
# --------------------------------------------------------------------------------------------


def test_import_specrt_works_without_pynvml():
    import subprocess

    # torch itself may import pynvml; what matters is that specrt never needs it at import.
    code = ("import sys; sys.modules['pynvml'] = None; import specrt, specrt.nvml; "
            "assert specrt.nvml.device_info() is None; assert not specrt.nvml.nvml_status()[0]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_no_gpu_device_info_is_none_and_monitor_is_noop():
    assert nvml.device_info() is None
    ok, reason = nvml.nvml_status()
    assert not ok and reason
    mon = nvml.BandwidthMonitor(bytes=1000, label="x")
    assert mon.available is False and mon.reason
    with mon as m:
        assert m is mon
        x = sum(range(100))
    r = mon.result()
    assert set(r) >= RESULT_KEYS
    assert r["method"] == "none" and r["available"] is False and r["reason"] == mon.reason
    assert r["achieved_gbps"] is None and r["dram_bw_util_pct"] is None and r["bytes"] == 1000
    assert x == 4950


def test_missing_pynvml_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    nvml._reset()
    assert nvml.device_info() is None
    mon = nvml.BandwidthMonitor()
    assert not mon.available and "nvidia-ml-py" in mon.reason


def test_noop_monitor_as_decorator(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    nvml._reset()
    mon = nvml.BandwidthMonitor(label="deco")

    @mon
    def work(a, b):
        return a * b

    assert work(6, 7) == 42
    r = mon.result()
    assert r["method"] == "none" and r["label"] == "deco" and set(r) >= RESULT_KEYS


# --------------------------------------------------------------------------------------------
# fake NVML: arithmetic of each path
# --------------------------------------------------------------------------------------------


def test_peak_bandwidth_formula():
    assert nvml.peak_bandwidth_bytes(5120, 2619) == pytest.approx(3.35232e12)
    assert nvml.peak_bandwidth_bytes(64, 1000) == 64 / 8 * 1000e6 * 2


def test_device_info_from_fake(monkeypatch):
    _install(monkeypatch, _fake_pynvml())
    info = nvml.device_info(0)
    assert info is not None
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert info.peak_bandwidth == pytest.approx(5120 / 8 * 2619e6 * 2)
    assert info.peak_gbps == pytest.approx(3352.32)
    if not torch.cuda.is_available():
        assert info.sm_count == 132  # from NVML when torch sees no GPU
    assert (info.sm_clock_mhz, info.mem_clock_mhz, info.max_sm_clock_mhz) == (1755, 2619, 1980)
    assert info.memory_total == 80 << 30 and info.gpm_supported
    assert info.as_dict()["peak_gbps"] == pytest.approx(3352.32)


def test_gpm_short_region_is_one_pair(monkeypatch):
    fake = _install(monkeypatch, _fake_pynvml())
    mon = nvml.BandwidthMonitor(bytes=2_000_000_000, interval_s=10.0)
    with mon:
        time.sleep(0.01)
    r = mon.result()
    assert r["method"] == "gpm" and r["available"]
    assert fake.stats["metrics_calls"] == [(0, 1)]  # entry sample vs exit sample
    assert r["samples"] == 1 and r["short_region"] is True
    assert r["dram_bw_util_pct"] == 10.0 and r["sm_util_pct"] == 50.0
    assert r["sm_occupancy_pct"] is None  # per-metric NOT_SUPPORTED
    assert r["achieved_gbps"] == pytest.approx(2.0 / r["elapsed_s"])
    peak = 5120 / 8 * 2619e6 * 2
    assert r["achieved_pct_of_peak"] == pytest.approx(100 * 2e9 / r["elapsed_s"] / peak)
    assert r["dram_gbps_from_util"] == pytest.approx(0.10 * peak / 1e9)
    assert fake.stats["alloc"] == fake.stats["free"] == 2


def test_gpm_long_region_is_time_weighted_mean(monkeypatch):
    fake = _install(monkeypatch, _fake_pynvml(dram_of_serial=lambda s: [0, 20, 60, 30, 90, 10][s % 6]))
    mon = nvml.BandwidthMonitor(interval_s=0.03, long_region_s=0.1)
    with mon:
        time.sleep(0.2)
    r = mon.result()
    ivs = r["series"]
    assert r["method"] == "gpm" and len(ivs) >= 2 and r["samples"] == len(ivs)
    # The intervals tile the region: contiguous, starting at entry, ending at exit.
    assert ivs[0]["t0"] == 0.0
    for a, b in zip(ivs, ivs[1:]):
        assert b["t0"] == pytest.approx(a["t0"] + a["dt"])
    assert ivs[-1]["t0"] + ivs[-1]["dt"] == pytest.approx(r["elapsed_s"], abs=1e-6)
    want = sum(iv["dram_bw_util_pct"] * iv["dt"] for iv in ivs) / sum(iv["dt"] for iv in ivs)
    assert r["dram_bw_util_pct"] == pytest.approx(want)
    assert len({iv["dram_bw_util_pct"] for iv in ivs}) > 1  # the mean really mixes values
    assert r["sm_util_pct"] == pytest.approx(50.0)
    assert fake.stats["alloc"] == fake.stats["free"]


def test_time_weighted_mean():
    ivs = [{"dt": 0.1, "x": 10.0}, {"dt": 0.3, "x": 50.0}, {"dt": 0.2, "x": None}]
    assert nvml._time_weighted_mean(ivs, "x") == pytest.approx((1.0 + 15.0) / 0.4)
    assert nvml._time_weighted_mean([{"dt": 0.1, "x": None}], "x") is None


def test_utilization_fallback_when_gpm_not_supported(monkeypatch):
    _install(monkeypatch, _fake_pynvml(gpm=False, mem_util=42, gpu_util=77))
    info = nvml.device_info()
    assert info is not None and not info.gpm_supported
    mon = nvml.BandwidthMonitor(bytes=10**9)
    with mon:
        pass
    r = mon.result()
    assert r["method"] == "utilization"
    assert r["mem_busy_pct"] == 42.0 and r["gpu_busy_pct"] == 77.0 and r["dram_bw_util_pct"] == 42.0
    assert r["sm_util_pct"] is None and r["dram_gbps_from_util"] is None
    assert r["achieved_gbps"] == pytest.approx(1.0 / r["elapsed_s"])


def test_utilization_long_region_averages_readings(monkeypatch):
    fake = _install(monkeypatch, _fake_pynvml(gpm=False))
    vals = iter([10, 20, 30, 40, 50, 60, 70, 80, 90] + [100] * 100)
    mon = nvml.BandwidthMonitor(interval_s=0.03, long_region_s=0.1)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=0, memory=next(vals))
    with mon:
        time.sleep(0.2)
    r = mon.result()
    seen = [x["mem_busy_pct"] for x in r["series"]]
    assert r["method"] == "utilization" and len(seen) >= 2 and seen[0] == 10.0
    assert r["mem_busy_pct"] == pytest.approx(sum(seen) / len(seen))


def test_gpm_sample_failure_falls_back_to_utilization(monkeypatch):
    _install(monkeypatch, _fake_pynvml(gpm_sample_raises=True))
    mon = nvml.BandwidthMonitor()
    assert mon.method == "gpm"
    with mon:
        pass
    r = mon.result()
    assert r["method"] == "utilization" and "GPM sample failed" in r["note"]


def test_fake_monitor_as_decorator_keeps_last_result(monkeypatch):
    _install(monkeypatch, _fake_pynvml())
    mon = nvml.BandwidthMonitor(interval_s=10.0)

    @mon
    def step(n):
        mon.bytes = n
        return n + 1

    assert step(5) == 6
    assert mon.result()["bytes"] == 5 and mon.result()["method"] == "gpm"
    assert step(7) == 8
    assert mon.result()["bytes"] == 7 and mon.result()["dram_bw_util_pct"] == 30.0  # samples 2, 3


# --------------------------------------------------------------------------------------------
# GPU (runs on the H100 machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpm_agrees_with_bytes_over_time_on_a_copy():
    info = nvml.device_info()
    assert info is not None and info.peak_bandwidth > 1e11 and info.sm_count
    r = nvml.gpm_vs_copy_check(1 << 30)
    assert r["available"]
    # A large D2D copy reaches a large share of the nominal peak on any recent GPU.
    assert 0.4 < r["copy_fraction_of_peak"] < 1.05, r
    if r["method"] == "gpm":
        assert r["gpm_dram_util_fraction"] is not None
        assert abs(r["difference"]) < 0.15, r
