// SPDX-License-Identifier: Apache-2.0
// ThinK decode on the CPU (torch.ops.kvcomp_C.think_decode): one query per sequence over pruned keys
// in pages kp_cache [num_blocks, block_size, Hkv, Dk] (tokens p < T_p = max(L - W, 0), logits
// q[chan_idx] . k) and a full-width ring k_recent [B, Hkv, W, D] (tokens T_p <= p < L in slot p % W),
// values in v_cache pages; the semantics of kvcomp/ref/think_paged.py::paged_pruned_key_attention.
//
// The query is sliced once per (sequence, KV head) to its kept channels (G heads x Dk, scaled, zero
// padded), so every narrow key row is one contiguous Dk-wide dot product: decode reads Dk/D of the
// key bytes. ThinK stores Dk as a multiple of 16 (80 of 128 at lambda = 0.4): the AVX2 dot then takes
// two 8-lane vectors per step with no tail (any other Dk stays correct through a masked tail). Work items are (sequence, context chunk, group of KV heads), handed out dynamically to
// the at::parallel_for threads; inside an item, tiles of kTile tokens are read once for the whole
// GQA group of each head (all heads of a token are adjacent in a page, so an item streams its pages),
// with an online softmax per tile and a flash-decoding merge of the chunks at the end. fp32 math;
// fp32 / bf16 / fp16 caches; AVX-512 or AVX2+FMA+F16C inner loops when the CPU has them (cpu_isa.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

namespace kvcomp {
namespace {

#ifdef KVCOMP_X86
KVCOMP_BEGIN_AVX512
namespace avx512 {
#include "tile_kernels_avx512.inc"
}  // namespace avx512
KVCOMP_END_ISA
KVCOMP_BEGIN_AVX2
namespace avx2 {
#include "tile_kernels_avx2.inc"
}  // namespace avx2
KVCOMP_END_ISA
#endif
namespace generic {
#include "attention_kernels.inc"

void qk_tile(const float* q, int64_t ldq, int64_t g, int64_t d, const float* const* rows, int64_t n, float* out,
             int64_t ldo) {
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < n; ++j) dot_rows(q + i * ldq, 1, d, rows[j], out + i * ldo + j);
}

void pv_tile(float* acc, int64_t g, int64_t dv, const float* p, int64_t ldp, const float* const* rows, int64_t n) {
  for (int64_t j = 0; j < n; ++j) axpy_rows(acc, g, dv, p + j, ldp, rows[j]);
}

float exp_sum(float* x, int64_t n, float m) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
  return s;
}

void half_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; ++c) dst[c] = c10::detail::fp16_ieee_to_fp32_value(src[c]);
}
}  // namespace generic

struct Kernels {
  void (*qk)(const float*, int64_t, int64_t, int64_t, const float* const*, int64_t, float*, int64_t);
  void (*pv)(float*, int64_t, int64_t, const float*, int64_t, const float* const*, int64_t);
  float (*exp_sum)(float*, int64_t, float);
  void (*bf16)(const uint16_t*, int64_t, float*);
  void (*half)(const uint16_t*, int64_t, float*);
};

// The tile kernels of the current ISA (cpu_isa.h).
Kernels kernels() {
  switch (isa::current()) {
#ifdef KVCOMP_X86
    case isa::CpuIsa::avx512:
      return Kernels{avx512::qk_tile, avx512::pv_tile, avx512::exp_sum, avx512::bf16_to_float16,
                     avx512::half_to_float16};
    case isa::CpuIsa::avx2:
      return Kernels{avx2::qk_tile, avx2::pv_tile, avx2::exp_sum, avx2::bf16_to_float8, avx2::half_to_float8};
#endif
    default:
      return Kernels{generic::qk_tile, generic::pv_tile, generic::exp_sum, generic::bf16_to_float,
                     generic::half_to_float};
  }
}

constexpr int64_t kTile = 32;  // tokens per tile: K + V of a tile for one head stay in L1
inline int64_t pad8(int64_t x) { return (x + 7) & ~int64_t{7}; }

// A cache row as fp32: the row itself for fp32 storage, else converted into buf.
template <typename T>
inline const float* row_f32(const T* row, int64_t n, float* buf, const Kernels& kn) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    kn.bf16(reinterpret_cast<const uint16_t*>(row), n, buf);
    return buf;
  } else {
    kn.half(reinterpret_cast<const uint16_t*>(row), n, buf);
    return buf;
  }
}

struct Problem {
  int64_t b, hq, hkv, g, d, dk, dv, w, bs;
  int64_t ldn, ldf;                 // padded widths of the narrow / full query rows
  int64_t chunk, groups, hg;        // tokens per chunk, head groups per chunk, heads per group
  std::vector<int64_t> lens;        // [B]
  std::vector<int64_t> blocks;      // used block ids of every sequence, back to back
  std::vector<int64_t> block_off;   // [B + 1] offsets into blocks
  std::vector<int64_t> chunk_off;   // [B + 1] first global chunk of each sequence
  std::vector<int64_t> chunk_seq;   // [chunks] its sequence
  std::vector<float> qn, qf;        // [B, Hkv, G, ldn] scaled q[chan_idx]; [B, Hkv, G, ldf] scaled q
  int64_t part() const { return g * (dv + 2); }  // partial of one (chunk, head): m[G], l[G], acc[G, Dv]
};

struct Strides {
  int64_t kb, kt, kh;   // kp_cache: block, token, head
  int64_t vb, vt, vh;   // v_cache
  int64_t rb, rh, rs;   // k_recent: batch, head, slot
};

template <typename T>
void run(const Problem& P, const Strides& S, const T* kp, const T* kr, const T* vc, float* partials) {
  const Kernels kn = kernels();
  const int64_t nchunks = static_cast<int64_t>(P.chunk_seq.size()), items = nchunks * P.groups;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> kbuf(kTile * P.ldf), vbuf(kTile * P.dv), s(P.g * kTile);
    std::vector<const float*> krows(kTile), vrows(kTile);
    int64_t koff[kTile], voff[kTile];
    for (int64_t it = next.fetch_add(1); it < items; it = next.fetch_add(1)) {
      const int64_t gc = it / P.groups, h0 = (it % P.groups) * P.hg, h1 = std::min(h0 + P.hg, P.hkv);
      const int64_t bi = P.chunk_seq[gc], len = P.lens[bi], tp = std::max<int64_t>(len - P.w, 0);
      const int64_t p0 = (gc - P.chunk_off[bi]) * P.chunk, p1 = std::min(p0 + P.chunk, len);
      const int64_t* blk = P.blocks.data() + P.block_off[bi];
      for (int64_t h = h0; h < h1; ++h) {
        float* pt = partials + (gc * P.hkv + h) * P.part();
        std::fill(pt, pt + P.g, -std::numeric_limits<float>::infinity());
        std::fill(pt + P.g, pt + P.part(), 0.f);
      }
      for (int64_t t0 = p0; t0 < p1;) {
        // A tile lies wholly before T_p (narrow page rows) or after it (full-width ring rows).
        const bool ring = t0 >= tp;
        const int64_t n = std::min(kTile, (ring ? p1 : std::min(p1, tp)) - t0);
        for (int64_t j = 0; j < n; ++j) {  // row offsets at head 0
          const int64_t pos = t0 + j, b_id = blk[pos / P.bs], slot = pos % P.bs;
          voff[j] = b_id * S.vb + slot * S.vt;
          koff[j] = ring ? bi * S.rb + (pos % P.w) * S.rs : b_id * S.kb + slot * S.kt;
        }
        const T* kbase = ring ? kr : kp;
        const int64_t kh = ring ? S.rh : S.kh, dd = ring ? P.d : P.dk, ldq = ring ? P.ldf : P.ldn;
        for (int64_t h = h0; h < h1; ++h) {
          const float* q = (ring ? P.qf.data() : P.qn.data()) + (bi * P.hkv + h) * P.g * ldq;
          for (int64_t j = 0; j < n; ++j) {
            krows[j] = row_f32(kbase + koff[j] + h * kh, dd, kbuf.data() + j * P.ldf, kn);
          }
          kn.qk(q, ldq, P.g, dd, krows.data(), n, s.data(), kTile);
          float* pt = partials + (gc * P.hkv + h) * P.part();
          float *m = pt, *l = pt + P.g, *acc = pt + 2 * P.g;
          for (int64_t i = 0; i < P.g; ++i) {
            float* si = s.data() + i * kTile;
            const float mnew = std::max(m[i], *std::max_element(si, si + n));
            if (mnew > m[i]) {
              const float alpha = std::exp(m[i] - mnew);
              l[i] *= alpha;
              float* ai = acc + i * P.dv;
              for (int64_t c = 0; c < P.dv; ++c) ai[c] *= alpha;
              m[i] = mnew;
            }
            l[i] += kn.exp_sum(si, n, mnew);
          }
          for (int64_t j = 0; j < n; ++j) {
            vrows[j] = row_f32(vc + voff[j] + h * S.vh, P.dv, vbuf.data() + j * P.dv, kn);
          }
          kn.pv(acc, P.g, P.dv, s.data(), kTile, vrows.data(), n);
        }
        t0 += n;
      }
    }
  });
}

// Merges the chunks of every (sequence, query head) into out [B, Hq, Dv] fp32.
void merge(const Problem& P, const float* partials, float* out) {
  at::parallel_for(0, P.b * P.hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / P.hkv, h = bh % P.hkv;
      const int64_t c0 = P.chunk_off[bi], c1 = P.chunk_off[bi + 1];
      for (int64_t i = 0; i < P.g; ++i) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = c0; c < c1; ++c) mx = std::max(mx, partials[(c * P.hkv + h) * P.part() + i]);
        float* o = out + (bi * P.hq + h * P.g + i) * P.dv;
        std::fill(o, o + P.dv, 0.f);
        float sum = 0.f;
        for (int64_t c = c0; c < c1; ++c) {
          const float* pt = partials + (c * P.hkv + h) * P.part();
          const float wgt = std::exp(pt[i] - mx);
          sum += wgt * pt[P.g + i];
          const float* a = pt + 2 * P.g + i * P.dv;
          for (int64_t k = 0; k < P.dv; ++k) o[k] += wgt * a[k];
        }
        const float inv = 1.f / sum;
        for (int64_t k = 0; k < P.dv; ++k) o[k] *= inv;
      }
    }
  });
}

// Integer tensor -> int64 values (any int dtype, any strides).
std::vector<int64_t> int_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

}  // namespace

at::Tensor think_decode_cpu(const at::Tensor& q, const at::Tensor& kp_cache, const at::Tensor& chan_idx,
                            const at::Tensor& k_recent, const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, double scale, int64_t tokens_per_split, int64_t max_seq_len) {
  using namespace detail;
  const std::pair<const at::Tensor*, const char*> all[] = {{&q, "q"}, {&kp_cache, "kp_cache"},
      {&chan_idx, "chan_idx"}, {&k_recent, "k_recent"}, {&v_cache, "v_cache"}, {&block_table, "block_table"},
      {&seq_lens, "seq_lens"}};
  for (const auto& [t, name] : all) check_cpu(*t, name);
  check_dim(q, 3, "q", "[B, Hq, D] (one decode query per sequence)");
  check_dim(kp_cache, 4, "kp_cache", "[num_blocks, block_size, Hkv, Dk]");
  check_dim(chan_idx, 3, "chan_idx", "[B or 1, Hkv, Dk]");
  check_dim(k_recent, 4, "k_recent", "[B, Hkv, W, D]");
  check_dim(v_cache, 4, "v_cache", "[num_blocks, block_size, Hkv, Dv]");
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_float_dtype(q, "q");
  check_float_dtype(kp_cache, "kp_cache");
  TORCH_CHECK_VALUE(k_recent.scalar_type() == kp_cache.scalar_type() && v_cache.scalar_type() == kp_cache.scalar_type(),
                    "kp_cache, k_recent and v_cache must share one dtype, got ", kp_cache.scalar_type(), ", ",
                    k_recent.scalar_type(), ", ", v_cache.scalar_type());
  check_index_dtype(chan_idx, "chan_idx");
  check_index_dtype(block_table, "block_table");
  check_index_dtype(seq_lens, "seq_lens");
  check_last_dim_contiguous(kp_cache, "kp_cache");
  check_last_dim_contiguous(k_recent, "k_recent");
  check_last_dim_contiguous(v_cache, "v_cache");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t nb = kp_cache.size(0), bs = kp_cache.size(1), hkv = kp_cache.size(2), dk = kp_cache.size(3);
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "q heads Hq=", hq, " must be a multiple of the KV heads Hkv=", hkv);
  TORCH_CHECK_VALUE(bs > 0, "kp_cache block_size must be >= 1, got ", shape_str(kp_cache));
  TORCH_CHECK_VALUE(v_cache.size(0) == nb && v_cache.size(1) == bs && v_cache.size(2) == hkv, "v_cache shape ",
                    shape_str(v_cache), " does not match kp_cache ", shape_str(kp_cache));
  TORCH_CHECK_VALUE(k_recent.size(0) == b && k_recent.size(1) == hkv && k_recent.size(3) == d,
                    "k_recent must be [B=", b, ", Hkv=", hkv, ", W, D=", d, "], got ", shape_str(k_recent));
  TORCH_CHECK_VALUE((chan_idx.size(0) == 1 || chan_idx.size(0) == b) && chan_idx.size(1) == hkv &&
                        chan_idx.size(2) == dk,
                    "chan_idx must be [B=", b, " or 1, Hkv=", hkv, ", Dk=", dk, "], got ", shape_str(chan_idx));
  TORCH_CHECK_VALUE(dk <= d, "kp_cache keeps Dk=", dk, " channels but q has D=", d);
  TORCH_CHECK_VALUE(block_table.size(0) == b, "block_table has ", block_table.size(0), " rows but q has B=", b);
  TORCH_CHECK_VALUE(seq_lens.size(0) == b, "seq_lens has ", seq_lens.size(0), " entries but q has B=", b);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);

  Problem P;
  P.b = b, P.hq = hq, P.hkv = hkv, P.g = hq / hkv, P.d = d, P.dk = dk, P.dv = v_cache.size(3);
  P.w = k_recent.size(2), P.bs = bs, P.ldn = pad8(dk), P.ldf = pad8(d);
  P.lens = int_values(seq_lens);
  const std::vector<int64_t> table = int_values(block_table);
  const int64_t max_blocks = block_table.size(1);
  P.block_off.assign(1, 0);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t len = P.lens[i], nblk = (len + bs - 1) / bs;
    TORCH_CHECK_VALUE(len >= 1, "seq_lens[", i, "]=", len, " must be >= 1 (the decode token is in the cache)");
    TORCH_CHECK_VALUE(nblk <= max_blocks, "seq_lens[", i, "]=", len, " needs ", nblk, " blocks but block_table has ",
                      max_blocks, " columns");
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t id = table[i * max_blocks + j];
      TORCH_CHECK_VALUE(id >= 0 && id < nb, "block_table[", i, ", ", j, "]=", id, " is outside the cache's ", nb,
                        " blocks");
      P.blocks.push_back(id);
    }
    P.block_off.push_back(static_cast<int64_t>(P.blocks.size()));
  }
  const std::vector<int64_t> chans = int_values(chan_idx);
  for (size_t i = 0; i < chans.size(); ++i) {
    TORCH_CHECK_VALUE(chans[i] >= 0 && chans[i] < d, "chan_idx has channel ", chans[i], " outside [0, D=", d, ")");
  }

  at::Tensor out = at::empty({b, hq, P.dv}, q.options().dtype(at::kFloat));
  if (b == 0 || hq == 0) return out.to(q.scalar_type());

  // Scaled queries, full width and sliced to each head's kept channels, zero padded to 8 floats.
  const at::Tensor qc = q.to(at::kFloat).contiguous();
  const float* qp = qc.data_ptr<float>();
  const auto fscale = static_cast<float>(scale);
  P.qn.assign(b * hq * P.ldn, 0.f);
  P.qf.assign(b * hq * P.ldf, 0.f);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t* ci = chans.data() + (chan_idx.size(0) == 1 ? 0 : i) * hkv * dk;
    for (int64_t hh = 0; hh < hq; ++hh) {
      const float* qr = qp + (i * hq + hh) * d;
      float* fr = P.qf.data() + (i * hq + hh) * P.ldf;
      float* nr = P.qn.data() + (i * hq + hh) * P.ldn;
      for (int64_t c = 0; c < d; ++c) fr[c] = qr[c] * fscale;
      for (int64_t c = 0; c < dk; ++c) nr[c] = qr[ci[(hh / P.g) * dk + c]] * fscale;
    }
  }

  // Chunks of a multiple of kTile tokens, about 8 per thread over the whole batch (>= 256 tokens so
  // the merge stays negligible); heads are split into groups only when there are too few chunks.
  // tokens_per_split / max_seq_len are the GPU kernel's split hints and play no part here.
  (void)tokens_per_split;
  (void)max_seq_len;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t total = 0;
  for (int64_t len : P.lens) total += len;
  P.chunk = std::max<int64_t>(256, (total + 8 * threads - 1) / (8 * threads));
  P.chunk = (P.chunk + kTile - 1) / kTile * kTile;
  P.chunk_off.assign(1, 0);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t nc = (P.lens[i] + P.chunk - 1) / P.chunk;
    P.chunk_seq.insert(P.chunk_seq.end(), nc, i);
    P.chunk_off.push_back(P.chunk_off.back() + nc);
  }
  const int64_t nchunks = P.chunk_off.back();
  P.groups = std::min(hkv, std::max<int64_t>(1, (4 * threads + nchunks - 1) / nchunks));
  P.hg = (hkv + P.groups - 1) / P.groups;
  P.groups = (hkv + P.hg - 1) / P.hg;

  const Strides S{kp_cache.stride(0), kp_cache.stride(1), kp_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
                  v_cache.stride(2), k_recent.stride(0), k_recent.stride(1), k_recent.stride(2)};
  std::vector<float> partials(static_cast<size_t>(nchunks * hkv * P.part()));
  const auto go = [&](auto tag) {
    using T = decltype(tag);
    run<T>(P, S, kp_cache.data_ptr<T>(), k_recent.data_ptr<T>(), v_cache.data_ptr<T>(), partials.data());
  };
  switch (kp_cache.scalar_type()) {
    case at::kFloat: go(float{}); break;
    case at::kBFloat16: go(c10::BFloat16{}); break;
    default: go(c10::Half{}); break;  // check_float_dtype left fp16 only
  }
  merge(P, partials.data(), out.data_ptr<float>());
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def(
      "think_decode(Tensor q, Tensor kp_cache, Tensor chan_idx, Tensor k_recent, Tensor v_cache, "
      "Tensor block_table, Tensor seq_lens, float scale, int tokens_per_split, int max_seq_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) { m.impl("think_decode", &kvcomp::think_decode_cpu); }
