// SPDX-License-Identifier: Apache-2.0
// Exact decode attention on the CPU over the tokens A2ATS selected, read straight from the host
// mirror (no cached KV crosses PCIe). Work items are (batch, KV head, token split); the G query
// heads of a KV head share each key/value row load. Each split keeps a flash-decoding partial
// (running max m, sum l, unnormalised accumulator) that a second pass merges; all math in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "kvcomp/host_mirror.h"

namespace kvcomp {
namespace {

#ifdef KVCOMP_X86
KVCOMP_BEGIN_AVX512
namespace avx512 {
#include "attention_kernels.inc"
}  // namespace avx512
KVCOMP_END_ISA
KVCOMP_BEGIN_AVX2
namespace avx2 {
#include "attention_kernels.inc"
}  // namespace avx2
KVCOMP_END_ISA
#endif
namespace generic {
#include "attention_kernels.inc"
}  // namespace generic

// The inner loops of the current ISA (cpu_isa.h).
struct Kernels {
  void (*dot_rows)(const float*, int64_t, int64_t, const float*, float*);
  void (*axpy_rows)(float*, int64_t, int64_t, const float*, int64_t, const float*);
  void (*bf16_to_float)(const uint16_t*, int64_t, float*);
};

Kernels kernels() {
  switch (isa::current()) {
#ifdef KVCOMP_X86
    case isa::CpuIsa::avx512: return Kernels{avx512::dot_rows, avx512::axpy_rows, avx512::bf16_to_float};
    case isa::CpuIsa::avx2: return Kernels{avx2::dot_rows, avx2::axpy_rows, avx2::bf16_to_float};
#endif
    default: return Kernels{generic::dot_rows, generic::axpy_rows, generic::bf16_to_float};
  }
}

// Selected rows are scattered over the mirror, so the hardware prefetcher cannot guess the next one:
// ask for the rows kPrefetch positions ahead while the current one is being used.
constexpr int64_t kPrefetch = 4;
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1);
}

// Pointer to an fp32 view of one row: the row itself for fp32, else converted into `buf`.
template <typename scalar_t>
inline const float* as_float(const scalar_t* row, int64_t n, float* buf, const Kernels& kn) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    kn.bf16_to_float(reinterpret_cast<const uint16_t*>(row), n, buf);
    return buf;
  } else {
    for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<float>(row[c]);
    return buf;
  }
}

struct Dims {
  int64_t b, hq, hkv, g, d, dv, kmax, split, chunk;
};

template <typename scalar_t, typename index_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const index_t* idx, const int64_t* cnt,
         const int32_t* table, int64_t table_len, bool paged, const Dims& n, float scale, at::Tensor& out) {
  using detail::TokenAddr;
  const TokenAddr k_addr = detail::make_addr(k, paged, 1), v_addr = detail::make_addr(v, paged, 1);
  const int64_t k_sb = paged ? 0 : k.stride(0), v_sb = paged ? 0 : v.stride(0);
  const scalar_t* kbase = k.data_ptr<scalar_t>();
  const scalar_t* vbase = v.data_ptr<scalar_t>();
  const scalar_t* qbase = q.data_ptr<scalar_t>();
  const int64_t q_sb = q.stride(0), q_sh = q.stride(1);
  // Partials per work item: for each of the G heads [m, l, acc(Dv)].
  const int64_t part = n.g * (n.dv + 2);
  std::vector<float> partials(static_cast<size_t>(n.b * n.hkv * n.split * part));
  const int64_t items = n.b * n.hkv * n.split;
  const Kernels kn = kernels();

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(n.g * n.d), kbuf(n.d), vbuf(n.dv), logits(n.g * std::max<int64_t>(n.chunk, 1));
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / n.split, s = it % n.split;
      const int64_t bi = bh / n.hkv, h = bh % n.hkv;
      const int64_t c = cnt[bh];
      const int64_t j0 = std::min(s * n.chunk, c), j1 = std::min(j0 + n.chunk, c);
      float* p = partials.data() + it * part;
      float* m = p;               // [G]
      float* l = p + n.g;         // [G]
      float* acc = p + 2 * n.g;   // [G, Dv]
      std::fill(p, p + part, 0.f);
      for (int64_t i = 0; i < n.g; ++i) m[i] = -std::numeric_limits<float>::infinity();
      if (j0 >= j1) continue;
      for (int64_t i = 0; i < n.g; ++i) {
        const scalar_t* qr = qbase + bi * q_sb + (h * n.g + i) * q_sh;
        for (int64_t cc = 0; cc < n.d; ++cc) qf[i * n.d + cc] = static_cast<float>(qr[cc]) * scale;
      }
      TokenAddr ka = k_addr, va = v_addr;  // per item: the block-table row depends on the batch
      ka.table = va.table = table ? table + bi * table_len : nullptr;
      const index_t* ids = idx + bh * n.kmax;
      const int64_t len = j1 - j0;
      for (int64_t j = 0; j < len; ++j) {
        if (j + kPrefetch < len) {
          prefetch_row(kbase + bi * k_sb + ka.offset(h, static_cast<int64_t>(ids[j0 + j + kPrefetch])),
                       n.d * static_cast<int64_t>(sizeof(scalar_t)));
        }
        const int64_t t = static_cast<int64_t>(ids[j0 + j]);
        const float* kr = as_float(kbase + bi * k_sb + ka.offset(h, t), n.d, kbuf.data(), kn);
        float dots[64];
        // G <= 64 in every real model; larger groups go through logits directly, one head at a time.
        if (n.g <= 64) {
          kn.dot_rows(qf.data(), n.g, n.d, kr, dots);
          for (int64_t i = 0; i < n.g; ++i) logits[i * len + j] = dots[i];
        } else {
          for (int64_t i = 0; i < n.g; ++i) kn.dot_rows(qf.data() + i * n.d, 1, n.d, kr, &logits[i * len + j]);
        }
      }
      for (int64_t i = 0; i < n.g; ++i) {
        float* li = logits.data() + i * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) mx = std::max(mx, li[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          li[j] = std::exp(li[j] - mx);
          sum += li[j];
        }
        m[i] = mx;
        l[i] = sum;
      }
      for (int64_t j = 0; j < len; ++j) {
        if (j + kPrefetch < len) {
          prefetch_row(vbase + bi * v_sb + va.offset(h, static_cast<int64_t>(ids[j0 + j + kPrefetch])),
                       n.dv * static_cast<int64_t>(sizeof(scalar_t)));
        }
        const int64_t t = static_cast<int64_t>(ids[j0 + j]);
        const float* vr = as_float(vbase + bi * v_sb + va.offset(h, t), n.dv, vbuf.data(), kn);
        kn.axpy_rows(acc, n.g, n.dv, logits.data() + j, len, vr);
      }
    }
  });

  // Merge the splits of each (batch, query head) and write out in q's dtype.
  scalar_t* obase = out.data_ptr<scalar_t>();
  at::parallel_for(0, n.b * n.hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> res(n.dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / n.hkv, h = bh % n.hkv;
      for (int64_t i = 0; i < n.g; ++i) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < n.split; ++s) mx = std::max(mx, partials[(bh * n.split + s) * part + i]);
        float sum = 0.f;
        std::fill(res.begin(), res.end(), 0.f);
        for (int64_t s = 0; s < n.split; ++s) {
          const float* p = partials.data() + (bh * n.split + s) * part;
          if (p[n.g + i] == 0.f) continue;  // empty split
          const float w = std::exp(p[i] - mx);
          sum += w * p[n.g + i];
          const float* a = p + 2 * n.g + i * n.dv;
          for (int64_t c = 0; c < n.dv; ++c) res[c] += w * a[c];
        }
        scalar_t* o = obase + (bi * n.hq + h * n.g + i) * n.dv;
        const float inv = 1.f / sum;
        for (int64_t c = 0; c < n.dv; ++c) o[c] = static_cast<scalar_t>(res[c] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx,
                                const at::Tensor& count, const std::optional<at::Tensor>& block_table, double scale) {
  using namespace detail;
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  check_cpu(idx, "idx");
  check_cpu(count, "count");
  check_dim(q, 3, "q", "[B, Hq, D] (one decode query per sequence)");
  check_float_dtype(q, "q");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ",
              v.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, "k and v must both be dense [B, Hkv, T, D] or paged "
              "[num_blocks, block_size, Hkv, D], got k ", shape_str(k), ", v ", shape_str(v));
  const bool paged = block_table.has_value();
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = paged ? k.size(2) : k.size(1);
  const int64_t dv = v.size(3);
  TORCH_CHECK_VALUE(k.size(3) == d, "k head dim ", k.size(3), " differs from q head dim ", d);
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "q heads Hq=", hq, " must be a multiple of the KV heads Hkv=", hkv);
  if (paged) {
    TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == hkv,
                "paged v must be [num_blocks, block_size, Hkv, Dv] matching k ", shape_str(k), ", got ", shape_str(v));
  } else {
    TORCH_CHECK_VALUE(k.size(0) == b && v.size(0) == b && v.size(1) == hkv && v.size(2) == k.size(2),
                "dense k, v must be [B, Hkv, T, D|Dv] with B=", b, ", got k ", shape_str(k), ", v ", shape_str(v));
  }
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_dim(idx, 3, "idx", "[B, Hkv, K]");
  check_index_dtype(idx, "idx");
  check_contiguous(idx, "idx");
  TORCH_CHECK_VALUE(idx.size(0) == b && idx.size(1) == hkv, "idx must be [B, Hkv, K] = [", b, ", ", hkv, ", K], got ",
              shape_str(idx));
  check_dim(count, 2, "count", "[B, Hkv]");
  check_index_dtype(count, "count");
  TORCH_CHECK_VALUE(count.size(0) == b && count.size(1) == hkv, "count must be [B, Hkv] = [", b, ", ", hkv, "], got ",
              shape_str(count));
  const int64_t kmax = idx.size(2);
  const at::Tensor cnt = count.to(at::kLong).contiguous();
  const int64_t* cp = cnt.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * hkv; ++i) {
    TORCH_CHECK_VALUE(cp[i] >= 1 && cp[i] <= kmax, "count[", i / hkv, ", ", i % hkv, "] = ", cp[i],
                " must be in [1, K] with K=", kmax, " (every query sees at least one token)");
  }
  const int32_t* table = nullptr;
  int64_t table_len = 0;
  if (paged) {
    const at::Tensor& bt = *block_table;
    check_cpu(bt, "block_table");
    check_dim(bt, 2, "block_table", "[B, max_blocks]");
    TORCH_CHECK_VALUE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    check_contiguous(bt, "block_table");
    TORCH_CHECK_VALUE(bt.size(0) == b, "block_table has ", bt.size(0), " rows but q has B=", b);
    table = bt.data_ptr<int32_t>();
    table_len = bt.size(1);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a positive finite number, got ", scale);

  auto out = at::empty({b, hq, dv}, q.options());
  if (b == 0 || hq == 0) return out;
  Dims n{b, hq, hkv, hq / hkv, d, dv, kmax, 1, kmax};
  // Split the selected tokens until there are about kItems work items, keeping at least kMinChunk
  // tokens per split so the merge stays cheap. Independent of at::get_num_threads() (1 inside a vLLM
  // worker that never set it): at::parallel_for spreads the items over whatever pool it has.
  constexpr int64_t kItems = 64, kMinChunk = 128;
  n.split = std::max<int64_t>(1, std::min((kItems + b * hkv - 1) / (b * hkv), (kmax + kMinChunk - 1) / kMinChunk));
  n.chunk = (kmax + n.split - 1) / n.split;

  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparse_attention_cpu", [&] {
    const index_t* ip = idx.data_ptr<index_t>();
    for (int64_t bh = 0; bh < b * hkv; ++bh) {
      check_token_ids(ip + bh * kmax, cp[bh], "idx", paged, paged ? 0 : k.size(2), paged ? k.size(0) : 0,
                      paged ? k.size(1) : 1, table ? table + (bh / hkv) * table_len : nullptr, table_len,
                      "block_table");
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_attention_cpu", [&] {
      run<scalar_t, index_t>(q, k, v, ip, cp, table, table_len, paged, n, static_cast<float>(scale), out);
    });
  });
  return out;
}

}  // namespace kvcomp
