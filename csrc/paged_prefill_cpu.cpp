// SPDX-License-Identifier: Apache-2.0
// torch.ops.kvcomp_C.paged_prefill: causal varlen attention of packed queries straight over a paged
// KV cache (prefill and chunked prefill; reference kvcomp/ref/attention.py::paged_attention). Query
// row i of sequence b (rows query_start_loc[b] : query_start_loc[b+1], its last q_len tokens) sees
// the first seq_lens[b] - q_len + i + 1 tokens.
//
// Flash-attention tiling (prefill_tiles.h). A work item is (sequence, KV head, tile of query tokens);
// its M = tokens x G query rows walk the causal key range in tiles of kKTile tokens, each key / value
// tile copied out of the pages through the block table. Items are sorted by cost (rows x visible
// keys) and taken dynamically by the threads of at::parallel_for.
// Only the last dim of q and the caches must be contiguous (vLLM page views, transposed tables).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "prefill_tiles.h"

namespace kvcomp {
namespace {

struct Work {
  int64_t b, h, i0, i1;  // sequence, KV head, query tokens [i0, i1) of the sequence's q_len
  int64_t cost;          // query rows x keys the last token sees
};

struct Problem {
  int64_t hq, hkv, g, d, block_size, bps = 0;
  float scale;
  std::vector<int64_t> q0, q_len, len;  // per sequence: first packed row, query tokens, context tokens
  std::vector<int64_t> blocks;          // [B, bps] validated block ids of the sequences with queries
  const float* q;                       // [total_q, Hq, D] fp32, contiguous
  float* out;                           // [total_q, Hq, D] fp32, contiguous
};

template <typename T>
void run_item(const Problem& p, const Work& w, const at::Tensor& k_cache, const at::Tensor& v_cache, Buffers& buf,
              const Kernels<T>& kn) {
  const int64_t d = p.d, g = p.g, nt = w.i1 - w.i0, rows = nt * g;
  const int64_t first = p.len[w.b] - p.q_len[w.b] + w.i0;  // position of the item's first query token
  const int64_t kend = first + nt;                           // keys its last token sees
  const int64_t row0 = (p.q0[w.b] + w.i0) * p.hq + w.h * g;  // the item's first row of q and out
  begin_rows(buf, p.q + row0 * d, p.hq * d, nt, g, d, p.scale);
  const T* kb = k_cache.const_data_ptr<T>() + w.h * k_cache.stride(2);
  const T* vb = v_cache.const_data_ptr<T>() + w.h * v_cache.stride(2);
  const int64_t k0 = k_cache.stride(0), k1 = k_cache.stride(1), v0 = v_cache.stride(0), v1 = v_cache.stride(1);
  const int64_t* blk = p.blocks.data() + w.b * p.bps;
  for (int64_t n0 = 0; n0 < kend; n0 += kKTile) {
    const int64_t nb = std::min(kKTile, kend - n0);
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t tok = n0 + j, bid = blk[tok / p.block_size], off = tok % p.block_size;
      kn.to_float(kb + bid * k0 + off * k1, d, buf.k.data() + j * d);
      kn.to_float(vb + bid * v0 + off * v1, d, buf.v.data() + j * d);
    }
    for (int64_t r = 0; r < rows; ++r) buf.valid[r] = first + r / g + 1 - n0;
    flash_step<T>(buf, rows, nb, d, kn);
  }
  end_rows(buf, p.out + row0 * d, p.hq * d, nt, g, d);
}

template <typename T>
void run(const Problem& p, const std::vector<Work>& work, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const Kernels<T> kn = kernels<T>();
  int64_t max_rows = 0;
  for (const Work& w : work) max_rows = std::max(max_rows, (w.i1 - w.i0) * p.g);
  for_items(static_cast<int64_t>(work.size()), max_rows, p.d,
            [&](int64_t i, Buffers& buf) { run_item<T>(p, work[i], k_cache, v_cache, buf, kn); });
}

at::Tensor paged_prefill_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens,
                             const at::Tensor& query_start_loc, double scale) {
  using namespace detail;
  check_cpu(q, "q");
  check_dim(q, 3, "q", "[total_q, Hq, D] (packed queries)");
  check_float_dtype(q, "q");
  check_kv_pair(k_cache, v_cache, "k_cache", "v_cache", "[num_blocks, block_size, Hkv, D]");
  check_index(block_table, "block_table", 2, "[B, max_blocks]");
  check_index(seq_lens, "seq_lens", 1, "[B]");
  check_index(query_start_loc, "query_start_loc", 1, "[B + 1]");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  Problem p;
  const int64_t total_q = q.size(0);
  p.hq = q.size(1);
  p.d = q.size(2);
  p.hkv = k_cache.size(2);
  p.block_size = k_cache.size(1);
  p.scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(p.d >= 1 && k_cache.size(3) == p.d, "k_cache head dim ", k_cache.size(3), " must equal q's ",
                    p.d, " (>= 1)");
  TORCH_CHECK_VALUE(p.hkv > 0 && p.hq % p.hkv == 0, "q heads Hq=", p.hq, " must be a multiple of the KV heads Hkv=",
                    p.hkv);
  TORCH_CHECK_VALUE(p.block_size >= 1, "k_cache block_size must be >= 1, got ", shape_str(k_cache));
  p.g = p.hq / p.hkv;
  const int64_t nseq = seq_lens.size(0);
  TORCH_CHECK_VALUE(block_table.size(0) == nseq && query_start_loc.size(0) == nseq + 1, "block_table must have B=",
                    nseq, " rows and query_start_loc B+1 entries, got ", shape_str(block_table), " and ",
                    shape_str(query_start_loc));
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous(), qsl = query_start_loc.to(at::kLong).contiguous();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t* sp = qsl.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(sp[0] == 0 && sp[nseq] == total_q, "query_start_loc must run from 0 to total_q=", total_q,
                    ", got ", sp[0], " .. ", sp[nseq]);
  std::vector<char> used(nseq, 0);
  for (int64_t b = 0; b < nseq; ++b) {
    const int64_t q_len = sp[b + 1] - sp[b];
    TORCH_CHECK_VALUE(q_len >= 0 && q_len <= lp[b], "sequence ", b, ": query_start_loc gives ", q_len,
                      " queries but seq_lens is ", lp[b], " (need 0 <= q_len <= seq_len, non-decreasing offsets)");
    p.q0.push_back(sp[b]);
    p.q_len.push_back(q_len);
    p.len.push_back(lp[b]);
    used[b] = q_len > 0;
  }
  p.bps = read_block_ids(block_table, lp, used, p.block_size, k_cache.size(0), p.blocks);

  at::Tensor out = at::empty({total_q, p.hq, p.d}, q.options().dtype(at::kFloat));
  if (total_q == 0) return out.to(q.scalar_type());
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  p.q = qf.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<float>();
  const int64_t qtok = std::max<int64_t>(1, kQRows / p.g);
  std::vector<Work> work;
  for (int64_t b = 0; b < nseq; ++b) {
    for (int64_t h = 0; h < p.hkv; ++h) {
      for (int64_t i0 = 0; i0 < p.q_len[b]; i0 += qtok) {
        const int64_t i1 = std::min(p.q_len[b], i0 + qtok);
        work.push_back({b, h, i0, i1, (i1 - i0) * (p.len[b] - p.q_len[b] + i1)});
      }
    }
  }
  std::stable_sort(work.begin(), work.end(), [](const Work& a, const Work& b) { return a.cost > b.cost; });
  by_kv_dtype(k_cache.scalar_type(), [&](auto t) { run<decltype(t)>(p, work, k_cache, v_cache); });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace
}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def(
      "paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) { m.impl("paged_prefill", &kvcomp::paged_prefill_cpu); }
