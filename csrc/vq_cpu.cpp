// SPDX-License-Identifier: Apache-2.0
// A2ATS decode retrieval on the CPU: the centroid score table (vq_lut) and the exact top-K token
// selection over a paged int16 code cache (vq_topk), registered as torch.ops.kvcomp_C.vq_lut /
// vq_topk and called from kvcomp/ops/vq.py. Contracts: kvcomp.ref.vq_lut and
// kvcomp.ref.think_paged.paged_vq_topk (idx padded to kmax columns as kvcomp::vq_topk does).
//
// vq_topk per (sequence, KV head), one at::parallel_for work item each, O(T + G * 32 * C):
//  1. gather the L valid codes through the block table into a contiguous buffer (range-checked)
//     and count each code (histogram);
//  2. per query head of the group, the k-th largest score as a 32-bit order-preserving key tau,
//     found bit by bit over the distinct codes present (the histogram weights them), and
//     need = k - #(score > tau): the first `need` tokens scoring exactly tau are that head's;
//  3. one ascending scan emits the union (any head's score > tau, a tie still needed, a sink or a
//     local token), so indices come out sorted, exactly as the stable-sort reference picks them.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace kvcomp {
namespace {

using detail::check_cpu;
using detail::check_dim;
using detail::shape_str;

constexpr int64_t kMaxCodes = 32768;  // codes are int16

void check_int_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                    " must be an integer tensor, got ", t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
                    t.scalar_type());
}

// fp32 score -> key whose unsigned order is the float order; -0.0 keys like +0.0.
inline uint32_t score_key(float x) {
  if (x == 0.f) return 0x80000000u;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Largest key tau with #(tokens keyed >= tau) >= k (k >= 1), over `m` distinct keys with counts.
uint32_t kth_largest_key(const uint32_t* keys, const int32_t* counts, int64_t m, int64_t k) {
  uint32_t tau = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = tau | (1u << bit);
    int64_t n = 0;
    for (int64_t j = 0; j < m; ++j) n += keys[j] >= cand ? counts[j] : 0;
    if (n >= k) tau = cand;
  }
  return tau;
}

struct TopkArgs {
  int64_t b, hq, hkv, g, nc, nb, bs, kmax, sink, local, table_len;
  int64_t s_cn, s_cs, s_ch;  // code_cache strides
};

// Flags per code: any head of the group keeps it outright / some head may keep it as a tie.
constexpr uint8_t kAbove = 1, kTie = 2;

void topk_item(const TopkArgs& a, int64_t bh, const float* lut, const int16_t* codes, const int64_t* table,
               int64_t len, int64_t topk, int32_t* idx, int32_t* count, std::vector<uint16_t>& buf,
               std::vector<int32_t>& picked,
               std::vector<int32_t>& hist, std::vector<uint32_t>& keys, std::vector<uint8_t>& flag,
               std::vector<uint8_t>& tie, std::atomic<int64_t>& bad_code) {
  const int64_t bi = bh / a.hkv, h = bh % a.hkv;
  const int64_t* row = table + bi * a.table_len;
  int32_t* out = idx + bh * a.kmax;
  int64_t n = 0;
  if (len > 0) {
    buf.resize(len);
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t t0 = 0; t0 < len; t0 += a.bs) {
      const int16_t* src = codes + row[t0 / a.bs] * a.s_cn + h * a.s_ch;
      const int64_t t1 = std::min(len, t0 + a.bs);
      for (int64_t t = t0; t < t1; ++t) {
        const uint16_t c = static_cast<uint16_t>(src[(t - t0) * a.s_cs]);  // negative codes wrap past nc
        if (c >= a.nc) {
          bad_code.store(static_cast<int16_t>(c), std::memory_order_relaxed);
          return;
        }
        buf[t] = c;
        ++hist[c];
      }
    }
    const int64_t k = std::min(topk, len);
    const int64_t sink_end = std::min(a.sink, len), local_start = std::max<int64_t>(len - a.local, 0);
    if (k == len || sink_end >= local_start) {
      for (int64_t t = 0; t < len; ++t) out[n++] = static_cast<int32_t>(t);
    } else {
      std::fill(flag.begin(), flag.end(), 0);
      std::vector<uint32_t> tau(a.g), present_keys;
      std::vector<int64_t> need(a.g, 0);
      std::vector<int32_t> present_counts;
      if (k > 0) {
        for (int64_t i = 0; i < a.g; ++i) {
          const float* l = lut + (bi * a.hq + h * a.g + i) * a.nc;
          uint32_t* ki = keys.data() + i * a.nc;
          present_keys.clear();
          present_counts.clear();
          for (int64_t c = 0; c < a.nc; ++c) {
            ki[c] = score_key(l[c]);
            if (hist[c]) {
              present_keys.push_back(ki[c]);
              present_counts.push_back(hist[c]);
            }
          }
          tau[i] = kth_largest_key(present_keys.data(), present_counts.data(),
                                   static_cast<int64_t>(present_keys.size()), k);
          int64_t above = 0;
          uint8_t* ti = tie.data() + i * a.nc;
          for (int64_t c = 0; c < a.nc; ++c) {
            above += ki[c] > tau[i] ? hist[c] : 0;
            flag[c] |= ki[c] > tau[i] ? kAbove : (ki[c] == tau[i] ? kTie : 0);
            ti[c] = ki[c] == tau[i];
          }
          need[i] = k - above;
        }
      }
      // branchless append into scratch (the selection is data-dependent, ~topk/T of the tokens)
      picked.resize(len);
      for (int64_t t = 0; t < len; ++t) {
        const uint16_t c = buf[t];
        const uint8_t f = flag[c];
        int64_t sel = (f & kAbove) | (t < sink_end) | (t >= local_start);
        if (f & kTie) {
          for (int64_t i = 0; i < a.g; ++i) {
            if (need[i] > 0 && tie[i * a.nc + c]) {
              --need[i];
              sel = 1;
            }
          }
        }
        picked[n] = static_cast<int32_t>(t);
        n += sel;
      }
      n = std::min(n, a.kmax);  // never more: the bound was checked against kmax before work
      std::copy(picked.begin(), picked.begin() + n, out);
    }
  }
  count[bh] = static_cast<int32_t>(n);
  const int32_t last = n ? out[n - 1] : 0;
  for (int64_t j = n; j < a.kmax; ++j) out[j] = last;
}

std::tuple<at::Tensor, at::Tensor> vq_topk_cpu(const at::Tensor& lut, const at::Tensor& code_cache,
                                                const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                const at::Tensor& topk, int64_t sink, int64_t local, int64_t kmax) {
  check_cpu(lut, "lut");
  check_cpu(code_cache, "code_cache");
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  check_cpu(topk, "topk");
  check_dim(lut, 3, "lut", "[B, Hq, C]");
  check_floating(lut, "lut");
  check_dim(code_cache, 3, "code_cache", "[num_blocks, block_size, Hkv]");
  TORCH_CHECK_VALUE(code_cache.scalar_type() == at::kShort, "code_cache must be int16, got ",
                    code_cache.scalar_type());
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_int_dtype(block_table, "block_table");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_int_dtype(seq_lens, "seq_lens");
  check_dim(topk, 1, "topk", "[B]");
  check_int_dtype(topk, "topk");
  TopkArgs a{};
  a.b = lut.size(0);
  a.hq = lut.size(1);
  a.nc = lut.size(2);
  a.nb = code_cache.size(0);
  a.bs = code_cache.size(1);
  a.hkv = code_cache.size(2);
  TORCH_CHECK_VALUE(a.hkv > 0 && a.hq % a.hkv == 0, "lut: ", a.hq, " query heads is not a multiple of ", a.hkv,
                    " KV heads (code_cache.shape[2])");
  TORCH_CHECK_VALUE(a.nc >= 1 && a.nc <= kMaxCodes, "lut must have 1 <= C <= ", kMaxCodes, " codes, got ", a.nc);
  TORCH_CHECK_VALUE(a.bs >= 1, "code_cache block_size must be >= 1, got ", shape_str(code_cache));
  TORCH_CHECK_VALUE(block_table.size(0) == a.b, "block_table has ", block_table.size(0), " rows but lut has B=", a.b);
  TORCH_CHECK_VALUE(seq_lens.size(0) == a.b, "seq_lens must have B=", a.b, " entries, got ", seq_lens.size(0));
  TORCH_CHECK_VALUE(topk.size(0) == a.b, "topk must have B=", a.b, " entries, got ", topk.size(0));
  TORCH_CHECK_VALUE(sink >= 0 && local >= 0, "sink and local must be >= 0, got ", sink, ", ", local);
  TORCH_CHECK_VALUE(kmax >= 1, "kmax must be >= 1, got ", kmax);
  a.g = a.hq / a.hkv;
  a.kmax = kmax;
  a.sink = sink;
  a.local = local;
  a.table_len = block_table.size(1);
  a.s_cn = code_cache.stride(0);
  a.s_cs = code_cache.stride(1);
  a.s_ch = code_cache.stride(2);
  const at::Tensor lens_t = seq_lens.to(at::kLong).contiguous(), topk_t = topk.to(at::kLong).contiguous();
  const at::Tensor table_t = block_table.to(at::kLong).contiguous();  // any strides in, one layout here
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t* tk = topk_t.data_ptr<int64_t>();
  const int64_t* table = table_t.data_ptr<int64_t>();
  for (int64_t bi = 0; bi < a.b; ++bi) {
    const int64_t len = lens[bi];
    TORCH_CHECK_VALUE(len >= 0 && len <= a.table_len * a.bs, "seq_lens[", bi, "]=", len, " must lie in [0, ",
                      a.table_len * a.bs, "] (max_blocks * block_size)");
    TORCH_CHECK_VALUE(tk[bi] >= 0, "topk[", bi, "]=", tk[bi], " must be >= 0");
    for (int64_t j = 0; j < (len + a.bs - 1) / a.bs; ++j) {
      const int64_t blk = table[bi * a.table_len + j];
      TORCH_CHECK_VALUE(blk >= 0 && blk < a.nb, "block_table[", bi, ", ", j, "]=", blk, " is outside the cache's ",
                        a.nb, " blocks");
    }
    const int64_t bound = std::min(len, a.g * std::min(tk[bi], len) + std::min(sink, len) + std::min(local, len));
    TORCH_CHECK_VALUE(bound <= kmax, "kmax=", kmax, " is too small: sequence ", bi, " may select ", bound,
                      " tokens (G * min(topk, seq_len) + sink + local)");
  }
  const at::Tensor lut_f = lut.to(at::kFloat).contiguous();
  auto idx = at::empty({a.b, a.hkv, kmax}, lut.options().dtype(at::kInt));
  auto count = at::empty({a.b, a.hkv}, lut.options().dtype(at::kInt));
  const float* lp = lut_f.data_ptr<float>();
  const int16_t* cp = code_cache.data_ptr<int16_t>();
  int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* np = count.data_ptr<int32_t>();
  std::atomic<int64_t> bad_code{-1};
  at::parallel_for(0, a.b * a.hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> buf;
    std::vector<int32_t> picked;
    std::vector<int32_t> hist(a.nc);
    std::vector<uint32_t> keys(a.g * a.nc);
    std::vector<uint8_t> flag(a.nc), tie(a.g * a.nc);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / a.hkv;
      topk_item(a, bh, lp, cp, table, lens[bi], tk[bi], ip, np, buf, picked, hist, keys, flag, tie, bad_code);
    }
  });
  const int64_t bad = bad_code.load();
  TORCH_CHECK_VALUE(bad < 0, "code_cache holds code ", bad, " outside [0, C=", a.nc, ") for a valid token");
  return {idx, count};
}

at::Tensor vq_lut_cpu(const at::Tensor& q_wrope, const at::Tensor& codebook, double scale) {
  check_cpu(q_wrope, "q_wrope");
  check_cpu(codebook, "codebook");
  check_dim(q_wrope, 3, "q_wrope", "[B, Hq, D]");
  check_dim(codebook, 3, "codebook", "[Hkv, C, D]");
  check_floating(q_wrope, "q_wrope");
  check_floating(codebook, "codebook");
  const int64_t b = q_wrope.size(0), hq = q_wrope.size(1), d = q_wrope.size(2);
  const int64_t hkv = codebook.size(0), nc = codebook.size(1);
  TORCH_CHECK_VALUE(codebook.size(2) == d, "codebook head dim ", codebook.size(2), " differs from q_wrope's ", d);
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "q_wrope: ", hq, " query heads is not a multiple of ", hkv,
                    " KV heads (codebook.shape[0])");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  // [B, Hkv, G, D] @ [1, Hkv, D, C]: one small GEMM per KV head, as the reference computes it
  const at::Tensor qf = q_wrope.to(at::kFloat).reshape({b, hkv, hq / hkv, d});
  at::Tensor lut = at::matmul(qf, codebook.to(at::kFloat).transpose(1, 2).unsqueeze(0));
  lut.mul_(scale);
  return lut.reshape({b, hq, nc});
}

}  // namespace
}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def("vq_lut(Tensor q_wrope, Tensor codebook, float scale) -> Tensor");
  m.def(
      "vq_topk(Tensor lut, Tensor code_cache, Tensor block_table, Tensor seq_lens, Tensor topk, int sink, "
      "int local, int kmax) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) {
  m.impl("vq_lut", &kvcomp::vq_lut_cpu);
  m.impl("vq_topk", &kvcomp::vq_topk_cpu);
}
