// CPU twins of append_kv and kv_rollback (see cache.h for the contract). Everything is
// validated in a first pass; the second pass only copies bytes.
#include "cpu/cache.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace specrt::cpu {
namespace {

[[noreturn]] void fail(const std::string& op, const std::string& msg) {
  throw std::invalid_argument("specrt::" + op + ": " + msg);
}

std::string at2(const char* name, int64_t i, int64_t j) {
  return std::string(name) + "[" + std::to_string(i) + ", " + std::to_string(j) + "]";
}

}  // namespace

void append_kv(const AppendKvParams& p) {
  const char* op = "append_kv";
  if (p.elem_size <= 0) fail(op, "element size must be positive");
  if (p.num_tokens < 0 || p.num_kv_heads < 0 || p.head_dim < 0 || p.num_pages < 0 ||
      p.page_size < 1)
    fail(op, "bad sizes");
  const int64_t num_slots = p.num_pages * p.page_size;
  for (int64_t n = 0; n < p.num_tokens; ++n) {
    const int64_t s = p.slot_mapping[n * p.slot_mapping_stride];
    if (s < -1 || s >= num_slots)
      fail(op, "slot_mapping[" + std::to_string(n) + "] = " + std::to_string(s) +
                   " is neither -1 nor in [0, " + std::to_string(num_slots) + ")");
  }
  if (p.num_kv_heads == 0 || p.head_dim == 0) return;

  const int64_t es = p.elem_size;
  const int64_t row_bytes = p.head_dim * es;
  // When heads are packed back to back in source and destination, a token is one memcpy.
  const bool packed = p.k_stride_h == p.head_dim && p.v_stride_h == p.head_dim &&
                      p.k_cache_stride_head == p.head_dim && p.v_cache_stride_head == p.head_dim;
  const auto* k = static_cast<const char*>(p.k);
  const auto* v = static_cast<const char*>(p.v);
  auto* kc = static_cast<char*>(p.k_cache);
  auto* vc = static_cast<char*>(p.v_cache);
  for (int64_t n = 0; n < p.num_tokens; ++n) {
    const int64_t s = p.slot_mapping[n * p.slot_mapping_stride];
    if (s < 0) continue;
    const int64_t page = s / p.page_size, off = s % p.page_size;
    const char* ks = k + n * p.k_stride_n * es;
    const char* vs = v + n * p.v_stride_n * es;
    char* kd = kc + (page * p.k_cache_stride_page + off * p.k_cache_stride_slot) * es;
    char* vd = vc + (page * p.v_cache_stride_page + off * p.v_cache_stride_slot) * es;
    if (packed) {
      std::memcpy(kd, ks, static_cast<size_t>(row_bytes * p.num_kv_heads));
      std::memcpy(vd, vs, static_cast<size_t>(row_bytes * p.num_kv_heads));
      continue;
    }
    for (int64_t h = 0; h < p.num_kv_heads; ++h) {
      std::memcpy(kd + h * p.k_cache_stride_head * es, ks + h * p.k_stride_h * es, row_bytes);
      std::memcpy(vd + h * p.v_cache_stride_head * es, vs + h * p.v_stride_h * es, row_bytes);
    }
  }
}

void kv_rollback(const KvRollbackParams& p) {
  const char* op = "kv_rollback";
  if (p.elem_size <= 0) fail(op, "element size must be positive");
  if (p.batch < 0 || p.num_layers < 0 || p.num_pages < 0 || p.page_size < 1 ||
      p.num_kv_heads < 0 || p.head_dim < 0 || p.max_pages < 0 || p.max_t < 0)
    fail(op, "bad sizes");
  const int64_t ps = p.page_size;
  const int64_t capacity = p.max_pages * ps;  // positions a block-table row can back
  auto n_of = [&](int64_t b) {
    return rollback_path_len(p.num_accepted[b * p.num_accepted_stride], p.max_t);
  };
  auto path_at = [&](int64_t b, int64_t j) {
    return p.path[b * p.path_stride_b + j * p.path_stride_t];
  };
  auto page_at = [&](int64_t b, int64_t i) {
    return p.block_table[b * p.block_table_stride_b + i * p.block_table_stride_p];
  };

  // ---- pass 1: validate; remember what moves ----
  struct Move {
    int64_t b, c, n, first_moved;
  };
  std::vector<Move> moves;
  std::vector<std::pair<int32_t, int64_t>> written_pages;  // (page id, sequence)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t na = p.num_accepted[b * p.num_accepted_stride];
    const int64_t n = n_of(b);
    if (n < 0)
      fail(op, "num_accepted[" + std::to_string(b) + "] = " + std::to_string(na) +
                   " is outside [-1, " + std::to_string(p.max_t - 1) + "]");
    if (n == 0) continue;
    int64_t first_moved = n;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t pj = path_at(b, j);
      if (!rollback_entry_ok(j, pj, j > 0 ? path_at(b, j - 1) : 0, p.max_t))
        fail(op, at2("path", b, j) + " = " + std::to_string(pj) +
                     (j == 0 ? " (a path starts at the root 0)"
                             : " (path entries must increase strictly and stay below max_T = " +
                                   std::to_string(p.max_t) + ")"));
      if (pj != j && first_moved == n) first_moved = j;
    }
    const int64_t c = p.committed_lens[b * p.committed_lens_stride];
    if (c < 0)
      fail(op, "committed_lens[" + std::to_string(b) + "] = " + std::to_string(c) + " < 0");
    if (c + n > std::numeric_limits<int32_t>::max())
      fail(op, "committed_lens[" + std::to_string(b) + "] would overflow int32");
    const int64_t last = c + path_at(b, n - 1);
    if (last >= capacity)
      fail(op, "position " + std::to_string(last) + " of sequence " + std::to_string(b) +
                   " is past the " + std::to_string(capacity) + " positions its block table holds");
    for (int64_t i = c / ps; i <= last / ps; ++i) {
      const int32_t page = page_at(b, i);
      if (page < 0 || page >= p.num_pages)
        fail(op, at2("block_table", b, i) + " = " + std::to_string(page) + " is outside [0, " +
                     std::to_string(p.num_pages) + ")");
      if (i >= (c + first_moved) / ps && first_moved < n) written_pages.emplace_back(page, b);
    }
    if (first_moved < n) moves.push_back({b, c, n, first_moved});
  }
  // Positions of different sequences (or of one sequence) that share a page would make the
  // result depend on the copy order: refuse such tables.
  std::sort(written_pages.begin(), written_pages.end());
  for (size_t i = 1; i < written_pages.size(); ++i)
    if (written_pages[i].first == written_pages[i - 1].first)
      fail(op, "page " + std::to_string(written_pages[i].first) + " backs moved positions of " +
                   (written_pages[i].second == written_pages[i - 1].second
                        ? "sequence " + std::to_string(written_pages[i].second) + " twice"
                        : "sequences " + std::to_string(written_pages[i - 1].second) + " and " +
                              std::to_string(written_pages[i].second)));

  // ---- pass 2: move ----
  const int64_t es = p.elem_size;
  const bool packed = p.stride_head == p.head_dim;
  const size_t row_bytes = static_cast<size_t>(p.head_dim * es);
  auto* cache = static_cast<char*>(p.kv_cache);
  std::vector<std::pair<int64_t, int64_t>> offs;  // (src, dst) byte offsets within a plane
  for (const Move& mv : moves) {
    offs.clear();
    for (int64_t j = mv.first_moved; j < mv.n; ++j) {
      const int64_t src = mv.c + path_at(mv.b, j), dst = mv.c + j;
      offs.emplace_back(
          (page_at(mv.b, src / ps) * p.stride_page + (src % ps) * p.stride_slot) * es,
          (page_at(mv.b, dst / ps) * p.stride_page + (dst % ps) * p.stride_slot) * es);
    }
    // NOTE: copying entry by entry in ascending j, with no staging, still reads every source
    // before it is overwritten. Entry j reads position path[j] and writes position j, and a path
    // climbs strictly from 0, so path[k] >= k for all k. An earlier entry i < j wrote position
    // i < j <= path[j]: not j's source. A later entry k > j reads path[k] >= k > j: not j's
    // destination. (Distinct pages per position, checked above, carry this from logical
    // positions to memory.)
    for (int64_t l = 0; l < p.num_layers; ++l) {
      for (int64_t kv = 0; kv < 2; ++kv) {
        char* plane = cache + (l * p.stride_layer + kv * p.stride_kv) * es;
        for (const auto& [src, dst] : offs) {
          if (packed) {
            std::memcpy(plane + dst, plane + src, row_bytes * static_cast<size_t>(p.num_kv_heads));
            continue;
          }
          for (int64_t h = 0; h < p.num_kv_heads; ++h)
            std::memcpy(plane + dst + h * p.stride_head * es, plane + src + h * p.stride_head * es,
                        row_bytes);
        }
      }
    }
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = n_of(b);
    if (n > 0) p.committed_lens[b * p.committed_lens_stride] += static_cast<int32_t>(n);
  }
}

}  // namespace specrt::cpu
