"""bench/roofline.py: the bytes/FLOPs formulas on hand-computed cases, the sweeps, and one
real CPU run end to end (JSON / CSV / PNG with the promised fields)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import roofline  # noqa: E402


# --------------------------------------------------------------------------------------------
# formulas
# --------------------------------------------------------------------------------------------


def test_attention_bytes_by_hand():
    # Llama-3-8B layer, batch 1, 512 context + 4 new tokens, bf16:
    # K/V 516 positions x 8 heads x 128 x 2 (K, V) x 2 B = 2,113,536; q + out 2 x 4 x 32 x 128 x 2 B = 65,536.
    assert roofline.attention_bytes(1, 512, 4, 32, 8, 128, 2) == 2_113_536 + 65_536
    # batch scales both terms; SmolLM2 geometry, fp32
    assert roofline.attention_bytes(3, 100, 2, 9, 3, 64, 4) == 3 * 102 * 3 * 64 * 2 * 4 + 2 * 3 * 2 * 9 * 64 * 4


def test_attention_flops_by_hand():
    parents = roofline.binary_tree_parents(4)
    assert parents == [-1, 0, 0, 1]
    assert roofline.tree_depths(parents) == [0, 1, 1, 2]
    # context 10: node i sees 10 + depth + 1 keys -> 11 + 12 + 12 + 13
    assert roofline.attention_visible_pairs(10, parents) == 48
    # chain of 3 after 5 context: 6 + 7 + 8
    assert roofline.attention_visible_pairs(5, [-1, 0, 1]) == 21
    # 4 FLOP per (query head, pair, dim): 4 x 128 x 32 heads x batch 2 x 48 pairs
    assert roofline.attention_flops(2, 48, 32, 128) == 1_572_864
    assert roofline.attention_visible_pairs(7, [-1]) == 8  # plain decode: context + itself


def test_rejection_bytes_and_flops_by_hand():
    assert roofline.rejection_bytes(5, 32000, 4, True) == 5 * 32000 * 4 * 2
    assert roofline.rejection_bytes(5, 32000, 2, False) == 320_000
    assert roofline.rejection_bytes(5, 32000, 2, True) == 320_000 + 640_000
    assert roofline.rejection_flops(5, 32000) == 640_000


def test_rollback_paths_and_bytes_by_hand():
    assert roofline.rollback_path(4, 8) == [0, 5, 6, 7]
    assert roofline.rollback_moved([0, 5, 6, 7]) == 3
    assert roofline.rollback_path(8, 8) == list(range(8))  # path as long as the tree: in place
    assert roofline.rollback_moved(roofline.rollback_path(8, 8)) == 0
    assert roofline.rollback_moved(roofline.rollback_path(4, None)) == 0  # chain: no-op
    assert roofline.rollback_moved([0, 1, 3, 6]) == 2
    assert roofline.rollback_path(1, 64) == [0]
    # 3 rows x 32 layers x (K, V) x 8 heads x 128 x 2 B x (read + write)
    assert roofline.rollback_bytes(3, 32, 8, 128, 2) == 786_432


def test_append_bytes_by_hand():
    # 16 tokens x 8 heads x 128 x 2 B = 32 KiB per K or V; K + V, read + written.
    assert roofline.append_bytes(16, 8, 128, 2) == 4 * 32768


def test_full_gpu_sweeps_cover_the_issue_grids():
    att = roofline.sweep("tree_attention", "cuda", quick=False)
    assert len(att) == 2 * 4 * 4 * 4
    assert {p["batch"] for p in att} == {1, 4, 16, 64}
    assert {p["context"] for p in att} == {512, 2048, 8192, 32768}
    assert {p["new"] for p in att} == {1, 4, 16, 64}
    assert {p["geometry"] for p in att} == {"llama3-8b", "smollm2-135m"}
    rej = roofline.sweep("rejection", "cuda", quick=False)
    assert len(rej) == 5 * 5 * 3 * 2
    assert {p["batch"] for p in rej} == {1, 8, 32, 128, 256}
    assert {(p["draft"], p["size"]) for p in rej} == {("chain", 1), ("chain", 4), ("chain", 8),
                                                      ("tree", 16), ("tree", 64)}
    assert {p["vocab"] for p in rej} == {32000, 128256, 151936}
    assert {p["logits"] for p in rej} == {"float32", "bfloat16"}
    rb = roofline.sweep("kv_rollback", "cuda", quick=False)
    assert len(rb) == 2 * 4 * 3 * 3
    assert {p["tree"] for p in rb} == {None, 8, 64} and {p["path"] for p in rb} == {1, 4, 8}
    assert {p["batch"] for p in rb} == {1, 16, 64, 256}
    g = roofline.GEOMETRIES
    assert (g["llama3-8b"].layers, g["llama3-8b"].hq, g["llama3-8b"].hkv, g["llama3-8b"].d) == (32, 32, 8, 128)
    assert (g["smollm2-135m"].layers, g["smollm2-135m"].hq, g["smollm2-135m"].hkv, g["smollm2-135m"].d) == (30, 9, 3, 64)
    for k in roofline.KERNELS:
        for dev in ("cuda", "cpu"):
            assert 0 < len(roofline.sweep(k, dev, quick=True)) <= 6


def test_not_implemented_is_skipped_not_fatal(monkeypatch):
    assert roofline._status_of(RuntimeError("append_kv: not implemented yet"))[0] == "skipped"
    assert roofline._status_of(ValueError("bad shape"))[0] == "error"

    def boom(p, device, peers):
        raise NotImplementedError("append_kv CPU kernel: not implemented yet")

    monkeypatch.setitem(roofline.CASES, "append_kv", boom)
    runner = roofline.Runner("cpu", quick=True, use_gpm=False)
    rows: list = []
    ceil = {"copy_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11, "nominal_peak_bytes_per_s": None}
    roofline.run_kernel("append_kv", runner, ceil, set(), rows, lambda r: None)
    assert len(rows) == len(roofline.sweep("append_kv", "cpu", True))
    assert all(r["status"] == "skipped" and "not implemented" in r["reason"] for r in rows)


# --------------------------------------------------------------------------------------------
# end to end on CPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    cmd = [sys.executable, str(BENCH / "roofline.py"), "--device", "cpu", "--quick", "--kernel", "all",
           "--out", str(out), "--threads", "1", "--name", "rl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_cpu_run_writes_json_csv_png(cpu_run):
    out, stdout = cpu_run
    for ext in ("json", "csv", "png"):
        assert (out / f"rl.{ext}").stat().st_size > 100
    assert (out / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "specrt" in stdout and "GB/s" in stdout  # the terminal table


def test_cpu_run_json_fields(cpu_run):
    out, _ = cpu_run
    doc = json.loads((out / "rl.json").read_text())
    meta = doc["meta"]
    for key in ("device", "device_type", "date", "torch", "cuda", "git", "command", "method"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and "roofline.py" in meta["command"] and "--quick" in meta["command"]
    assert "commit" in meta["git"]
    ceil = doc["ceilings"]
    assert ceil["copy_bytes_per_s"] > 0 and ceil["matmul_flops_per_s"] > 0
    assert ceil["nominal_peak_bytes_per_s"] is None  # no NVML on CPU
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == set(roofline.KERNELS)
    spec = [r for r in rows if r["impl"] == "specrt"]
    n_points = sum(len(roofline.sweep(k, "cpu", True)) for k in roofline.KERNELS)
    assert len(spec) == n_points
    for r in spec:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        assert r["time_us"] > 0 and r["reps"] >= 3 and r["bytes"] >= 0
        if r["bytes"]:
            assert r["achieved_gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
            assert r["pct_of_copy"] == pytest.approx(100 * r["bytes"] / r["time_s"] / ceil["copy_bytes_per_s"])
        if r["kernel"] in ("tree_attention", "rejection"):
            assert r["flops"] > 0 and r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
            assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["time_s"] / 1e9)
    # The first point of each kernel that moves bytes is checked against specrt.reference.
    for k in roofline.KERNELS:
        first = next((r for r in spec if r["kernel"] == k and r.get("bytes")), None)
        if first is None:  # an op not implemented yet: every point skipped with the reason
            assert all(r["status"] == "skipped" for r in spec if r["kernel"] == k)
            continue
        assert first["check"]["pass"], first
        assert sum("check" in r for r in spec if r["kernel"] == k) == 1
    # Peers: their own time and GB/s, and the ratio to specrt at the same point.
    peers = [r for r in rows if r["impl"] != "specrt" and r["status"] == "ok"]
    assert {"torch_sdpa", "torch_sdpa_gather", "torch_vectorized", "torch_index"} <= {r["impl"] for r in peers}
    for r in peers:
        s = next(x for x in spec if x["label"] == r["label"] and x["kernel"] == r["kernel"])
        if s["status"] == "ok":
            assert r["specrt_over_peer"] == pytest.approx(r["time_s"] / s["time_s"])
    gpu_only = [r for r in rows if r["impl"] in ("flex_attention", "flashinfer", "flashinfer_chain")]
    assert gpu_only and all(r["status"] == "skipped" and r["reason"] for r in gpu_only)


def test_cpu_run_csv_matches_json(cpu_run):
    out, _ = cpu_run
    doc = json.loads((out / "rl.json").read_text())
    with open(out / "rl.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    for col in ("kernel", "label", "impl", "status", "time_us", "bytes", "flops", "intensity",
                "achieved_gbps", "pct_of_peak", "pct_of_copy", "specrt_over_peer"):
        assert col in rows[0], col


# --------------------------------------------------------------------------------------------
# GPU (runs on the H100 machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_quick_run(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cmd = [sys.executable, str(BENCH / "roofline.py"), "--device", "cuda", "--quick", "--kernel", "all",
           "--out", str(tmp_path), "--name", "rl", "--peers", "torch_sdpa,torch_vectorized,torch_index,chain_noop"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "rl.json").read_text())
    ceil = doc["ceilings"]
    assert ceil["nominal_peak_bytes_per_s"] and 0.3 < ceil["copy_bytes_per_s"] / ceil["nominal_peak_bytes_per_s"] < 1.05
    spec = [r for r in doc["rows"] if r["impl"] == "specrt"]
    assert all(r["status"] == "ok" for r in spec), [r for r in spec if r["status"] != "ok"]
    for r in spec:
        assert r["cuda_graph"] and r["l2_flushed"]
        if r["bytes"]:
            assert 0 < r["pct_of_peak"] < 110, r
        if doc["meta"]["gpm"]["used"]:
            assert r["gpm_dram_util_pct"] is not None
