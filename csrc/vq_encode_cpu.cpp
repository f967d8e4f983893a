// SPDX-License-Identifier: Apache-2.0
// A2ATS key encoding on the CPU: the nearest codeword of each pre-RoPE key in the whitened metric
// ||(k - c) L||^2, registered as torch.ops.kvcomp_C.vq_encode (dense keys -> codes) and
// vq_encode_paged (new keys written into the paged int16 code cache) and called from
// kvcomp/ops/vq.py. Contracts: kvcomp.ref.vq_encode and kvcomp.ref.compressed_write.vq_encode_paged.
//
// The distance is computed as the reference does, x2 - 2 x.c + c2 with x = k L, c = codeword L:
// the whitening and the x.c products are GEMMs (at::matmul, in row chunks so the [rows, C] block
// stays small), and a fused pass takes the argmin of each row (equal distances pick the lower code,
// a NaN distance wins like torch.argmin), in parallel over rows with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace kvcomp {
namespace {

using detail::check_cpu;
using detail::check_dim;
using detail::shape_str;

constexpr int64_t kMaxCodes = 32768;        // codes are int16
constexpr int64_t kChunkElems = 1 << 22;    // x.c products held at once (16 MiB of fp32)

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
                    t.scalar_type());
}

void check_int_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                    " must be an integer tensor, got ", t.scalar_type());
}

// codebook [Hkv, C, D] and whiten [Hkv, D, D] against hkv and d.
void check_codebook(const at::Tensor& codebook, const at::Tensor& whiten, int64_t hkv, int64_t d) {
  check_cpu(codebook, "codebook");
  check_cpu(whiten, "whiten");
  check_dim(codebook, 3, "codebook", "[Hkv, C, D]");
  check_dim(whiten, 3, "whiten", "[Hkv, D, D]");
  check_floating(codebook, "codebook");
  check_floating(whiten, "whiten");
  TORCH_CHECK_VALUE(codebook.size(0) == hkv && codebook.size(2) == d && codebook.size(1) >= 1, "codebook must be [Hkv=",
                    hkv, ", C>=1, D=", d, "], got ", shape_str(codebook));
  TORCH_CHECK_VALUE(codebook.size(1) <= kMaxCodes, "codebook has ", codebook.size(1), " entries, more than ", kMaxCodes,
                    " (codes are int16)");
  TORCH_CHECK_VALUE(whiten.size(0) == hkv && whiten.size(1) == d && whiten.size(2) == d, "whiten must be [Hkv=", hkv,
                    ", D=", d, ", D=", d, "], got ", shape_str(whiten));
}

// Nearest codes of x [Hkv, N, D] (any float dtype) -> [Hkv, N] int16 (contiguous).
at::Tensor nearest_codes(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& whiten) {
  const int64_t hkv = x.size(0), n = x.size(1), nc = codebook.size(1);
  auto codes = at::empty({hkv, n}, x.options().dtype(at::kShort));
  if (n == 0 || hkv == 0) return codes;
  const at::Tensor lw = whiten.to(at::kFloat);
  const at::Tensor xw = at::matmul(x.to(at::kFloat), lw);                 // [Hkv, N, D]
  const at::Tensor cw = at::matmul(codebook.to(at::kFloat), lw);          // [Hkv, C, D]
  const at::Tensor x2 = at::sum(at::mul(xw, xw), {-1}).contiguous();             // [Hkv, N]
  const at::Tensor c2 = at::sum(at::mul(cw, cw), {-1}).contiguous();             // [Hkv, C]
  const at::Tensor cwt = cw.transpose(1, 2);                              // [Hkv, D, C]
  const float* x2p = x2.data_ptr<float>();
  const float* c2p = c2.data_ptr<float>();
  int16_t* out = codes.data_ptr<int16_t>();
  const int64_t step = std::max<int64_t>(1, kChunkElems / (hkv * nc));
  for (int64_t s = 0; s < n; s += step) {
    const int64_t rows = std::min(step, n - s);
    const at::Tensor dots = at::matmul(xw.narrow(1, s, rows), cwt).contiguous();  // [Hkv, rows, C]
    const float* dp = dots.data_ptr<float>();
    at::parallel_for(0, hkv * rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t h = r / rows, i = s + r % rows;
        const float* dr = dp + r * nc;
        const float* ch = c2p + h * nc;
        const float xx = x2p[h * n + i];
        float best = (xx - 2.f * dr[0]) + ch[0];
        int64_t arg = 0;
        for (int64_t c = 1; c < nc && !std::isnan(best); ++c) {
          const float dist = (xx - 2.f * dr[c]) + ch[c];
          if (dist < best || std::isnan(dist)) {
            best = dist;
            arg = c;
          }
        }
        out[h * n + i] = static_cast<int16_t>(arg);
      }
    });
  }
  return codes;
}

at::Tensor vq_encode_cpu(const at::Tensor& k_pre, const at::Tensor& codebook, const at::Tensor& whiten) {
  check_cpu(k_pre, "k_pre");
  check_dim(k_pre, 4, "k_pre", "[B, Hkv, T, D]");
  check_floating(k_pre, "k_pre");
  const int64_t b = k_pre.size(0), hkv = k_pre.size(1), t = k_pre.size(2), d = k_pre.size(3);
  check_codebook(codebook, whiten, hkv, d);
  const at::Tensor x = k_pre.transpose(0, 1).reshape({hkv, b * t, d});
  return nearest_codes(x, codebook, whiten).reshape({hkv, b, t}).transpose(0, 1).contiguous();
}

void vq_encode_paged_cpu(const at::Tensor& k_new, const at::Tensor& codebook, const at::Tensor& whiten,
                         at::Tensor& code_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                         const at::Tensor& query_start_loc) {
  check_cpu(k_new, "k_new");
  check_cpu(code_cache, "code_cache");
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  check_cpu(query_start_loc, "query_start_loc");
  check_dim(k_new, 3, "k_new", "[N, Hkv, D]");
  check_floating(k_new, "k_new");
  check_dim(code_cache, 3, "code_cache", "[num_blocks, block_size, Hkv]");
  TORCH_CHECK_VALUE(code_cache.scalar_type() == at::kShort, "code_cache must be int16, got ", code_cache.scalar_type());
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_int_dtype(block_table, "block_table");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_int_dtype(seq_lens, "seq_lens");
  check_dim(query_start_loc, 1, "query_start_loc", "[B + 1]");
  check_int_dtype(query_start_loc, "query_start_loc");
  const int64_t n = k_new.size(0), hkv = k_new.size(1), d = k_new.size(2);
  const int64_t nb = code_cache.size(0), bs = code_cache.size(1), b = block_table.size(0);
  TORCH_CHECK_VALUE(code_cache.size(2) == hkv, "k_new has ", hkv, " KV heads but code_cache ", shape_str(code_cache));
  TORCH_CHECK_VALUE(bs >= 1, "code_cache block_size must be >= 1, got ", shape_str(code_cache));
  check_codebook(codebook, whiten, hkv, d);
  TORCH_CHECK_VALUE(seq_lens.size(0) == b, "seq_lens must have B=", b, " entries (block_table rows), got ",
                    seq_lens.size(0));
  TORCH_CHECK_VALUE(query_start_loc.size(0) == b + 1, "query_start_loc must have B+1=", b + 1, " entries, got ",
                    query_start_loc.size(0));
  const at::Tensor lens_t = seq_lens.to(at::kLong).contiguous(), qsl_t = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor table_t = block_table.to(at::kLong).contiguous();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t* qsl = qsl_t.data_ptr<int64_t>();
  const int64_t* table = table_t.data_ptr<int64_t>();
  const int64_t cols = block_table.size(1);
  TORCH_CHECK_VALUE(qsl[0] == 0 && qsl[b] == n, "query_start_loc must run from 0 to N=", n, ", got ", qsl[0], "..",
                    qsl[b]);
  // element offset of each new row's code slot (head 0), checked before any work
  std::vector<int64_t> slot(n);
  for (int64_t bi = 0; bi < b; ++bi) {
    const int64_t s = qsl[bi], e = qsl[bi + 1], len = lens[bi];
    TORCH_CHECK_VALUE(e >= s, "query_start_loc must be non-decreasing (at sequence ", bi, ")");
    TORCH_CHECK_VALUE(len >= e - s, "seq_lens[", bi, "]=", len, " is smaller than its ", e - s, " new tokens");
    const int64_t nblk = (len + bs - 1) / bs;
    TORCH_CHECK_VALUE(nblk <= cols, "seq_lens[", bi, "]=", len, " needs ", nblk, " blocks but block_table has ", cols,
                      " columns");
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t blk = table[bi * cols + j];
      TORCH_CHECK_VALUE(blk >= 0 && blk < nb, "block_table[", bi, ", ", j, "]=", blk, " is outside [0, ", nb, ")");
    }
    for (int64_t r = s; r < e; ++r) {
      const int64_t p = len - (e - s) + (r - s);
      slot[r] = table[bi * cols + p / bs] * code_cache.stride(0) + (p % bs) * code_cache.stride(1);
    }
  }
  const at::Tensor codes = nearest_codes(k_new.transpose(0, 1), codebook, whiten);  // [Hkv, N]
  const int16_t* cp = codes.data_ptr<int16_t>();
  int16_t* dst = code_cache.data_ptr<int16_t>();
  const int64_t sh = code_cache.stride(2);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < hkv; ++h) dst[slot[r] + h * sh] = cp[h * n + r];
  }
}

}  // namespace
}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def("vq_encode(Tensor k_pre, Tensor codebook, Tensor whiten) -> Tensor");
  m.def(
      "vq_encode_paged(Tensor k_new, Tensor codebook, Tensor whiten, Tensor(a!) code_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor query_start_loc) -> ()");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) {
  m.impl("vq_encode", &kvcomp::vq_encode_cpu);
  m.impl("vq_encode_paged", &kvcomp::vq_encode_paged_cpu);
}
