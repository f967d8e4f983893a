// SPDX-License-Identifier: Apache-2.0
// Exact decode attention on the CPU over the tokens A2ATS selected, read straight from the host
// mirror (no cached KV crosses PCIe). Work items are (batch, KV head, split of that head's selected
// ids); the G query heads of a KV head share each key/value row load (the selection is already the
// union over the GQA group). An item computes its rows' addresses once (ids ascending: the rows of a
// page come together), then walks them in tiles of kTile rows through the dense paged decode's tile
// loops (paged_decode_kernels.inc: G x tile logits in registers, online softmax, value rows read
// in their storage dtype and widened in registers), prefetching the next tile's rows. Each split
// keeps a flash-decoding partial (running max m, sum l, unnormalised accumulator) that a second
// pass merges; all math in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
#define KVCOMP_PD_AVX512 1
#include "paged_decode_kernels.inc"
#undef KVCOMP_PD_AVX512
}  // namespace avx512
KVCOMP_END_ISA
KVCOMP_BEGIN_AVX2
namespace avx2 {
#define KVCOMP_PD_AVX2 1
#include "paged_decode_kernels.inc"
#undef KVCOMP_PD_AVX2
}  // namespace avx2
KVCOMP_END_ISA
#endif
namespace generic {
#include "paged_decode_kernels.inc"
}  // namespace generic

template <typename T>
using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, const T* const*, const T* const*, int64_t, float*,
                        float*, float*, float*);

// The tile kernel of the current ISA (cpu_isa.h).
template <typename T>
TileFn<T> tile_fn() {
  switch (isa::current()) {
#ifdef KVCOMP_X86
    case isa::CpuIsa::avx512: return &avx512::tile_update<T>;
    case isa::CpuIsa::avx2: return &avx2::tile_update<T>;
#endif
    default: return &generic::tile_update<T>;
  }
}

// Rows per tile (the logits of a tile stay in L1), and how many rows ahead of the tile being computed
// are prefetched: one tile, as in paged_decode_cpu.cpp. At 32K tokens (Llama-3.1-8B layer, top-K 3%,
// ~3.9K rows per KV head) 8- to 64-row tiles and 0- to 128-row distances timed within the noise of
// this 2-core machine; the tile kernel itself (the dense decode's) is what made the difference.
constexpr int64_t kTile = 32, kAhead = kTile;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t b, hq, hkv, g, d, dv, kmax, split;
};

// Row addressing of one cache (dense [B, Hkv, T, D] or paged [num_blocks, block_size, Hkv, D]): the
// token -> (block, in-block offset) split is shared by K and V, a shift and mask where block_size
// is a power of two (vLLM's 16) instead of an integer division per row.
struct RowMap {
  bool paged;
  int64_t block_size, shift;  // shift >= 0: block_size == 1 << shift
  inline void split(int64_t t, const int32_t* table, int64_t& blk, int64_t& off) const {
    if (!paged) {
      blk = 0;
      off = t;
    } else if (shift >= 0) {
      blk = table ? table[t >> shift] : t >> shift;
      off = t & (block_size - 1);
    } else {
      blk = table ? table[t / block_size] : t / block_size;
      off = t % block_size;
    }
  }
};

// Asks for every cache line of rows [0, n) of the two pointer lists (the rows are scattered over
// the mirror, so the hardware prefetcher cannot guess them).
template <typename T>
inline void prefetch_rows(const T* const* krows, const T* const* vrows, int64_t n, int64_t kbytes, int64_t vbytes) {
  for (int64_t j = 0; j < n; ++j) {
    const char* kc = reinterpret_cast<const char*>(krows[j]);
    const char* vc = reinterpret_cast<const char*>(vrows[j]);
    for (int64_t o = 0; o < kbytes; o += 64) __builtin_prefetch(kc + o, 0, 3);
    for (int64_t o = 0; o < vbytes; o += 64) __builtin_prefetch(vc + o, 0, 3);
  }
}

template <typename T, typename index_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const index_t* idx, const int64_t* cnt,
         const int32_t* table, int64_t table_len, bool paged, const Dims& n, float scale, at::Tensor& out) {
  const detail::TokenAddr ka = detail::make_addr(k, paged, 1), va = detail::make_addr(v, paged, 1);
  const int64_t k_sb = paged ? 0 : k.stride(0), v_sb = paged ? 0 : v.stride(0);
  const int64_t k_blk = paged ? ka.stride_block : 0, v_blk = paged ? va.stride_block : 0;
  const int64_t bs = paged ? k.size(1) : 1;
  const RowMap map{paged, bs, (bs & (bs - 1)) == 0 ? static_cast<int64_t>(__builtin_ctzll(bs)) : -1};
  const T* kbase = k.const_data_ptr<T>();
  const T* vbase = v.const_data_ptr<T>();
  const T* qbase = q.const_data_ptr<T>();
  const int64_t q_sb = q.stride(0), q_sh = q.stride(1);
  const int64_t kbytes = n.d * static_cast<int64_t>(sizeof(T)), vbytes = n.dv * static_cast<int64_t>(sizeof(T));
  // Partials per work item: for each of the G heads [m, l, acc(Dv)].
  const int64_t part = n.g * (n.dv + 2);
  std::vector<float> partials(static_cast<size_t>(n.b * n.hkv * n.split * part));
  const int64_t items = n.b * n.hkv * n.split;
  const TileFn<T> fn = tile_fn<T>();

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(n.g * n.d), s(n.g * kTile);
    std::vector<const T*> krows, vrows;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / n.split, sp = it % n.split;
      const int64_t bi = bh / n.hkv, h = bh % n.hkv;
      const int64_t c = cnt[bh], chunk = (c + n.split - 1) / n.split;
      const int64_t j0 = std::min(sp * chunk, c), j1 = std::min(j0 + chunk, c), len = j1 - j0;
      float* m = partials.data() + it * part;  // [G]
      float* l = m + n.g;                      // [G]
      float* acc = l + n.g;                    // [G, Dv]
      std::fill(m, m + n.g, kNegInf);
      std::fill(l, l + n.g + n.g * n.dv, 0.f);
      if (len <= 0) continue;
      for (int64_t i = 0; i < n.g; ++i) {
        const T* qr = qbase + bi * q_sb + (h * n.g + i) * q_sh;
        for (int64_t cc = 0; cc < n.d; ++cc) qs[i * n.d + cc] = static_cast<float>(qr[cc]) * scale;
      }
      // Row pointers of the whole chunk first (ids are read in order), then tiles of kTile rows with
      // the rows kAhead positions on prefetched while the current tile is computed.
      krows.resize(len);
      vrows.resize(len);
      const int32_t* trow = table ? table + bi * table_len : nullptr;
      const T* kb = kbase + bi * k_sb + h * ka.stride_head;
      const T* vb = vbase + bi * v_sb + h * va.stride_head;
      const index_t* ids = idx + bh * n.kmax + j0;
      for (int64_t j = 0; j < len; ++j) {
        int64_t blk, off;
        map.split(static_cast<int64_t>(ids[j]), trow, blk, off);
        krows[j] = kb + blk * k_blk + off * ka.stride_tok;
        vrows[j] = vb + blk * v_blk + off * va.stride_tok;
      }
      prefetch_rows(krows.data(), vrows.data(), std::min(kAhead, len), kbytes, vbytes);
      for (int64_t t0 = 0; t0 < len; t0 += kTile) {
        const int64_t nt = std::min(kTile, len - t0);
        const int64_t p0 = t0 + kAhead, p1 = std::min(p0 + nt, len);
        if (p0 < p1) prefetch_rows(krows.data() + p0, vrows.data() + p0, p1 - p0, kbytes, vbytes);
        fn(qs.data(), n.g, n.d, n.dv, krows.data() + t0, vrows.data() + t0, nt, m, l, acc, s.data());
      }
    }
  });

  // Merge the splits of each (batch, query head) and write out in q's dtype.
  T* obase = out.data_ptr<T>();
  at::parallel_for(0, n.b * n.hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> res(n.dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / n.hkv, h = bh % n.hkv;
      for (int64_t i = 0; i < n.g; ++i) {
        float mx = kNegInf;
        for (int64_t sp = 0; sp < n.split; ++sp) mx = std::max(mx, partials[(bh * n.split + sp) * part + i]);
        float sum = 0.f;
        std::fill(res.begin(), res.end(), 0.f);
        for (int64_t sp = 0; sp < n.split; ++sp) {
          const float* p = partials.data() + (bh * n.split + sp) * part;
          if (p[n.g + i] == 0.f) continue;  // empty split
          const float w = std::exp(p[i] - mx);
          sum += w * p[n.g + i];
          const float* a = p + 2 * n.g + i * n.dv;
          for (int64_t cc = 0; cc < n.dv; ++cc) res[cc] += w * a[cc];
        }
        T* o = obase + (bi * n.hq + h * n.g + i) * n.dv;
        const float inv = 1.f / sum;
        for (int64_t cc = 0; cc < n.dv; ++cc) o[cc] = static_cast<T>(res[cc] * inv);
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
  Dims n{b, hq, hkv, hq / hkv, d, dv, kmax, 1};
  // Split each (sequence, KV head)'s selected ids into n.split equal chunks (of its own count) until
  // there are about kItems work items, keeping at least kMinChunk ids per split at K = kmax so the
  // merge stays cheap. Independent of at::get_num_threads() (1 inside a vLLM
  // worker that never set it): at::parallel_for spreads the items over whatever pool it has.
  constexpr int64_t kItems = 64, kMinChunk = 128;
  n.split = std::max<int64_t>(1, std::min((kItems + b * hkv - 1) / (b * hkv), (kmax + kMinChunk - 1) / kMinChunk));

  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "sparse_attention_cpu", [&] {
    const index_t* ip = idx.data_ptr<index_t>();
    // Every selected id is checked before any is read, spread over the threads like the work (a
    // failed check's ValueError is rethrown here by at::parallel_for).
    at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        check_token_ids(ip + bh * kmax, cp[bh], "idx", paged, paged ? 0 : k.size(2), paged ? k.size(0) : 0,
                        paged ? k.size(1) : 1, table ? table + (bh / hkv) * table_len : nullptr, table_len,
                        "block_table");
      }
    });
    const float sc = static_cast<float>(scale);
    switch (q.scalar_type()) {  // check_float_dtype: fp32, bf16 or fp16
      case at::kFloat: run<float, index_t>(q, k, v, ip, cp, table, table_len, paged, n, sc, out); break;
      case at::kBFloat16: run<c10::BFloat16, index_t>(q, k, v, ip, cp, table, table_len, paged, n, sc, out); break;
      default: run<c10::Half, index_t>(q, k, v, ip, cp, table, table_len, paged, n, sc, out); break;
    }
  });
  return out;
}

}  // namespace kvcomp
