// SPDX-License-Identifier: Apache-2.0
// torch.ops.kvcomp_C.duo_decode: one decode step of DuoAttention on the CPU, the native version of
// the custom op kvcomp::duo_decode (reference: kvcomp/ref/duo.py::duo_decode_attention). Retrieval
// KV heads are read straight from the paged cache through the block table; streaming heads from
// their rings in place (ring_block[b]: request b's ring, e.g. vLLM's ring pages; absent: ring b), the
// min(len, sink + window) valid slots. With no streaming heads it is the plain dense paged decode.
//
// Work: phase 1 splits each query row's context into chunks; an item (row, chunk) walks its tokens
// in tiles of about 128 KiB of keys + values (retrieval_tile) and, per retrieval KV head, computes
// the G x tile logits (each key row loaded once for the G query heads), updates the running max /
// sum / unnormalised accumulator (fp32) and accumulates the value rows. Phase 2 merges the chunks of
// each (row, retrieval head) flash-decoding style and runs each (row, streaming head) over its ring's
// valid slots; both are at::parallel_for, so one long request uses every core. Only the last dim of
// q and the caches must be contiguous; other strides are free (vLLM page views, head-major caches,
// transposed tables).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"

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

constexpr int64_t kTile = 32;        // rows per streaming-head tile (logits of a tile stay in L1)
constexpr int64_t kMaxTile = 64;     // most rows per retrieval tile (see retrieval_tile)
constexpr int64_t kMinChunk = 256;   // fewest context tokens per phase-1 item (keeps the merge cheap)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Item {
  int64_t b, t0, t1;  // query row, context token range [t0, t1)
};

// A batch of query rows (one decode query per sequence), each
// attending to the first row_len[b] tokens of table row row_seq[b].
struct Problem {
  int64_t rows, hq, hkv, g, d, n_ret, n_str, block_size, sink, window;
  float scale;
  const float* q;                  // [rows, Hq, D] fp32, contiguous
  std::vector<int64_t> row_len;    // [rows] tokens visible to each query row
  std::vector<int64_t> row_seq;    // [rows] block-table row of each query row
  std::vector<int64_t> ret_kv;     // retrieval cache head r -> KV head
  std::vector<int64_t> str_kv;     // ring head s -> KV head
  std::vector<int64_t> row_ring;   // [rows] ring of each query row (validated; empty without streaming heads)
  std::vector<int64_t> blocks;     // [table rows, blocks_per_seq] block ids actually used (validated)
  int64_t blocks_per_seq = 0;
  std::vector<Item> items;         // phase-1 items, grouped by query row
  std::vector<int64_t> first_item; // [rows + 1]: items of row b are [first_item[b], first_item[b+1])
  float* out;                      // [rows, Hq, D] fp32, contiguous
};

// Per phase-1 item partial: for each retrieval head, for each of its G query heads, m, l, acc[D].
inline int64_t partial_size(const Problem& p) { return p.n_ret * p.g * (p.d + 2); }

// Loads the G query heads of KV head h of sequence b, scaled, into qs [G, D].
inline void load_q(const Problem& p, int64_t b, int64_t h, float* qs) {
  const float* src = p.q + (b * p.hq + h * p.g) * p.d;
  for (int64_t c = 0; c < p.g * p.d; ++c) qs[c] = src[c] * p.scale;
}

// Retrieval tiles hold about kPrefetchBytes of keys + values (all retrieval heads), so that the
// prefetch distance below (one tile) is counted in bytes, not rows. With 32 rows whatever the row
// size, the dense fp32 Llama-3.1-8B layer (8 KiB of K + V per token) prefetched 256 KiB per tile and
// took 1.15-1.2x the time of 16-row (128 KiB) tiles at 4K-32K tokens; bf16 or 4 retrieval heads
// (128 KiB at 32 rows) were no faster with 16- or 64-row tiles (2 KiB per token: 64 rows, ~1.05x).
// Measured 1 thread, AVX-512, interleaved A/B, CPU time.
constexpr int64_t kPrefetchBytes = 128 * 1024;

// Rows per retrieval tile: the largest power of two in [8, kMaxTile] whose K + V fit kPrefetchBytes.
inline int64_t retrieval_tile(const Problem& p, int64_t elt) {
  const int64_t per_token = std::max<int64_t>(1, 2 * p.n_ret * p.d * elt);
  int64_t rows = 8;
  while (rows < kMaxTile && 2 * rows * per_token <= kPrefetchBytes) rows *= 2;
  return rows;
}

// Asks for the key / value rows of every retrieval head of tokens [t0, t0 + n) (the next tile) while
// the current one is computed: the pages are scattered, so the hardware prefetcher cannot follow them
// across blocks. Llama-3.1-8B layer at 32K tokens, 1 thread: 1.6x faster in bf16, 1.15-1.2x in fp32
// (memory-bound; without it AVX-512 ran no faster than AVX2, sometimes slower); ~4% slower at 4K.
// ks, vs: the caches' block / token / head strides.
template <typename T>
inline void prefetch_tile(const Problem& p, const T* kb, const T* vb, const int64_t* blk, int64_t t0, int64_t n,
                          const int64_t* ks, const int64_t* vs) {
  const int64_t rowb = p.d * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = t0 + j, bid = blk[t / p.block_size], off = t % p.block_size;
    const T* kr = kb + bid * ks[0] + off * ks[1];
    const T* vr = vb + bid * vs[0] + off * vs[1];
    for (int64_t r = 0; r < p.n_ret; ++r) {
      const char* kc = reinterpret_cast<const char*>(kr + r * ks[2]);
      const char* vc = reinterpret_cast<const char*>(vr + r * vs[2]);
      for (int64_t o = 0; o < rowb; o += 64) {
        __builtin_prefetch(kc + o, 0, 3);
        __builtin_prefetch(vc + o, 0, 3);
      }
    }
  }
}

template <typename T>
void retrieval_phase(const Problem& p, const at::Tensor& k_cache, const at::Tensor& v_cache, float* partials) {
  const TileFn<T> fn = tile_fn<T>();
  const T* kb = k_cache.const_data_ptr<T>();
  const T* vb = v_cache.const_data_ptr<T>();
  const int64_t k0 = k_cache.stride(0), k1 = k_cache.stride(1), k2 = k_cache.stride(2);
  const int64_t v0 = v_cache.stride(0), v1 = v_cache.stride(1), v2 = v_cache.stride(2);
  const int64_t ks[3] = {k0, k1, k2}, vs[3] = {v0, v1, v2};
  const int64_t psz = partial_size(p), gd = p.g * p.d;
  const int64_t tile = retrieval_tile(p, static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, static_cast<int64_t>(p.items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> koff(tile), voff(tile);
    std::vector<const T*> krows(tile), vrows(tile);
    std::vector<float> s(p.g * tile), qs(p.n_ret * gd);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = p.items[it];
      float* m = partials + it * psz;      // [n_ret, G]
      float* l = m + p.n_ret * p.g;        // [n_ret, G]
      float* acc = l + p.n_ret * p.g;      // [n_ret, G, D]
      std::fill(m, m + p.n_ret * p.g, kNegInf);
      std::fill(l, l + p.n_ret * p.g + p.n_ret * gd, 0.f);
      for (int64_t r = 0; r < p.n_ret; ++r) load_q(p, item.b, p.ret_kv[r], qs.data() + r * gd);
      const int64_t* blk = p.blocks.data() + p.row_seq[item.b] * p.blocks_per_seq;
      for (int64_t t0 = item.t0; t0 < item.t1; t0 += tile) {
        const int64_t n = std::min(tile, item.t1 - t0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = t0 + j, bid = blk[t / p.block_size], off = t % p.block_size;
          koff[j] = bid * k0 + off * k1;
          voff[j] = bid * v0 + off * v1;
        }
        prefetch_tile(p, kb, vb, blk, t0 + n, std::min(tile, item.t1 - t0 - n), ks, vs);
        for (int64_t r = 0; r < p.n_ret; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            krows[j] = kb + koff[j] + r * k2;
            vrows[j] = vb + voff[j] + r * v2;
          }
          fn(qs.data() + r * gd, p.g, p.d, p.d, krows.data(), vrows.data(), n, m + r * p.g, l + r * p.g,
             acc + r * gd, s.data());
        }
      }
    }
  });
}

// Phase 2, one (sequence, retrieval head): merge the chunk partials into out.
void merge_retrieval(const Problem& p, const float* partials, int64_t b, int64_t r) {
  const int64_t psz = partial_size(p), gd = p.g * p.d;
  const int64_t h = p.ret_kv[r];
  for (int64_t i = 0; i < p.g; ++i) {
    float mx = kNegInf;
    for (int64_t it = p.first_item[b]; it < p.first_item[b + 1]; ++it) {
      mx = std::max(mx, partials[it * psz + r * p.g + i]);
    }
    float* o = p.out + (b * p.hq + h * p.g + i) * p.d;
    std::fill(o, o + p.d, 0.f);
    float sum = 0.f;
    for (int64_t it = p.first_item[b]; it < p.first_item[b + 1]; ++it) {
      const float* part = partials + it * psz;
      const float w = std::exp(part[r * p.g + i] - mx);
      sum += w * part[p.n_ret * p.g + r * p.g + i];
      const float* a = part + 2 * p.n_ret * p.g + r * gd + i * p.d;
      for (int64_t c = 0; c < p.d; ++c) o[c] += w * a[c];
    }
    const float inv = 1.f / sum;
    for (int64_t c = 0; c < p.d; ++c) o[c] *= inv;
  }
}

// Phase 2, one (sequence, streaming head): attention over the ring's valid slots, written to out.
// After L tokens the ring holds tokens p < min(L, sink) in slots [0, min(L, sink)) and the last
// min(window, L - sink) tokens in slots [sink, sink + that) (see kvcomp/ref/cache_write.py).
template <typename T>
void streaming_head(const Problem& p, const at::Tensor& k_stream, const at::Tensor& v_stream, int64_t b,
                    int64_t si, float* scratch) {
  const int64_t gd = p.g * p.d, len = p.row_len[b];
  float *qs = scratch, *m = qs + gd, *l = m + p.g, *acc = l + p.g, *s = acc + gd;
  std::fill(m, m + p.g, kNegInf);
  std::fill(l, l + p.g + gd, 0.f);
  const int64_t h = p.str_kv[si];
  load_q(p, b, h, qs);
  const int64_t r = p.row_ring[b];
  const T* kb = k_stream.const_data_ptr<T>() + r * k_stream.stride(0) + si * k_stream.stride(1);
  const T* vb = v_stream.const_data_ptr<T>() + r * v_stream.stride(0) + si * v_stream.stride(1);
  const int64_t ks = k_stream.stride(2), vs = v_stream.stride(2);
  const int64_t n_sink = std::min(len, p.sink);
  const int64_t n_win = std::min(p.window, std::max<int64_t>(0, len - p.sink));
  const int64_t total = n_sink + n_win;  // slots [0, n_sink) then [sink, sink + n_win)
  const T *krows[kTile], *vrows[kTile];
  const TileFn<T> fn = tile_fn<T>();
  for (int64_t j0 = 0; j0 < total; j0 += kTile) {
    const int64_t n = std::min(kTile, total - j0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = j0 + j < n_sink ? j0 + j : p.sink + (j0 + j - n_sink);
      krows[j] = kb + slot * ks;
      vrows[j] = vb + slot * vs;
    }
    fn(qs, p.g, p.d, p.d, krows, vrows, n, m, l, acc, s);
  }
  for (int64_t i = 0; i < p.g; ++i) {
    float* o = p.out + (b * p.hq + h * p.g + i) * p.d;
    const float inv = 1.f / l[i];
    for (int64_t c = 0; c < p.d; ++c) o[c] = acc[i * p.d + c] * inv;
  }
}

template <typename T>
void merge_and_streaming_phase(const Problem& p, const float* partials, const at::Tensor& k_stream,
                               const at::Tensor& v_stream) {
  const int64_t per_seq = p.n_ret + p.n_str;
  at::parallel_for(0, p.rows * per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * p.g * p.d + 2 * p.g + p.g * kTile);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / per_seq, k = w % per_seq;
      if (k < p.n_ret) {
        merge_retrieval(p, partials, b, k);
      } else {
        streaming_head<T>(p, k_stream, v_stream, b, k - p.n_ret, scratch.data());
      }
    }
  });
}

// Calls f(T{}) with T the C++ type of a float/bf16/fp16 storage dtype (checked by the caller).
template <typename F>
void with_kv_type(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: f(c10::Half{}); break;
  }
}

using detail::check_index;
using detail::check_kv_pair;
using detail::index_at;

// Reads the block ids sequences need (seq_lens, only for those with a query row) into p.blocks,
// checking each against the table width and the cache's block count.
void check_blocks(Problem& p, const at::Tensor& block_table, const int64_t* seq_lens, int64_t num_blocks) {
  std::vector<char> used(block_table.size(0), 0);
  for (int64_t b = 0; b < p.rows; ++b) used[p.row_seq[b]] = 1;
  p.blocks_per_seq = detail::read_block_ids(block_table, seq_lens, used, p.block_size, num_blocks, p.blocks);
}

// Runs a validated problem: phase-1 items (every query row's context in chunks; automatic chunks
// give ~4 items per thread overall), then the merge / streaming phase. Returns [rows, Hq, D] in q's dtype.
at::Tensor run(Problem& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
               const at::Tensor& k_stream, const at::Tensor& v_stream, int64_t num_splits) {
  at::Tensor out = at::empty({p.rows, p.hq, p.d}, q.options().dtype(at::kFloat));
  if (p.rows == 0 || p.hq == 0) return out.to(q.scalar_type());
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  p.q = qf.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<float>();
  p.first_item.assign(p.rows + 1, 0);
  if (p.n_ret) {
    int64_t total = 0;
    for (int64_t b = 0; b < p.rows; ++b) total += p.row_len[b];
    const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
    const int64_t auto_chunk = std::max(kMinChunk, (total + target - 1) / target);
    for (int64_t b = 0; b < p.rows; ++b) {
      const int64_t len = p.row_len[b];
      const int64_t chunk = num_splits > 0 ? (len + num_splits - 1) / num_splits : auto_chunk;
      for (int64_t t0 = 0; t0 < len; t0 += chunk) p.items.push_back({b, t0, std::min(len, t0 + chunk)});
      p.first_item[b + 1] = static_cast<int64_t>(p.items.size());
    }
  }
  std::vector<float> partials(p.items.size() * partial_size(p));
  if (!p.items.empty()) {
    with_kv_type(k_cache.scalar_type(), [&](auto tag) {
      retrieval_phase<decltype(tag)>(p, k_cache, v_cache, partials.data());
    });
  }
  with_kv_type(k_stream.scalar_type(), [&](auto tag) {
    merge_and_streaming_phase<decltype(tag)>(p, partials.data(), k_stream, v_stream);
  });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

at::Tensor duo_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& k_stream,
                          const at::Tensor& v_stream, const at::Tensor& head_map, int64_t sink, int64_t window,
                          double scale, int64_t num_splits, const std::optional<at::Tensor>& ring_block) {
  using namespace detail;
  check_cpu(q, "q");
  check_dim(q, 3, "q", "[B, Hq, D] (one decode query per sequence)");
  check_float_dtype(q, "q");
  check_kv_pair(k_cache, v_cache, "k_cache", "v_cache", "[num_blocks, block_size, n_ret, D]");
  check_kv_pair(k_stream, v_stream, "k_stream", "v_stream", "[num_rings, n_str, capacity, D]");
  check_index(block_table, "block_table", 2, "[B, max_blocks]");
  check_index(seq_lens, "seq_lens", 1, "[B]");
  check_index(head_map, "head_map", 2, "[n_ret + n_str, 2]");
  TORCH_CHECK_VALUE(sink >= 0, "sink must be >= 0, got ", sink);
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1 (it counts the token itself), got ", window);
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0 = automatic), got ", num_splits);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  Problem p;
  p.rows = q.size(0);
  p.hq = q.size(1);
  p.d = q.size(2);
  p.n_ret = k_cache.size(2);
  p.n_str = k_stream.size(1);
  p.hkv = p.n_ret + p.n_str;
  p.block_size = k_cache.size(1);
  p.sink = sink;
  p.window = window;
  p.scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(p.d >= 1, "q head dim must be >= 1, got ", shape_str(q));
  TORCH_CHECK_VALUE(k_cache.size(3) == p.d, "k_cache head dim ", k_cache.size(3), " differs from q head dim ", p.d);
  TORCH_CHECK_VALUE(k_stream.size(2) >= 1 && k_stream.size(3) == p.d, "k_stream must be [num_rings, n_str, ",
                    "capacity >= 1, D=", p.d, "], got ", shape_str(k_stream));
  if (ring_block.has_value()) {
    check_index(*ring_block, "ring_block", 1, "[B] (each request's ring)");
    TORCH_CHECK_VALUE(ring_block->size(0) == p.rows, "ring_block has ", ring_block->size(0), " entries but q has B=",
                      p.rows);
  } else {
    TORCH_CHECK_VALUE(k_stream.size(0) == p.rows, "k_stream must have one ring per request without ring_block: [B=",
                      p.rows, ", n_str, capacity, D], got ", shape_str(k_stream));
  }
  TORCH_CHECK_VALUE(head_map.size(0) == p.hkv && head_map.size(1) == 2, "head_map must be [n_ret + n_str = ", p.hkv,
                    ", 2], got ", shape_str(head_map));
  TORCH_CHECK_VALUE(p.hkv > 0 && p.hq % p.hkv == 0, "q heads Hq=", p.hq, " must be a multiple of the KV heads ",
                    "n_ret + n_str = ", p.hkv);
  p.g = p.hq / p.hkv;
  TORCH_CHECK_VALUE(block_table.size(0) == p.rows, "block_table has ", block_table.size(0), " rows but q has B=",
                    p.rows);
  TORCH_CHECK_VALUE(seq_lens.size(0) == p.rows, "seq_lens has ", seq_lens.size(0), " entries but q has B=", p.rows);
  TORCH_CHECK_VALUE(p.n_ret == 0 || p.block_size >= 1, "k_cache block_size must be >= 1, got ", shape_str(k_cache));

  // head_map: each kind's indices a permutation of its head set.
  p.ret_kv.assign(p.n_ret, -1);
  p.str_kv.assign(p.n_str, -1);
  for (int64_t h = 0; h < p.hkv; ++h) {
    const int64_t kind = index_at(head_map, h, 0), idx = index_at(head_map, h, 1);
    TORCH_CHECK_VALUE(kind == 0 || kind == 1, "head_map[", h, ", 0] = ", kind,
                      " must be 0 (retrieval) or 1 (streaming)");
    std::vector<int64_t>& inv = kind == 0 ? p.ret_kv : p.str_kv;
    const int64_t n = static_cast<int64_t>(inv.size());
    TORCH_CHECK_VALUE(idx >= 0 && idx < n && inv[idx] < 0, "head_map[", h, ", 1] = ", idx, " must be a distinct index ",
                      "in [0, ", n, ") (", kind == 0 ? "k_cache heads" : "k_stream heads", ")");
    inv[idx] = h;
  }
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < p.rows; ++b) {
    TORCH_CHECK_VALUE(lp[b] >= 1, "seq_lens[", b, "] = ", lp[b], ": decode needs at least the new token");
    p.row_len.push_back(lp[b]);
    p.row_seq.push_back(b);
  }
  if (p.n_ret) check_blocks(p, block_table, lp, k_cache.size(0));
  // each request's ring: an existing one, with a slot for each kept token
  for (int64_t b = 0; p.n_str && b < p.rows; ++b) {
    const int64_t r = ring_block.has_value() ? index_at(*ring_block, b, 0) : b;
    TORCH_CHECK_VALUE(r >= 0 && r < k_stream.size(0), "ring_block[", b, "] = ", r, " is outside k_stream's ",
                      k_stream.size(0), " rings");
    const int64_t kept = std::min(lp[b], sink + window);
    TORCH_CHECK_VALUE(kept <= k_stream.size(2), "k_stream has ", k_stream.size(2), " ring slots but request ", b,
                      " (seq_lens[", b, "] = ", lp[b], ") keeps min(seq_len, sink + window = ", sink + window, ") = ",
                      kept, " tokens");
    p.row_ring.push_back(r);
  }
  return run(p, q, k_cache, v_cache, k_stream, v_stream, num_splits);
}


}  // namespace
}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def(
      "duo_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor k_stream, "
      "Tensor v_stream, Tensor head_map, int sink, int window, float scale, int num_splits, Tensor? ring_block=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) {
  m.impl("duo_decode", &kvcomp::duo_decode_cpu);
}
