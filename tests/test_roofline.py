"""bench/roofline.py and bench/common.py: the bytes/FLOPs formulas on hand-computed cases, the
sweeps, cache flushing, provenance (git commit, dirty-tree refusal), and one real CPU run end to
end (JSON / CSV / PNG with the promised fields)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
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
    # Deterministic drafts: the logits only, every row once.
    assert roofline.rejection_bytes(5, 32000, 2) == 320_000
    # Chains of 4 nodes (3 drafts): all accepted -> 3 single reads; 1 accepted then rejected ->
    # 1 read + the rejecting row; invalid -> nothing; rejected at once -> the root's row only.
    assert roofline.rejection_draft_reads([3, 1, -1, 0], 4) == (4, 2)
    assert roofline.rejection_draft_reads([0], 1) == (0, 0)  # no draft at all
    # 4 chains x 4 nodes, V = 32000, fp32 logits: 16 rows, 4 probabilities, 2 residual rows.
    assert roofline.rejection_bytes(16, 32000, 4, 4, 2) == 16 * 32000 * 4 + 4 * 4 + 2 * 32000 * 4
    # ... far less than a whole draft distribution per node (the old count: + 16 * 32000 * 4)
    assert roofline.rejection_bytes(16, 32000, 4, 4, 2) < 16 * 32000 * 4 * 2 * 0.6
    assert roofline.rejection_flops(5, 32000) == 640_000


def test_rejection_case_counts_the_walk_it_takes():
    """The chain point's bytes follow the op's actual outcome (checked against the reference)."""
    p = dict(batch=6, draft="chain", size=4, vocab=1000, logits="float32", top_k=20, top_p=0.9)
    case = roofline.case_rejection(p, "cpu", set())
    assert case.check_key == ("rejection", 20, 0.9)
    assert case.check()["pass"]
    ex = case.specrt.extra
    assert (ex["top_k"], ex["top_p"]) == (20, 0.9)
    assert case.bytes == roofline.rejection_bytes(6 * 5, 1000, 4, ex["draft_prob_reads"],
                                                  ex["draft_prob_rows"])
    assert ex["draft_prob_reads"] + ex["draft_prob_rows"] >= 1
    tree = roofline.case_rejection(dict(batch=2, draft="tree", size=8, vocab=500, logits="bfloat16"),
                                   "cpu", set())
    assert tree.bytes == 2 * 8 * 500 * 2 and tree.check()["pass"]


def test_filter_probs_matches_the_reference_processing():
    from specrt import reference

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 64, generator=gen) * 2
    for k, tp in ((0, 1.0), (10, 1.0), (0, 0.8), (10, 0.8)):
        got = roofline.filter_probs(torch.softmax(logits, -1), k, tp)
        for i in range(4):
            want, _ = reference._processed_row(logits[i], 1.0, k, tp)
            assert torch.allclose(got[i].double(), want, atol=1e-6), (k, tp)


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
    assert len(rej) == 5 * 5 * 3 * 2 + 3 * 2 * 3
    filt = [p for p in rej if p.get("top_k", 0) > 0 or p.get("top_p", 1.0) < 1]
    assert {(p.get("top_k", 0), p.get("top_p", 1.0)) for p in filt} == {(50, 1.0), (0, 0.9), (50, 0.9)}
    assert {p["draft"] for p in filt} == {"chain", "tree"}
    for dev in ("cuda", "cpu"):  # every sweep has top-k / top-p points, --quick ones too
        for quick in (True, False):
            pts = roofline.sweep("rejection", dev, quick)
            assert any(p.get("top_k", 0) > 0 for p in pts) and any(p.get("top_p", 1) < 1 for p in pts)
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
    runner = roofline.Runner("cpu", quick=True, use_gpm=False, flush=False)
    rows: list = []
    ceil = {"copy_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11, "nominal_peak_bytes_per_s": None}
    roofline.run_kernel("append_kv", runner, ceil, set(), rows, lambda r: None)
    assert len(rows) == len(roofline.sweep("append_kv", "cpu", True))
    assert all(r["status"] == "skipped" and "not implemented" in r["reason"] for r in rows)


def test_flashinfer_graph_plumbing_on_cpu():
    """The buffers FlashInfer's CUDA-graph mode needs, and the seed / offset tensors that make
    its chain sampler capturable (the GPU paths themselves have not run on a GPU yet)."""
    buf = roofline.flashinfer_graph_buffers(b=3, t=5, seq=100, pps=7, dev="cpu")
    assert buf["qo_indptr_buf"].shape == (4,) and buf["paged_kv_indptr_buf"].shape == (4,)
    assert buf["paged_kv_indices_buf"].shape == (21,) and buf["paged_kv_last_page_len_buf"].shape == (3,)
    assert buf["mask_indptr_buf"].shape == (4,)
    assert buf["custom_mask_buf"].dtype == torch.uint8 and buf["custom_mask_buf"].numel() == 3 * 63  # ceil(500 / 8)
    assert all(v.dtype == torch.int32 for k, v in buf.items() if k != "custom_mask_buf")
    kw = roofline.flashinfer_chain_kwargs({"draft_probs": 0, "seed": 0, "offset": 0}, "cpu")
    assert kw["seed"].dtype == torch.int64 and kw["offset"].shape == (1,)
    assert roofline.flashinfer_chain_kwargs({"draft_probs": 0, "generator": 0}, "cpu") == {}


def test_specrt_no_plan_row_is_gpu_only():
    case = roofline.case_tree_attention(dict(geometry="smollm2-135m", batch=1, context=40, new=4),
                                        "cpu", {"specrt_no_plan"})
    assert case.specrt.extra == {"split_kv_plan": False, "plan_host_us": None}
    assert "no split-KV plan on CPU" in case.specrt.note
    assert case.peers["specrt_no_plan"].fn is None and "GPU only" in case.peers["specrt_no_plan"].error


# --------------------------------------------------------------------------------------------
# cache flushing (bench/common.py)
# --------------------------------------------------------------------------------------------


def test_last_level_cache_from_sysfs(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "2048K"), (3, "Unified", "266240K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert common.last_level_cache_bytes(tmp_path) == 266240 << 10
    assert common._parse_size("32M") == 32 << 20 and common._parse_size("512") == 512
    assert common.fits_in_cache(100, 100) is True and common.fits_in_cache(101, 100) is False
    assert common.fits_in_cache(10, None) is None


def test_cpu_flusher_runs_before_every_timed_rep_outside_the_timing():
    f = common.CacheFlusher(cache_bytes=1 << 20)
    assert f.cache_bytes == 1 << 20 and f.bytes == 64 << 20  # twice the cache, at least 64 MiB
    assert common.CacheFlusher(cache_bytes=100 << 20).bytes == 200 << 20
    log = []
    t = common.time_cpu(lambda: log.append("fn"), pre=lambda: log.append("pre"),
                        flusher=lambda: log.append("flush"), warmup=1, min_reps=4, max_reps=4)
    assert log == ["pre", "fn"] + ["pre", "flush", "fn"] * 4  # no flush in the warm-up
    assert t.as_dict()["cache_flushed"] == "LLC" and not t.as_dict()["l2_flushed"]
    t = common.time_fn(lambda: None, "cpu", flusher=f, max_reps=3, target_s=0.0)
    assert t.flushed == "LLC" and len(t.times) == 3 and f.calls == 3
    assert common.time_cpu(lambda: None, max_reps=3).as_dict()["cache_flushed"] is None


def test_cache_column_says_which_points_are_warm():
    base = {"time_s": 1e-3}
    assert roofline.cache_state({**base, "cache_flushed": "LLC", "fits_in_cache": False}) == "flushed"
    assert roofline.cache_state({**base, "cache_flushed": "L2", "fits_in_cache": True}) == "flushed,fits"
    assert roofline.cache_state({**base, "cache_flushed": None, "fits_in_cache": True}) == "warm,fits"
    assert roofline.cache_state({**base, "cache_flushed": None, "fits_in_cache": False}) == "warm"
    assert roofline.cache_state({"status": "skipped"}) == "-"
    r = roofline.Runner("cpu", quick=True, use_gpm=False, flush=False)
    assert r.flusher is None and r.timing_kw()["flusher"] is None
    assert r.cache_info()["flushed"] is False and "fits_in_cache" in r.cache_info()["method"]


# --------------------------------------------------------------------------------------------
# provenance (bench/common.py)
# --------------------------------------------------------------------------------------------


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "first")
    return tmp_path


def test_git_state_clean_dirty_untracked(repo):
    st = common.git_state(repo, package=None)
    assert len(st["commit"]) == 40 and st["dirty"] is False and st["dirty_files"] == []
    assert common.require_clean_tree(False, repo, package=None) == st
    assert common.git_label(st) == st["commit"][:10]
    (repo / "new.txt").write_text("x")  # untracked: not dirty, but counted
    st = common.git_state(repo, package=None)
    assert st["dirty"] is False and st["untracked"] == 1
    (repo / "a.txt").write_text("2\n")  # a tracked change: dirty
    st = common.git_state(repo, package=None)
    assert st["dirty"] is True and st["dirty_files"] == ["a.txt"]
    with pytest.raises(common.DirtyTreeError, match="--allow-dirty"):
        common.require_clean_tree(False, repo, package=None)
    allowed = common.require_clean_tree(True, repo, package=None)
    assert allowed["dirty"] is True and common.git_label(allowed).endswith("-dirty")
    _git(repo, "add", "a.txt")  # staged counts too
    assert common.git_state(repo, package=None)["dirty"] is True


def test_code_imported_from_elsewhere_is_dirty(repo):
    """A clean checkout whose benchmark imports specrt from another folder does not describe
    the code that ran."""
    st = common.git_state(repo)  # specrt comes from this test's checkout, not from `repo`
    assert st["package_outside_repo"] is True and st["dirty"] is True
    with pytest.raises(common.DirtyTreeError, match="imported from"):
        common.require_clean_tree(False, repo)
    here = common.git_state(common.REPO)
    assert here["package_outside_repo"] is False and Path(here["package_dir"]).name == "specrt"


def test_no_git_commit_is_refused(tmp_path):
    st = common.git_state(tmp_path, package=None)
    assert st["commit"] is None and st["dirty"] is None and common.git_label(st) == "unknown"
    with pytest.raises(common.DirtyTreeError, match="no git commit"):
        common.require_clean_tree(False, tmp_path, package=None)
    assert common.require_clean_tree(True, tmp_path, package=None)["commit"] is None


def test_roofline_refuses_a_dirty_tree(monkeypatch, tmp_path, capsys):
    dirty = {"commit": "f" * 40, "dirty": True, "dirty_files": ["specrt/ops.py"], "untracked": 0,
             "package_dir": None, "package_outside_repo": False}
    monkeypatch.setattr(common, "git_state", lambda repo=None, package=None: dict(dirty))
    out = tmp_path / "out"
    assert roofline.main(["--device", "cpu", "--quick", "--out", str(out)]) == 2
    assert "uncommitted changes" in capsys.readouterr().err and not out.exists()
    env = common.environment("cpu", common.require_clean_tree(True))
    assert env["git"]["dirty"] is True and env["git"]["commit"] == "f" * 40


# --------------------------------------------------------------------------------------------
# end to end on CPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("roofline")
    # --allow-dirty: the tests run in working trees with uncommitted changes
    cmd = [sys.executable, str(BENCH / "roofline.py"), "--device", "cpu", "--quick", "--kernel", "all",
           "--out", str(out), "--threads", "1", "--name", "rl", "--allow-dirty"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_cpu_run_writes_json_csv_png(cpu_run):
    out, stdout = cpu_run
    for ext in ("json", "csv", "png"):
        assert (out / f"rl.{ext}").stat().st_size > 100
    assert (out / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "specrt" in stdout and "GB/s" in stdout  # the terminal table


def assert_specrt_rows_ok(rows: list) -> None:
    """specrt's own rows must have run: a "skipped" one (not implemented, could not run, out of
    memory) is a failure of specrt, not a pass. Peers may be skipped, with a reason."""
    spec = [r for r in rows if r["impl"] == "specrt"]
    assert spec, "no specrt rows"
    bad = [(r["label"], r["status"], r.get("reason")) for r in spec if r["status"] != "ok"]
    assert not bad, bad
    for r in rows:
        if r["impl"] != "specrt" and r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"], r


def test_skipped_specrt_rows_fail_the_check():
    ok = {"impl": "specrt", "label": "x", "status": "ok"}
    assert_specrt_rows_ok([ok, {"impl": "torch_sdpa", "label": "x", "status": "skipped", "reason": "no"}])
    for bad in ({"impl": "specrt", "label": "y", "status": "skipped", "reason": "not implemented"},
                {"impl": "specrt", "label": "y", "status": "error", "reason": "boom"},
                {"impl": "flashinfer", "label": "x", "status": "skipped", "reason": None}):
        with pytest.raises(AssertionError):
            assert_specrt_rows_ok([ok, bad])


def test_cpu_run_json_fields(cpu_run):
    out, stdout = cpu_run
    doc = json.loads((out / "rl.json").read_text())
    meta = doc["meta"]
    for key in ("device", "device_type", "date", "torch", "cuda", "git", "git_label", "command",
                "method", "cache"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and "roofline.py" in meta["command"] and "--quick" in meta["command"]
    assert {"commit", "dirty", "dirty_files"} <= set(meta["git"])
    assert meta["git_label"].startswith(str(meta["git"]["commit"])[:10])
    assert meta["git_label"].endswith("-dirty") == bool(meta["git"]["dirty"])
    assert meta["git_label"] in stdout
    ceil = doc["ceilings"]
    assert ceil["copy_bytes_per_s"] > 0 and ceil["matmul_flops_per_s"] > 0
    assert ceil["nominal_peak_bytes_per_s"] is None  # no NVML on CPU
    cache = meta["cache"]
    assert cache["level"] == "LLC" and cache["flushed"] and cache["flush_bytes"] >= 2 * (cache["bytes"] or 0)
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == set(roofline.KERNELS)
    assert_specrt_rows_ok(rows)
    spec = [r for r in rows if r["impl"] == "specrt"]
    n_points = sum(len(roofline.sweep(k, "cpu", True)) for k in roofline.KERNELS)
    assert len(spec) == n_points
    for r in spec:
        assert r["time_us"] > 0 and r["reps"] >= 3 and r["bytes"] >= 0
        assert r["mode"] == "eager" and r["cuda_graph"] is False
        assert r["cache_flushed"] == "LLC" and isinstance(r["fits_in_cache"], bool)
        assert r["fits_in_cache"] == (r["bytes"] <= cache["bytes"])
        if r["bytes"]:
            assert r["achieved_gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
            assert r["pct_of_copy"] == pytest.approx(100 * r["bytes"] / r["time_s"] / ceil["copy_bytes_per_s"])
        if r["kernel"] in ("tree_attention", "rejection"):
            assert r["flops"] > 0 and r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
            assert r["gflops_per_s"] == pytest.approx(r["flops"] / r["time_s"] / 1e9)
        if r["kernel"] == "tree_attention":
            assert r["split_kv_plan"] is False and "plan" in r["note"]
        if r["kernel"] == "rejection":
            elem = 4 if r["p_logits"] == "float32" else 2
            n = r["p_batch"] * (r["p_size"] + 1 if r["p_draft"] == "chain" else r["p_size"])
            assert r["bytes"] == roofline.rejection_bytes(n, r["p_vocab"], elem, r["draft_prob_reads"],
                                                          r["draft_prob_rows"])
    # The first point of each check key (per kernel; per top-k / top-p setting for rejection)
    # that moves bytes is checked against specrt.reference.
    for k in roofline.KERNELS:
        keys = {}
        for p_, r in zip(roofline.sweep(k, "cpu", True), [r for r in spec if r["kernel"] == k]):
            if r.get("bytes"):
                keys.setdefault(roofline.check_key(k, p_), r)
        assert keys, k
        for first in keys.values():
            assert first["check"]["pass"], first
        assert sum("check" in r for r in spec if r["kernel"] == k) == len(keys)
    assert sum("check" in r for r in spec if r["kernel"] == "rejection") == 2  # no filter, and top-k + top-p
    # Peers: their own time and GB/s, and the ratio to specrt at the same point.
    peers = [r for r in rows if r["impl"] != "specrt" and r["status"] == "ok"]
    assert {"torch_sdpa", "torch_sdpa_gather", "torch_vectorized", "torch_index"} <= {r["impl"] for r in peers}
    for r in peers:
        s = next(x for x in spec if x["label"] == r["label"] and x["kernel"] == r["kernel"])
        assert r["specrt_over_peer"] == pytest.approx(r["time_s"] / s["time_s"])
        assert r["mode"] == "eager"
    gpu_only = [r for r in rows if r["impl"] in roofline.GPU_ONLY_PEERS]
    assert {r["impl"] for r in gpu_only} == set(roofline.GPU_ONLY_PEERS)
    assert all(r["status"] == "skipped" and r["reason"] for r in gpu_only)
    # the terminal table has the mode and cache columns
    assert " mode " in stdout and " cache " in stdout and "flushed" in stdout


def test_cpu_run_csv_matches_json(cpu_run):
    out, _ = cpu_run
    doc = json.loads((out / "rl.json").read_text())
    with open(out / "rl.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["rows"])
    for col in ("kernel", "label", "impl", "status", "mode", "cache_flushed", "fits_in_cache", "time_us",
                "bytes", "flops", "intensity", "achieved_gbps", "pct_of_peak", "pct_of_copy",
                "specrt_over_peer"):
        assert col in rows[0], col


# --------------------------------------------------------------------------------------------
# GPU (runs on the H100 machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_quick_run(tmp_path):
    """Not yet run on a GPU in this form (written for the H100/H200 machine)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cmd = [sys.executable, str(BENCH / "roofline.py"), "--device", "cuda", "--quick", "--kernel", "all",
           "--out", str(tmp_path), "--name", "rl", "--allow-dirty",
           "--peers", "torch_sdpa,torch_vectorized,torch_index,chain_noop,specrt_no_plan"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "rl.json").read_text())
    ceil = doc["ceilings"]
    assert ceil["nominal_peak_bytes_per_s"] and 0.3 < ceil["copy_bytes_per_s"] / ceil["nominal_peak_bytes_per_s"] <= 1.0
    assert ceil["cache"]["level"] == "L2" and ceil["cache"]["flushed"]
    assert_specrt_rows_ok(doc["rows"])
    spec = [r for r in doc["rows"] if r["impl"] == "specrt"]
    for r in spec:
        assert r["cuda_graph"] and r["mode"] == "graph" and r["l2_flushed"]
        if r["bytes"]:
            # The L2 is flushed before every rep and the bytes are the least that must move
            # from HBM, so more than the nominal peak is impossible.
            assert 0 < r["pct_of_peak"] <= 100, r
        if r["kernel"] == "tree_attention":
            assert r["split_kv_plan"] and r["plan_host_us"] > 0
        if doc["meta"]["gpm"]["used"]:
            assert r["gpm_dram_util_pct"] is not None
    for r in doc["rows"]:
        if r["status"] == "ok":
            assert r["mode"] in ("graph", "eager") and (r["mode"] == "graph" or r["eager_reason"])
