// SPDX-License-Identifier: Apache-2.0
// Flash-attention tiles of the CPU prefill kernels (paged_prefill_cpu.cpp, streaming_prefill_cpu.cpp).
// A work item owns M query rows (tokens x G: the whole GQA group of one KV head, token-major), loads
// them scaled into a thread-local fp32 buffer, and walks tiles of at most kKTile key/value rows that
// the kernel copies (as fp32) into the buffer's K and V: S = Q K^T and O += P V are GEMMs through
// ATen's CPU BLAS (at::cpu::mm_out / addmm_), the softmax is online in fp32 with, per row, a visible
// range [first, valid) of the tile's keys. Included by each kernel's .cpp inside namespace kvcomp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_isa.h"

namespace kvcomp {
namespace {

#ifdef KVCOMP_X86
KVCOMP_BEGIN_AVX512
namespace avx512 {
#define KVCOMP_PD_AVX512 1
#include "paged_decode_kernels.inc"
#include "paged_prefill_kernels.inc"
#undef KVCOMP_PD_AVX512
}  // namespace avx512
KVCOMP_END_ISA
KVCOMP_BEGIN_AVX2
namespace avx2 {
#define KVCOMP_PD_AVX2 1
#include "paged_decode_kernels.inc"
#include "paged_prefill_kernels.inc"
#undef KVCOMP_PD_AVX2
}  // namespace avx2
KVCOMP_END_ISA
#endif
namespace generic {
#include "paged_decode_kernels.inc"
#include "paged_prefill_kernels.inc"
}  // namespace generic

template <typename T>
struct Kernels {
  void (*to_float)(const T*, int64_t, float*);
  void (*softmax)(float*, int64_t, int64_t, const int64_t*, const int64_t*, float*, float*, float*);
};

// The loops of the current ISA (cpu_isa.h).
template <typename T>
Kernels<T> kernels() {
  switch (isa::current()) {
#ifdef KVCOMP_X86
    case isa::CpuIsa::avx512: return {&avx512::to_float<T>, &avx512::softmax_rows};
    case isa::CpuIsa::avx2: return {&avx2::to_float<T>, &avx2::softmax_rows};
#endif
    default: return {&generic::to_float<T>, &generic::softmax_rows};
  }
}

// Tile sizes near those of torch's CPU flash attention (256 query x 512 key rows): GEMMs big enough
// for the BLAS, scores of a tile (512 KiB) within L2.
constexpr int64_t kQRows = 256;  // query rows (tokens x G) per work item, at most
constexpr int64_t kKTile = 512;  // key tokens per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Thread-local tiles: Q, O [M, D], S [M, kKTile], K, V [kKTile, D], per-row m, l, alpha, first, valid.
struct Buffers {
  std::vector<float> q, o, s, k, v, m, l, alpha;
  std::vector<int64_t> first, valid;
  Buffers(int64_t rows, int64_t d)
      : q(rows * d), o(rows * d), s(rows * kKTile), k(kKTile * d), v(kKTile * d), m(rows), l(rows), alpha(rows),
        first(rows, 0), valid(rows) {}
};

inline at::Tensor mat(float* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// Loads nt tokens x g heads of fp32 queries (token t's first head at q0 + t * token_stride, g rows of
// d contiguous) times `scale` into buf.q and resets the rows' O, m, l and first.
inline void begin_rows(Buffers& buf, const float* q0, int64_t token_stride, int64_t nt, int64_t g, int64_t d,
                       float scale) {
  for (int64_t t = 0; t < nt; ++t) {
    const float* src = q0 + t * token_stride;
    float* dst = buf.q.data() + t * g * d;
    for (int64_t c = 0; c < g * d; ++c) dst[c] = src[c] * scale;
  }
  const int64_t rows = nt * g;
  std::fill(buf.m.begin(), buf.m.begin() + rows, kNegInf);
  std::fill(buf.l.begin(), buf.l.begin() + rows, 0.f);
  std::fill(buf.o.begin(), buf.o.begin() + rows * d, 0.f);
  std::fill(buf.first.begin(), buf.first.begin() + rows, 0);
}

// One online-softmax step of the rows over the nb keys / values in buf.k, buf.v: row r sees keys
// [buf.first[r], buf.valid[r]) of the tile (set by the caller).
template <typename T>
void flash_step(Buffers& buf, int64_t rows, int64_t nb, int64_t d, const Kernels<T>& kn) {
  at::Tensor sm = mat(buf.s.data(), rows, nb), om = mat(buf.o.data(), rows, d);
  at::cpu::mm_out(sm, mat(buf.q.data(), rows, d), mat(buf.k.data(), nb, d).t());
  kn.softmax(buf.s.data(), rows, nb, buf.first.data(), buf.valid.data(), buf.m.data(), buf.l.data(),
             buf.alpha.data());
  for (int64_t r = 0; r < rows; ++r) {
    const float a = buf.alpha[r];
    if (a == 1.f) continue;
    float* orow = buf.o.data() + r * d;
    for (int64_t c = 0; c < d; ++c) orow[c] *= a;
  }
  at::cpu::addmm_(om, sm, mat(buf.v.data(), nb, d));
}

// Writes O / l of nt tokens x g rows to out0 + t * token_stride (g rows of d each); rows that saw
// no key get zeros (the references' convention).
inline void end_rows(const Buffers& buf, float* out0, int64_t token_stride, int64_t nt, int64_t g, int64_t d) {
  for (int64_t t = 0; t < nt; ++t) {
    float* dst = out0 + t * token_stride;
    for (int64_t i = 0; i < g; ++i) {
      const float l = buf.l[t * g + i], inv = l > 0.f ? 1.f / l : 0.f;
      const float* orow = buf.o.data() + (t * g + i) * d;
      for (int64_t c = 0; c < d; ++c) dst[i * d + c] = orow[c] * inv;
    }
  }
}

// Runs item(i, buffers) for i in [0, n) on the threads of at::parallel_for, each thread taking the
// next item when done (callers order items by decreasing cost), with buffers of max_rows x d.
template <typename F>
void for_items(int64_t n, int64_t max_rows, int64_t d, const F& item) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Buffers buf(max_rows, d);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) item(i, buf);
  });
}

// Calls f(T()) with T the element type of KV storage of dtype st (float, bfloat16, else half).
template <typename F>
void by_kv_dtype(at::ScalarType st, const F& f) {
  switch (st) {
    case at::kFloat: f(float()); break;
    case at::kBFloat16: f(c10::BFloat16()); break;
    default: f(c10::Half()); break;
  }
}

}  // namespace
}  // namespace kvcomp
