// CPU twin of csrc/kernels/rejection_sampling.cuh. Sequences are processed one after the
// other; per sequence at most one processed row (plus its logits) is held at a time, so memory
// is O(vocab) whatever the tree size. Decisions go through kernels/sampling_rules.cuh; sums are
// accumulated in fp64 in token order (see that header for the shared numerics).
#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <utility>
#include <vector>

namespace specrt::cpu {
namespace {

namespace R = specrt::rules;

// Scratch of one sequence's walk: the logits of the current row and its processed weights.
struct RowWork {
  std::vector<float> z;
  std::vector<float> w;
  std::vector<float> sel;
  std::vector<std::pair<float, int32_t>> by_logit;
  explicit RowWork(int64_t vocab) : z(vocab), w(vocab) {}
};

struct RowStats {
  bool valid;
  float zmax;
  int64_t argmax;
};

RowStats load_row(const void* base, LogitsDtype dt, int64_t row_stride, int64_t row, int64_t vocab,
                  float* z) {
  const size_t elem = dt == LogitsDtype::kFloat32 ? 4 : 2;
  const void* ptr = static_cast<const char*>(base) + static_cast<size_t>(row * row_stride) * elem;
  RowStats s{true, -INFINITY, 0};
  for (int64_t j = 0; j < vocab; ++j) {
    const float v = R::load_logit(ptr, j, dt);
    z[j] = v;
    if (R::is_bad_logit(v)) s.valid = false;
    if (R::argmax_better(v, j, s.zmax, s.argmax)) {
      s.zmax = v;
      s.argmax = j;
    }
  }
  if (R::row_max_is_invalid(s.zmax)) s.valid = false;
  return s;
}

// Processed weights of a valid row at temperature t > 0: w_j = exp((z_j - max) / t) on the
// tokens kept by top-k / top-p, 0 elsewhere. Returns their sum (fp64, token order).
double process_row(RowWork& ws, const RowStats& st, int64_t vocab, float t, int32_t top_k,
                   float top_p) {
  const float* z = ws.z.data();
  float* w = ws.w.data();
  float kth = -INFINITY;
  const bool use_k = R::top_k_active(top_k, vocab);
  if (use_k) {
    ws.sel.assign(z, z + vocab);
    std::nth_element(ws.sel.begin(), ws.sel.begin() + (top_k - 1), ws.sel.end(),
                     std::greater<float>());
    kth = ws.sel[top_k - 1];
  }
  double sum = 0.0;
  for (int64_t j = 0; j < vocab; ++j) {
    const float v = (!use_k || R::top_k_keep(z[j], kth)) ? R::softmax_weight(z[j], st.zmax, t) : 0.f;
    w[j] = v;
    sum += v;
  }
  if (!R::top_p_active(top_p)) return sum;

  // Walk the distinct logit levels from the top; the mass "strictly larger" than a level is
  // the mass of all earlier levels. Once a level is cut every lower one is too (monotone).
  const double inv = 1.0 / sum;
  ws.by_logit.clear();
  for (int64_t j = 0; j < vocab; ++j)
    if (w[j] > 0.f) ws.by_logit.emplace_back(z[j], static_cast<int32_t>(j));
  std::sort(ws.by_logit.begin(), ws.by_logit.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  double mass_above = 0.0;
  size_t i = 0;
  bool cut = false;
  while (i < ws.by_logit.size()) {
    const float level = ws.by_logit[i].first;
    size_t e = i;
    double level_mass = 0.0;
    while (e < ws.by_logit.size() && ws.by_logit[e].first == level) {
      level_mass += R::normalize(w[ws.by_logit[e].second], inv);
      ++e;
    }
    if (!cut && !R::top_p_keep(level, st.zmax, mass_above, top_p)) cut = true;
    if (cut)
      for (size_t k = i; k < e; ++k) w[ws.by_logit[k].second] = 0.f;
    mass_above += level_mass;
    i = e;
  }
  sum = 0.0;
  for (int64_t j = 0; j < vocab; ++j) sum += w[j];
  return sum;
}

// Inverse-CDF draw from r[0..vocab) with uniform u; -1 when r is all zero.
int64_t draw(const float* r, int64_t vocab, float u) {
  double total = 0.0;
  for (int64_t j = 0; j < vocab; ++j) total += r[j];
  R::CdfScan scan(R::cdf_threshold(u, total), 0.0);
  for (int64_t j = 0; j < vocab; ++j) {
    scan.push(j, r[j]);
    if (scan.chosen >= 0) return scan.chosen;
  }
  return scan.result();
}

std::string validate_tree(const RejectionSampleParams& p) {
  if (p.batch_size < 0) return "batch size must be >= 0";
  if (p.vocab_size <= 0 || p.vocab_size > INT32_MAX) return "vocab size must be in [1, 2^31)";
  if (p.node_indptr[0] != 0) return "node_indptr[0] must be 0";
  for (int64_t b = 0; b < p.batch_size; ++b) {
    const int64_t lo = p.node_indptr[b], hi = p.node_indptr[b + 1];
    const int64_t n = hi - lo;
    if (n < 1)
      return "node_indptr must be increasing (every sequence needs a root): sequence " +
             std::to_string(b) + " has " + std::to_string(n) + " nodes";
    if (hi > p.total_nodes)
      return "node_indptr[" + std::to_string(b + 1) + "] = " + std::to_string(hi) +
             " exceeds the number of nodes " + std::to_string(p.total_nodes);
    if (n > p.max_t)
      return "sequence " + std::to_string(b) + " has " + std::to_string(n) +
             " nodes but the outputs hold max_T = " + std::to_string(p.max_t);
    if (p.parents[lo] != -1)
      return "parents of the root (local node 0) of sequence " + std::to_string(b) +
             " must be -1, got " + std::to_string(p.parents[lo]);
    const bool needs_chain =
        p.draft_probs != nullptr && !R::is_greedy(p.req.temperature[b]);
    for (int64_t i = 1; i < n; ++i) {
      const int32_t par = p.parents[lo + i];
      if (par < 0 || par >= i)
        return "parents must form a tree in topological order (0 <= parent < node): sequence " +
               std::to_string(b) + ", local node " + std::to_string(i) + " has parent " +
               std::to_string(par);
      if (needs_chain && par != i - 1)
        return "draft_probs requires chains (parents = -1, 0, 1, ...): sequence " +
               std::to_string(b) + ", local node " + std::to_string(i) + " has parent " +
               std::to_string(par);
      const int32_t tok = p.draft_tokens[lo + i];
      if (tok < 0 || tok >= p.vocab_size)
        return "draft token out of range [0, " + std::to_string(p.vocab_size) + "): node " +
               std::to_string(lo + i) + " has token " + std::to_string(tok);
    }
  }
  if (p.node_indptr[p.batch_size] != p.total_nodes)
    return "node_indptr[B] = " + std::to_string(p.node_indptr[p.batch_size]) +
           " must equal the number of nodes " + std::to_string(p.total_nodes);
  return {};
}

void verify_sequence(const RejectionSampleParams& p, int64_t b, RowWork& ws,
                     std::vector<int32_t>& first_child, std::vector<int32_t>& next_sibling) {
  const int64_t lo = p.node_indptr[b], n = p.node_indptr[b + 1] - lo, vocab = p.vocab_size;
  int32_t* toks_out = p.out_tokens + b * p.out_tokens_row_stride;
  int32_t* path_out = p.out_path + b * p.out_path_row_stride;
  std::fill(toks_out, toks_out + p.max_t, -1);
  std::fill(path_out, path_out + p.max_t, -1);
  p.out_num_accepted[b] = -1;

  // A sequence with any invalid row (NaN, +inf, all -inf) is rejected as a whole.
  for (int64_t i = 0; i < n; ++i)
    if (!load_row(p.target_logits, p.logits_dtype, p.logits_row_stride, lo + i, vocab, ws.z.data())
             .valid)
      return;

  // Children in increasing index order: build the lists backwards.
  first_child.assign(n, -1);
  next_sibling.assign(n, -1);
  for (int64_t i = n - 1; i >= 1; --i) {
    const int32_t par = p.parents[lo + i];
    next_sibling[i] = first_child[par];
    first_child[par] = static_cast<int32_t>(i);
  }
  const float t = p.req.temperature[b];
  const int32_t top_k = p.req.top_k[b];
  const float top_p = p.req.top_p[b];
  auto unif = [&](int64_t i) {
    return p.uniforms ? p.uniforms[lo + i]
                      : philox_uniform(p.req.seed[b], p.req.offset[b], static_cast<uint32_t>(i));
  };
  auto row = [&](int64_t c) {
    return load_row(p.target_logits, p.logits_dtype, p.logits_row_stride, lo + c, vocab,
                    ws.z.data());
  };

  int64_t c = 0, accepted = 0;
  path_out[0] = 0;
  int64_t final_token = -1;
  if (R::is_greedy(t)) {
    while (true) {
      const int64_t a = row(c).argmax;
      int32_t ch = first_child[c];
      while (ch >= 0 && p.draft_tokens[lo + ch] != a) ch = next_sibling[ch];
      if (ch < 0) {
        final_token = a;
        break;
      }
      toks_out[accepted] = static_cast<int32_t>(a);
      path_out[++accepted] = ch;
      c = ch;
    }
  } else if (p.draft_probs != nullptr) {
    while (true) {
      const RowStats st = row(c);
      const double sum = process_row(ws, st, vocab, t, top_k, top_p);
      const double inv = 1.0 / sum;
      const float u0 = unif(0);
      if (c == n - 1) {  // every draft accepted: bonus token from p_{T-1}
        final_token = draw(ws.w.data(), vocab, u0);
        break;
      }
      const int32_t x = p.draft_tokens[lo + c + 1];
      const float* q = p.draft_probs + (lo + c) * p.draft_probs_row_stride;
      if (R::accept_with_draft(unif(c + 1), q[x], R::normalize(ws.w[x], inv))) {
        toks_out[accepted] = x;
        path_out[++accepted] = static_cast<int32_t>(c + 1);
        ++c;
        continue;
      }
      float* r = ws.w.data();
      for (int64_t j = 0; j < vocab; ++j) r[j] = R::residual(R::normalize(r[j], inv), q[j]);
      final_token = draw(r, vocab, u0);
      if (final_token < 0) {  // p == q up to rounding: the residual is empty
        process_row(ws, st, vocab, t, top_k, top_p);
        final_token = draw(ws.w.data(), vocab, u0);
      }
      break;
    }
  } else {
    while (true) {
      const RowStats st = row(c);
      double sum_r = process_row(ws, st, vocab, t, top_k, top_p);
      int32_t ch = first_child[c];
      for (; ch >= 0; ch = next_sibling[ch]) {
        const int32_t x = p.draft_tokens[lo + ch];
        if (R::accept_deterministic(unif(ch), sum_r, ws.w[x])) break;
        sum_r -= ws.w[x];  // recursive rejection: the tried sibling leaves the residual
        ws.w[x] = 0.f;
      }
      if (ch >= 0) {
        toks_out[accepted] = p.draft_tokens[lo + ch];
        path_out[++accepted] = ch;
        c = ch;
        continue;
      }
      const float u0 = unif(0);
      final_token = draw(ws.w.data(), vocab, u0);
      if (final_token < 0) {  // every supported token was tried: fall back to p_c
        process_row(ws, st, vocab, t, top_k, top_p);
        final_token = draw(ws.w.data(), vocab, u0);
      }
      break;
    }
  }
  toks_out[accepted] = static_cast<int32_t>(final_token);
  p.out_num_accepted[b] = static_cast<int32_t>(accepted);
}

}  // namespace

std::string rejection_sample(const RejectionSampleParams& p) {
  std::string err = validate_tree(p);
  if (!err.empty()) return err;
  if (p.batch_size == 0) return {};
  RowWork ws(p.vocab_size);
  std::vector<int32_t> first_child, next_sibling;
  for (int64_t b = 0; b < p.batch_size; ++b) verify_sequence(p, b, ws, first_child, next_sibling);
  return {};
}

std::string sample(const SampleParams& p) {
  if (p.num_rows < 0) return "number of rows must be >= 0";
  if (p.vocab_size <= 0 || p.vocab_size > INT32_MAX) return "vocab size must be in [1, 2^31)";
  if (p.num_rows == 0) return {};
  RowWork ws(p.vocab_size);
  const int64_t vocab = p.vocab_size;
  for (int64_t i = 0; i < p.num_rows; ++i) {
    const RowStats st =
        load_row(p.logits, p.logits_dtype, p.logits_row_stride, i, vocab, ws.z.data());
    float* probs = p.out_probs ? p.out_probs + i * p.out_probs_row_stride : nullptr;
    if (!st.valid) {
      p.out_tokens[i] = -1;
      if (probs) std::fill(probs, probs + vocab, 0.f);
      continue;
    }
    const float t = p.req.temperature[i];
    if (R::is_greedy(t)) {
      p.out_tokens[i] = static_cast<int32_t>(st.argmax);
      if (probs) {
        std::fill(probs, probs + vocab, 0.f);
        probs[st.argmax] = 1.f;
      }
      continue;
    }
    const double sum = process_row(ws, st, vocab, t, p.req.top_k[i], p.req.top_p[i]);
    const float u = p.uniforms ? p.uniforms[i] : philox_uniform(p.req.seed[i], p.req.offset[i], 0);
    p.out_tokens[i] = static_cast<int32_t>(draw(ws.w.data(), vocab, u));
    if (probs) {
      const double inv = 1.0 / sum;
      for (int64_t j = 0; j < vocab; ++j) probs[j] = R::normalize(ws.w[j], inv);
    }
  }
  return {};
}

}  // namespace specrt::cpu
