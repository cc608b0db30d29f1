// Torch-free test of the CPU cache kernels (csrc/cpu/cache.h): an overlapping kv_rollback move
// (sources and destinations in the same pages, paths jumping across pages), a chain that must
// not move, a rejected sequence, bad input that must throw and write nothing, and append_kv.
// Every cache element holds a unique value encoding its (layer, kv, page, slot, head, dim), so a
// wrong copy shows up as a wrong tag. Returns non-zero on failure.
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "cpu/cache.h"

namespace {

int g_failures = 0;

#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                         \
    }                                                                       \
  } while (0)

constexpr int L = 2, P = 6, S = 4, H = 2, D = 3;

// uint16 elements: stands in for fp16/bf16 (the kernels only move bytes).
using Elem = uint16_t;

int64_t idx(int l, int kv, int page, int slot, int h, int d) {
  return ((((((int64_t)l * 2 + kv) * P + page) * S + slot) * H + h) * D) + d;
}

Elem tag(int l, int kv, int page, int slot, int h, int d) {
  return static_cast<Elem>(idx(l, kv, page, slot, h, d) + 1);
}

std::vector<Elem> fresh_cache() {
  std::vector<Elem> c(static_cast<size_t>(L) * 2 * P * S * H * D);
  for (int l = 0; l < L; ++l)
    for (int kv = 0; kv < 2; ++kv)
      for (int pg = 0; pg < P; ++pg)
        for (int s = 0; s < S; ++s)
          for (int h = 0; h < H; ++h)
            for (int d = 0; d < D; ++d) c[idx(l, kv, pg, s, h, d)] = tag(l, kv, pg, s, h, d);
  return c;
}

struct Batch {
  // Three sequences: 0 moves an overlapping path, 1 is a chain, 2 was rejected.
  std::vector<int32_t> block_table = {4, 1, 3,  // seq 0: pages 4, 1, 3 (non-monotone)
                                      0, 5, -1,
                                      2, -1, -1};
  std::vector<int32_t> lens = {2, 1, 3};
  static constexpr int kMaxT = 8;
  std::vector<int32_t> path = {0, 3, 4, 6, 7, -1, -1, -1,  // seq 0: jumps 3 -> 1, 7 -> 4
                               0, 1, 2, -1, -1, -1, -1, -1,
                               -1, -1, -1, -1, -1, -1, -1, -1};
  std::vector<int32_t> num_accepted = {4, 2, -1};
};

specrt::cpu::KvRollbackParams params(std::vector<Elem>& cache, Batch& bt) {
  specrt::cpu::KvRollbackParams p;
  p.elem_size = sizeof(Elem);
  p.kv_cache = cache.data();
  p.stride_head = D;
  p.stride_slot = (int64_t)H * D;
  p.stride_page = (int64_t)S * H * D;
  p.stride_kv = (int64_t)P * S * H * D;
  p.stride_layer = 2 * p.stride_kv;
  p.num_layers = L;
  p.num_pages = P;
  p.page_size = S;
  p.num_kv_heads = H;
  p.head_dim = D;
  p.block_table = bt.block_table.data();
  p.block_table_stride_b = 3;
  p.max_pages = 3;
  p.committed_lens = bt.lens.data();
  p.path = bt.path.data();
  p.path_stride_b = Batch::kMaxT;
  p.max_t = Batch::kMaxT;
  p.num_accepted = bt.num_accepted.data();
  p.batch = 3;
  return p;
}

void test_overlapping_move() {
  std::vector<Elem> cache = fresh_cache();
  const std::vector<Elem> before = cache;
  Batch bt;
  specrt::cpu::kv_rollback(params(cache, bt));
  // Sequence 0: committed 2, path 0,3,4,6,7 -> positions 2..6 take 2,5,6,8,9. Position p is at
  // page block_table[p / 4], slot p % 4. Destinations 3..6 are also sources (5, 6): overlap.
  const int32_t* row = bt.block_table.data();
  const int path0[] = {0, 3, 4, 6, 7};
  for (int l = 0; l < L; ++l)
    for (int kv = 0; kv < 2; ++kv)
      for (int j = 0; j < 5; ++j) {
        const int src = 2 + path0[j], dst = 2 + j;
        for (int h = 0; h < H; ++h)
          for (int d = 0; d < D; ++d)
            EXPECT(cache[idx(l, kv, row[dst / S], dst % S, h, d)] ==
                   tag(l, kv, row[src / S], src % S, h, d));
      }
  // Everything outside sequence 0's destinations 3..6 is untouched (2 stays in place).
  int changed = 0;
  for (size_t i = 0; i < cache.size(); ++i) changed += cache[i] != before[i];
  EXPECT(changed == L * 2 * 4 * H * D);
  EXPECT(bt.lens[0] == 7 && bt.lens[1] == 4 && bt.lens[2] == 3);
}

void test_bad_input_writes_nothing() {
  for (int which = 0; which < 5; ++which) {
    std::vector<Elem> cache = fresh_cache();
    const std::vector<Elem> before = cache;
    Batch bt;
    // Sequence 0 is valid and moves; the defect sits in sequence 1 or 2.
    if (which == 0) bt.path[8 + 2] = 1;                // not increasing
    if (which == 1) bt.num_accepted[2] = Batch::kMaxT;  // out of range
    if (which == 2) bt.block_table[3 + 0] = P;          // page id out of range
    if (which == 3) bt.lens[1] = 6;                     // position 8 hits the -1 padding
    if (which == 4) bt.path[8] = 1;                     // does not start at the root
    const std::vector<int32_t> lens_before = bt.lens;
    bool threw = false;
    try {
      specrt::cpu::kv_rollback(params(cache, bt));
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    EXPECT(threw);
    EXPECT(cache == before);
    EXPECT(bt.lens == lens_before);
  }
}

void test_append_kv() {
  std::vector<Elem> cache = fresh_cache();
  const std::vector<Elem> before = cache;
  // k, v: 3 rows with heads padded to a stride of D + 1.
  std::vector<Elem> k(3 * H * (D + 1)), v(3 * H * (D + 1));
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<Elem>(50000 + i);
    v[i] = static_cast<Elem>(60000 + i);
  }
  std::vector<int64_t> slots = {P * S - 1, -1, 5};
  specrt::cpu::AppendKvParams p;
  p.elem_size = sizeof(Elem);
  p.k = k.data();
  p.k_stride_n = H * (D + 1);
  p.k_stride_h = D + 1;
  p.v = v.data();
  p.v_stride_n = H * (D + 1);
  p.v_stride_h = D + 1;
  const int l = 1;
  p.k_cache = cache.data() + idx(l, 0, 0, 0, 0, 0);
  p.v_cache = cache.data() + idx(l, 1, 0, 0, 0, 0);
  p.k_cache_stride_page = p.v_cache_stride_page = (int64_t)S * H * D;
  p.k_cache_stride_slot = p.v_cache_stride_slot = (int64_t)H * D;
  p.k_cache_stride_head = p.v_cache_stride_head = D;
  p.slot_mapping = slots.data();
  p.num_tokens = 3;
  p.num_kv_heads = H;
  p.head_dim = D;
  p.num_pages = P;
  p.page_size = S;
  specrt::cpu::append_kv(p);
  int changed = 0;
  for (size_t i = 0; i < cache.size(); ++i) changed += cache[i] != before[i];
  EXPECT(changed == 2 * 2 * H * D);
  for (int n : {0, 2}) {
    const int64_t s = slots[n];
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) {
        EXPECT(cache[idx(l, 0, s / S, s % S, h, d)] == k[n * H * (D + 1) + h * (D + 1) + d]);
        EXPECT(cache[idx(l, 1, s / S, s % S, h, d)] == v[n * H * (D + 1) + h * (D + 1) + d]);
      }
  }
  // An out-of-range slot after valid ones: throws, writes nothing.
  cache = before;
  slots = {0, 1, P * S};
  p.k_cache = cache.data() + idx(l, 0, 0, 0, 0, 0);
  p.v_cache = cache.data() + idx(l, 1, 0, 0, 0, 0);
  p.slot_mapping = slots.data();
  bool threw = false;
  try {
    specrt::cpu::append_kv(p);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  EXPECT(cache == before);
}

}  // namespace

int main() {
  test_overlapping_move();
  test_bad_input_writes_nothing();
  test_append_kv();
  if (g_failures) {
    std::fprintf(stderr, "test_cache_cpu: %d failure(s)\n", g_failures);
    return 1;
  }
  std::printf("test_cache_cpu: OK\n");
  return 0;
}
