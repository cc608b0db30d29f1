#!/usr/bin/env python3
"""Mutation check of the emulated suite: plant known bugs in the kernels, one at a time, and
confirm that `pytest -m emulated` fails on each. Nothing is committed: every file is restored.

    python scripts/simt_mutations.py [--only NAME] [--list]

Each mutation names the file, the exact text replaced, and the tests to run: the emulated suite
file covering that kernel, then the ThreadSanitizer race check (tests/test_simt_races.py). A
mutant is caught when either fails.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = ROOT / "csrc" / "kernels"

MUTATIONS = [
    ("attn: __syncthreads after the K/V tile wait removed (tensor-core pass)",
     K / "tree_attention.cuh",
     """    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;

    if (warp_active) {""",
     """    cp_async_commit();
    cp_async_wait<1>();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;

    if (warp_active) {""",
     "test_simt_attention.py"),
    ("attn: off-by-one page index (previous page of the block table)",
     K / "tree_attention.cuh",
     "page = page_idx < p.max_pages ? __ldg(pages + page_idx) : -1;",
     "page = page_idx < p.max_pages ? __ldg(pages + page_idx - (page_idx > 0)) : -1;",
     "test_simt_attention.py"),
    ("attn: two B fragment registers swapped in O += P V",
     K / "tree_attention.cuh",
     "TypeOps<T>::mma(o[2 * db], a, b[0], b[1]);",
     "TypeOps<T>::mma(o[2 * db], a, b[1], b[0]);",
     "test_simt_attention.py"),
    ("attn: two A fragment registers swapped (P packing)",
     K / "tree_attention.cuh",
     """        a[1] = TypeOps<T>::pack2(s[2 * kb][2], s[2 * kb][3]);
        a[2] = TypeOps<T>::pack2(s[2 * kb + 1][0], s[2 * kb + 1][1]);""",
     """        a[2] = TypeOps<T>::pack2(s[2 * kb][2], s[2 * kb][3]);
        a[1] = TypeOps<T>::pack2(s[2 * kb + 1][0], s[2 * kb + 1][1]);""",
     "test_simt_attention.py"),
    ("attn: CUDA-core merge reads the states before the barrier",
     K / "tree_attention.cuh",
     """      s_l[state * R + r] = l[r];
    }
  }
  __syncthreads();""",
     """      s_l[state * R + r] = l[r];
    }
  }""",
     "test_simt_attention.py"),
    ("attn: cp.async waits for one group too few (reads the stage in flight)",
     K / "tree_attention.cuh",
     """    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;
    const bool needs_mask""",
     """    cp_async_commit();
    cp_async_wait<2>();
    __syncthreads();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;
    const bool needs_mask""",
     "test_simt_attention.py"),
    ("attn: split-KV merge drops the last item of each sequence",
     K / "tree_attention.cuh",
     "for (int it = i0; it < i1; ++it) {\n      const int64_t row = p.plan[kPlanHeader + 4 * it + 3] + node;\n      if (row >= p.workspace_rows) continue;",
     "for (int it = i0; it < i1 - 1; ++it) {\n      const int64_t row = p.plan[kPlanHeader + 4 * it + 3] + node;\n      if (row >= p.workspace_rows) continue;",
     "test_simt_attention.py"),
    ("sampling: the drawn token only reaches block 0 (the bug the emulation found)",
     K / "rejection_sampling.cuh",
     """      for (int r = 0; r < ctx.nblocks; ++r)
        *ctx.cluster.map_shared_rank(&sm->owner_result, r) = sm->result;""",
     """      *ctx.cluster.map_shared_rank(&sm->owner_result, 0) = sm->result;""",
     "test_simt_sampling.py"),
    ("sampling: barrier before tried[] grows removed",
     K / "rejection_sampling.cuh",
     """        __syncthreads();  // every thread has read tried[] before it grows
        if (threadIdx.x == 0) tried[n_tried] = x;""",
     """        if (threadIdx.x == 0) tried[n_tried] = x;""",
     "test_simt_sampling.py"),
    ("sampling: cluster.sync before reading the other blocks' partial statistics removed",
     K / "rejection_sampling.cuh",
     """  ctx.cluster.sync();
  for (int64_t i = threadIdx.x; i < n_nodes; i += kThreads) {
    RowStat acc = *ctx.cluster.map_shared_rank(&part[i], 0);""",
     """  for (int64_t i = threadIdx.x; i < n_nodes; i += kThreads) {
    RowStat acc = *ctx.cluster.map_shared_rank(&part[i], 0);""",
     "test_simt_sampling.py"),
    ("rollback: cluster.sync before rank 0 updates the length removed",
     K / "kv_rollback.cuh",
     "  if (cluster > 1) cooperative_groups::this_cluster().sync();",
     "",
     "test_simt_cache.py"),
    ("rollback: off-by-one page of the destination",
     K / "kv_rollback.cuh",
     "s_off[2 * (j - m) + 1] = rb_page(p, b, dst / ps) * p.stride_page",
     "s_off[2 * (j - m) + 1] = rb_page(p, b, (dst + 1) / ps) * p.stride_page",
     "test_simt_cache.py"),
    ("rollback: stores not separated from loads by the barrier (overlap race)",
     K / "kv_rollback.cuh",
     """        stage[k] = __ldcg(reinterpret_cast<const Vec*>(base + src_byte));
      }
    }
    __syncthreads();""",
     """        stage[k] = __ldcg(reinterpret_cast<const Vec*>(base + src_byte));
      }
    }""",
     "test_simt_cache.py"),
    ("append_kv: lane stride off by one (skips a vector)",
     K / "append_kv.cuh",
     "for (int i = lane; i < row_vecs; i += group) {",
     "for (int i = lane; i < row_vecs - (row_vecs > 1); i += group) {",
     "test_simt_cache.py"),
]


def run(name, path, old, new, tests, timeout):
    text = path.read_text()
    if text.count(old) != 1:
        return "NOT APPLICABLE (pattern not found exactly once)", 0.0
    path.write_text(text.replace(old, new))
    t0 = time.time()
    try:
        # the kernel's suite, then the ThreadSanitizer race check (test_simt_races.py)
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "emulated",
                            "-p", "no:cacheprovider", tests, "test_simt_races.py"],
                           cwd=ROOT / "tests", capture_output=True, text=True, timeout=timeout)
        out = r.stdout.strip().splitlines()
        detail = out[-1] if out else ""
        # Only failing tests count: an error (a mutant that does not build, an import
        # failure) proves nothing about the suite.
        if r.returncode == 0:
            verdict = "MISSED"
        elif r.returncode == 1 and " failed" in detail:
            verdict = "caught"
        else:
            verdict = f"INVALID (pytest exit {r.returncode})"
    except subprocess.TimeoutExpired:
        verdict, detail = "caught (timeout)", ""
    finally:
        path.write_text(text)
    return f"{verdict}: {detail}", time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="substring of the mutation names to run")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args()
    missed = 0
    for name, path, old, new, tests in MUTATIONS:
        if args.only and args.only not in name:
            continue
        if args.list:
            print(name)
            continue
        verdict, secs = run(name, path, old, new, tests, args.timeout)
        missed += verdict.startswith(("MISSED", "NOT", "INVALID"))
        print(f"{name}\n    -> {verdict} ({secs:.0f} s)", flush=True)
    # rebuild the unmutated library so later runs do not start from a mutant's objects
    subprocess.run([sys.executable, "-c", "import simt_backend; simt_backend.build()"],
                   cwd=ROOT / "tests", check=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
