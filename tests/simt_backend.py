"""The CUDA kernels run on the CPU through the SIMT emulation (csrc/simt), driven by ctypes.

Each op here has the signature of its ``torch.ops.specrt.*`` schema (destination passing) and
fills the C API's params struct (csrc/include/specrt/*.h) from CPU tensors the way the CUDA glue
(csrc/torch/*_cuda.cpp) does from CUDA tensors; the launch then runs the kernel headers of
csrc/kernels, compiled by the host compiler, with every CUDA thread a fiber.

``build()`` compiles the emulation library with CMake on first use (``build/simt``, or
``build/simt-asan`` with AddressSanitizer + UBSan when the ASan runtime is preloaded into this
process, see scripts/test.sh). ``configure()`` picks the schedule (0 in order, 1 reversed,
2 seeded random), the SM count the launchers see (it decides cluster sizes) and worker threads.
"""
from __future__ import annotations

import contextlib
import ctypes as C
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = {"in_order": 0, "reversed": 1, "random": 2}


class SimtError(RuntimeError):
    """A launch the emulation rejected or aborted (deadlock, misuse, bad launch config)."""


def _preloaded(name: str) -> bool:
    try:
        return name in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def sanitizer_runtime(name: str) -> str | None:
    """Path of the compiler's ``lib<name>.so`` (asan, tsan) to LD_PRELOAD, or None."""
    r = subprocess.run(["gcc", f"-print-file-name=lib{name}.so"], capture_output=True, text=True)
    path = r.stdout.strip()
    return path if os.path.isabs(path) else None


VARIANTS = {"plain": [], "asan": ["-DSPECRT_SIMT_SANITIZE=ON"], "tsan": ["-DSPECRT_SIMT_TSAN=ON"]}


def build(variant: str | None = None) -> Path:
    """Configure + build the emulation library (incremental); returns the .so path.

    variant: "plain", "asan" (AddressSanitizer + UBSan) or "tsan" (ThreadSanitizer race
    check); by default the one matching the sanitizer runtime preloaded into this process.
    """
    if variant is None:
        variant = "asan" if _preloaded("libasan") else "tsan" if _preloaded("libtsan") else "plain"
    out = ROOT / "build" / ("simt" if variant == "plain" else f"simt-{variant}")
    cfg = ["cmake", "-S", str(ROOT), "-B", str(out), "-G", "Ninja", "-DSPECRT_SIMT=ON",
           *VARIANTS[variant]]
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # the compiler must not run under a sanitizer runtime
    if not (out / "build.ninja").exists():
        subprocess.run(cfg, check=True, env=env, stdout=subprocess.DEVNULL)
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    r = subprocess.run(["cmake", "--build", str(out), "--target", "specrt_simt", "-j", jobs],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-8000:] + r.stderr[-8000:])
        raise RuntimeError("building the SIMT emulation failed (output above)")
    return out / "libspecrt_simt.so"


# ---- params structs (csrc/include/specrt/*.h), field for field ----
i32, i64, f32, ptr = C.c_int32, C.c_int64, C.c_float, C.c_void_p


class TreeAttentionParams(C.Structure):
    _fields_ = [("dtype", i32), ("q", ptr), ("q_stride_n", i64), ("q_stride_h", i64),
                ("k_cache", ptr), ("k_stride_page", i64), ("k_stride_slot", i64),
                ("k_stride_head", i64), ("v_cache", ptr), ("v_stride_page", i64),
                ("v_stride_slot", i64), ("v_stride_head", i64), ("block_table", ptr),
                ("block_table_stride", i64), ("seq_lens", ptr), ("qo_indptr", ptr),
                ("mask", ptr), ("mask_stride", i64), ("mask_words", i32), ("out", ptr),
                ("out_stride_n", i64), ("out_stride_h", i64), ("lse", ptr),
                ("lse_stride_n", i64), ("lse_stride_h", i64), ("plan", ptr),
                ("plan_item_capacity", i32), ("workspace", ptr), ("workspace_rows", i64),
                ("batch", i32), ("total_q", i32), ("num_qo_heads", i32), ("num_kv_heads", i32),
                ("head_dim", i32), ("num_pages", i32), ("page_size", i32), ("max_pages", i32),
                ("sm_scale", f32), ("path", i32)]


class AppendKvParams(C.Structure):
    _fields_ = [("k", ptr), ("k_stride_n", i64), ("k_stride_h", i64), ("v", ptr),
                ("v_stride_n", i64), ("v_stride_h", i64), ("k_cache", ptr),
                ("k_cache_stride_page", i64), ("k_cache_stride_slot", i64),
                ("k_cache_stride_head", i64), ("v_cache", ptr), ("v_cache_stride_page", i64),
                ("v_cache_stride_slot", i64), ("v_cache_stride_head", i64),
                ("slot_mapping", ptr), ("slot_mapping_stride", i64), ("num_tokens", i64),
                ("num_kv_heads", i32), ("head_dim", i32), ("num_pages", i64),
                ("page_size", i32), ("elem_size", i32)]


class KvRollbackParams(C.Structure):
    _fields_ = [("kv_cache", ptr), ("stride_layer", i64), ("stride_kv", i64),
                ("stride_page", i64), ("stride_slot", i64), ("stride_head", i64),
                ("num_layers", i32), ("num_kv_heads", i32), ("head_dim", i32),
                ("page_size", i32), ("num_pages", i64), ("elem_size", i32),
                ("block_table", ptr), ("block_table_stride_b", i64),
                ("block_table_stride_p", i64), ("max_pages", i32), ("committed_lens", ptr),
                ("committed_lens_stride", i64), ("path", ptr), ("path_stride_b", i64),
                ("path_stride_t", i64), ("max_t", i32), ("num_accepted", ptr),
                ("num_accepted_stride", i64), ("batch", i32)]


class RejectionSampleParams(C.Structure):
    _fields_ = [("target_logits", ptr), ("logits_dtype", i32), ("logits_row_stride", i64),
                ("vocab_size", i64), ("batch_size", i64), ("draft_tokens", ptr),
                ("parents", ptr), ("node_indptr", ptr), ("draft_probs", ptr),
                ("draft_probs_row_stride", i64), ("temperature", ptr), ("top_k", ptr),
                ("top_p", ptr), ("seed", ptr), ("offset", ptr), ("uniforms", ptr),
                ("out_tokens", ptr), ("out_tokens_row_stride", i64), ("out_path", ptr),
                ("out_path_row_stride", i64), ("max_t", i64), ("out_num_accepted", ptr)]


class SampleParams(C.Structure):
    _fields_ = [("logits", ptr), ("logits_dtype", i32), ("logits_row_stride", i64),
                ("num_rows", i64), ("vocab_size", i64), ("temperature", ptr), ("top_k", ptr),
                ("top_p", ptr), ("seed", ptr), ("offset", ptr), ("uniforms", ptr),
                ("out_tokens", ptr), ("out_probs", ptr), ("out_probs_row_stride", i64)]


_LAYOUTS = {"TreeAttentionCudaParams": (TreeAttentionParams, "path"),
            "specrt::AppendKvParams": (AppendKvParams, "elem_size"),
            "specrt::KvRollbackParams": (KvRollbackParams, "batch"),
            "specrt::RejectionSampleCudaParams": (RejectionSampleParams, "out_num_accepted"),
            "specrt::SampleCudaParams": (SampleParams, "out_probs_row_stride")}

_lib = None


def lib():
    global _lib
    if _lib is None:
        so = os.environ.get("SPECRT_SIMT_LIB") or build()
        L = C.CDLL(str(so))
        L.simt_last_error.restype = C.c_char_p
        L.simt_layout.restype = C.c_longlong
        L.simt_layout.argtypes = [C.c_char_p, C.c_int]
        L.simt_configure.argtypes = [C.c_int, C.c_ulonglong, C.c_int, C.c_int]
        for name, (cls, last) in _LAYOUTS.items():
            size, off = L.simt_layout(name.encode(), 0), L.simt_layout(name.encode(), 1)
            if (size, off) != (C.sizeof(cls), getattr(cls, last).offset):
                raise RuntimeError(f"simt_backend: {name} layout differs from the C header "
                                   f"(size/offset {size}/{off} vs {C.sizeof(cls)}/"
                                   f"{getattr(cls, last).offset})")
        for fn in ("simt_tree_attention", "simt_append_kv", "simt_kv_rollback",
                   "simt_rejection_sample", "simt_sample"):
            getattr(L, fn).argtypes = [C.c_void_p]
        _lib = L
        configure()
    return _lib


def configure(schedule="in_order", seed=1, num_sms=132, workers=None):
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    lib().simt_configure(SCHEDULES[schedule], seed, num_sms, workers)


@contextlib.contextmanager
def configured(**kw):
    configure(**kw)
    try:
        yield
    finally:
        configure()


def last_launch() -> dict:
    """Grid, block, cluster shape and dynamic shared memory of the most recent launch."""
    a, b, c = (C.c_uint * 3)(), (C.c_uint * 3)(), (C.c_uint * 3)()
    smem = C.c_longlong()
    lib().simt_last_launch(a, b, c, C.byref(smem))
    return dict(grid=tuple(a), block=tuple(b), cluster=tuple(c), smem=smem.value)


def _launch(fn: str, params) -> None:
    L = lib()
    L.simt_clear_error()
    err = getattr(L, fn)(C.byref(params))
    if err != 0:
        msg = L.simt_last_error().decode(errors="replace")
        raise SimtError(f"{fn}: cudaError {err}: {msg or '(no message)'}")


def _p(t):
    return None if t is None else t.data_ptr()


def _cpu(*ts):
    for t in ts:
        if t is not None and t.device.type != "cpu":
            raise ValueError("simt_backend works on CPU tensors")


# ---- ops: the torch op schemas (destination passing) ----

def tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, out, lse,
                   sm_scale, plan=None, workspace=None, path="auto"):
    _cpu(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, out, lse, plan, workspace)
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dim() == 3
    for t in (q, out, k_cache, v_cache):
        assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0
    p = TreeAttentionParams()
    p.dtype = 1 if q.dtype == torch.float16 else 2
    p.q, p.q_stride_n, p.q_stride_h = _p(q), q.stride(0), q.stride(1)
    p.k_cache, p.v_cache = _p(k_cache), _p(v_cache)
    p.k_stride_page, p.k_stride_slot, p.k_stride_head = k_cache.stride()[:3]
    p.v_stride_page, p.v_stride_slot, p.v_stride_head = v_cache.stride()[:3]
    p.block_table, p.block_table_stride = _p(block_table), block_table.stride(0)
    p.seq_lens, p.qo_indptr = _p(seq_lens), _p(qo_indptr)
    batch = seq_lens.shape[0]
    if mask is not None:
        p.mask, p.mask_stride, p.mask_words = _p(mask), mask.stride(0), mask.shape[1]
    p.out, p.out_stride_n, p.out_stride_h = _p(out), out.stride(0), out.stride(1)
    if lse is not None:
        p.lse, p.lse_stride_n, p.lse_stride_h = _p(lse), lse.stride(0), lse.stride(1)
    if plan is not None:
        items = plan.numel() - 8 - (batch + 1)
        assert items >= 4 and items % 4 == 0 and workspace is not None
        p.plan, p.plan_item_capacity = _p(plan), items // 4
        p.workspace = _p(workspace)
        p.workspace_rows = workspace.numel() // (q.shape[1] * (q.shape[2] + 1))
    p.batch, p.total_q = batch, q.shape[0]
    p.num_qo_heads, p.head_dim = q.shape[1], q.shape[2]
    p.num_pages, p.page_size, p.num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    p.max_pages = block_table.shape[1]
    p.sm_scale = sm_scale
    p.path = {"auto": 0, "cuda_cores": 1, "tensor_cores": 2}[path]
    _launch("simt_tree_attention", p)


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    _cpu(k, v, k_cache, v_cache, slot_mapping)
    p = AppendKvParams()
    p.k, (p.k_stride_n, p.k_stride_h) = _p(k), k.stride()[:2]
    p.v, (p.v_stride_n, p.v_stride_h) = _p(v), v.stride()[:2]
    p.k_cache = _p(k_cache)
    p.k_cache_stride_page, p.k_cache_stride_slot, p.k_cache_stride_head = k_cache.stride()[:3]
    p.v_cache = _p(v_cache)
    p.v_cache_stride_page, p.v_cache_stride_slot, p.v_cache_stride_head = v_cache.stride()[:3]
    p.slot_mapping, p.slot_mapping_stride = _p(slot_mapping), slot_mapping.stride(0)
    p.num_tokens, p.num_kv_heads, p.head_dim = k.shape
    p.num_pages, p.page_size = k_cache.shape[0], k_cache.shape[1]
    p.elem_size = k_cache.element_size()
    _launch("simt_append_kv", p)


def kv_rollback(kv_cache, block_table, committed_lens, path, num_accepted):
    _cpu(kv_cache, block_table, committed_lens, path, num_accepted)
    p = KvRollbackParams()
    p.kv_cache = _p(kv_cache)
    (p.stride_layer, p.stride_kv, p.stride_page, p.stride_slot,
     p.stride_head) = kv_cache.stride()[:5]
    p.num_layers, _, p.num_pages, p.page_size, p.num_kv_heads, p.head_dim = kv_cache.shape
    p.elem_size = kv_cache.element_size()
    p.block_table = _p(block_table)
    p.block_table_stride_b, p.block_table_stride_p = block_table.stride()
    p.max_pages = block_table.shape[1]
    p.committed_lens, p.committed_lens_stride = _p(committed_lens), committed_lens.stride(0)
    p.path, (p.path_stride_b, p.path_stride_t) = _p(path), path.stride()
    p.max_t = path.shape[1]
    p.num_accepted, p.num_accepted_stride = _p(num_accepted), num_accepted.stride(0)
    p.batch = committed_lens.shape[0]
    _launch("simt_kv_rollback", p)


_LOGITS_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def rejection_sample(target_logits, draft_tokens, parents, node_indptr, draft_probs,
                     temperature, top_k, top_p, seed, offset, uniforms, out_tokens, out_path,
                     out_num_accepted):
    _cpu(target_logits, draft_tokens, parents, node_indptr, draft_probs, temperature, top_k,
         top_p, seed, offset, uniforms, out_tokens, out_path, out_num_accepted)
    batch = node_indptr.shape[0] - 1
    if batch == 0:
        return
    p = RejectionSampleParams()
    p.target_logits, p.logits_dtype = _p(target_logits), _LOGITS_DTYPE[target_logits.dtype]
    p.logits_row_stride, p.vocab_size = target_logits.stride(0), target_logits.shape[1]
    p.batch_size = batch
    p.draft_tokens, p.parents, p.node_indptr = _p(draft_tokens), _p(parents), _p(node_indptr)
    if draft_probs is not None:
        p.draft_probs, p.draft_probs_row_stride = _p(draft_probs), draft_probs.stride(0)
    p.temperature, p.top_k, p.top_p = _p(temperature), _p(top_k), _p(top_p)
    p.seed, p.offset, p.uniforms = _p(seed), _p(offset), _p(uniforms)
    p.out_tokens, p.out_tokens_row_stride = _p(out_tokens), out_tokens.stride(0)
    p.out_path, p.out_path_row_stride = _p(out_path), out_path.stride(0)
    p.max_t, p.out_num_accepted = out_tokens.shape[1], _p(out_num_accepted)
    _launch("simt_rejection_sample", p)


def sample(logits, temperature, top_k, top_p, seed, offset, uniforms, out_tokens, out_probs):
    _cpu(logits, temperature, top_k, top_p, seed, offset, uniforms, out_tokens, out_probs)
    if logits.shape[0] == 0:
        return
    p = SampleParams()
    p.logits, p.logits_dtype = _p(logits), _LOGITS_DTYPE[logits.dtype]
    p.logits_row_stride, p.num_rows, p.vocab_size = logits.stride(0), *logits.shape
    p.temperature, p.top_k, p.top_p = _p(temperature), _p(top_k), _p(top_p)
    p.seed, p.offset, p.uniforms = _p(seed), _p(offset), _p(uniforms)
    p.out_tokens = _p(out_tokens)
    if out_probs is not None:
        p.out_probs, p.out_probs_row_stride = _p(out_probs), out_probs.stride(0)
    _launch("simt_sample", p)
