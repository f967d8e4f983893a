// SPDX-License-Identifier: Apache-2.0
// ThinK cache write on the CPU (torch.ops.kvcomp_C.pack_pruned_keys), the native version of the
// custom op kvcomp::pack_pruned_keys (reference: kvcomp/ref/compressed_write.py::pack_pruned_keys_paged).
// New keys k_new [N, Hkv, D] arrive packed by query_start_loc [B + 1]; row i of sequence b has
// position p = seq_lens[b] - n_b + (i - query_start_loc[b]). Every row's kept channels
// k[chan_idx] go to slot p % block_size of block block_table[b, p // block_size] of kp_cache
// [num_blocks, block_size, Hkv, Dk]; rows among the last W of their sequence (p >= seq_lens[b] - W)
// also go full width to ring slot p % W of k_recent [B, Hkv, W, D]. Every input is checked before
// anything is written; rows are copied in parallel (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"

namespace kvcomp {
namespace {

std::vector<int64_t> int_values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// E: an unsigned integer of the element size (the copy moves bits; dtypes already agree).
template <typename E>
void write_rows(const at::Tensor& k, const std::vector<int64_t>& chans, int64_t chan_b, at::Tensor& kp,
                at::Tensor& ring, const std::vector<int64_t>& row_seq, const std::vector<int64_t>& row_pos,
                const std::vector<int64_t>& row_blk, const std::vector<int64_t>& lens) {
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2), dk = kp.size(3), bs = kp.size(1), w = ring.size(2);
  const E* src = static_cast<const E*>(k.data_ptr());
  E* kpb = static_cast<E*>(kp.data_ptr());
  E* rb = static_cast<E*>(ring.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = row_seq[i], p = row_pos[i];
      const int64_t* ci = chans.data() + (chan_b == 1 ? 0 : b) * hkv * dk;
      for (int64_t h = 0; h < hkv; ++h) {
        const E* s = src + i * k.stride(0) + h * k.stride(1);
        E* dst = kpb + row_blk[i] * kp.stride(0) + (p % bs) * kp.stride(1) + h * kp.stride(2);
        const int64_t* c = ci + h * dk;
        for (int64_t j = 0; j < dk; ++j) dst[j] = s[c[j]];
        if (w > 0 && p >= lens[b] - w) {
          std::memcpy(rb + b * ring.stride(0) + h * ring.stride(1) + (p % w) * ring.stride(2), s, d * sizeof(E));
        }
      }
    }
  });
}

}  // namespace

void pack_pruned_keys_cpu(const at::Tensor& k_new, const at::Tensor& chan_idx, at::Tensor& kp_cache,
                          at::Tensor& k_recent, const at::Tensor& block_table, const at::Tensor& seq_lens,
                          const at::Tensor& query_start_loc) {
  using namespace detail;
  check_cpu(k_new, "k_new");
  check_cpu(chan_idx, "chan_idx");
  check_cpu(kp_cache, "kp_cache");
  check_cpu(k_recent, "k_recent");
  check_cpu(block_table, "block_table");
  check_cpu(seq_lens, "seq_lens");
  check_cpu(query_start_loc, "query_start_loc");
  check_dim(k_new, 3, "k_new", "[N, Hkv, D]");
  check_dim(chan_idx, 3, "chan_idx", "[B or 1, Hkv, Dk]");
  check_dim(kp_cache, 4, "kp_cache", "[num_blocks, block_size, Hkv, Dk]");
  check_dim(k_recent, 4, "k_recent", "[B, Hkv, W, D]");
  check_dim(block_table, 2, "block_table", "[B, max_blocks]");
  check_dim(seq_lens, 1, "seq_lens", "[B]");
  check_dim(query_start_loc, 1, "query_start_loc", "[B + 1]");
  check_float_dtype(k_new, "k_new");
  check_float_dtype(kp_cache, "kp_cache");
  TORCH_CHECK_VALUE(k_recent.scalar_type() == kp_cache.scalar_type(),
                    "kp_cache and k_recent must share one dtype, got ",
                    kp_cache.scalar_type(), " and ", k_recent.scalar_type());
  check_index_dtype(chan_idx, "chan_idx");
  check_index_dtype(block_table, "block_table");
  check_index_dtype(seq_lens, "seq_lens");
  check_index_dtype(query_start_loc, "query_start_loc");
  check_last_dim_contiguous(kp_cache, "kp_cache");
  check_last_dim_contiguous(k_recent, "k_recent");
  const int64_t n = k_new.size(0), hkv = k_new.size(1), d = k_new.size(2);
  const int64_t nb = kp_cache.size(0), bs = kp_cache.size(1), dk = kp_cache.size(3), bsz = block_table.size(0);
  TORCH_CHECK_VALUE(bs > 0, "kp_cache block_size must be >= 1, got ", shape_str(kp_cache));
  TORCH_CHECK_VALUE(kp_cache.size(2) == hkv && chan_idx.size(1) == hkv && chan_idx.size(2) == dk,
                    "kp_cache [.., Hkv=", hkv, ", Dk] and chan_idx [B|1, Hkv, Dk] disagree: ", shape_str(kp_cache),
                    ", ",
                    shape_str(chan_idx));
  TORCH_CHECK_VALUE(dk <= d, "kp_cache keeps Dk=", dk, " channels but k_new has D=", d);
  TORCH_CHECK_VALUE(k_recent.size(0) == bsz && k_recent.size(1) == hkv && k_recent.size(3) == d,
                    "k_recent must be [B=", bsz, ", Hkv=", hkv, ", W, D=", d, "], got ", shape_str(k_recent));
  TORCH_CHECK_VALUE(chan_idx.size(0) == 1 || chan_idx.size(0) == bsz, "chan_idx must have batch dim 1 or ", bsz,
                    ", got ", chan_idx.size(0));
  TORCH_CHECK_VALUE(seq_lens.size(0) == bsz, "seq_lens has ", seq_lens.size(0), " entries but block_table has ", bsz,
                    " rows");
  TORCH_CHECK_VALUE(query_start_loc.size(0) == bsz + 1, "query_start_loc must have B + 1 = ", bsz + 1,
                    " entries, got ", query_start_loc.size(0));

  const std::vector<int64_t> chans = int_values(chan_idx);
  for (int64_t c : chans) TORCH_CHECK_VALUE(c >= 0 && c < d, "chan_idx has channel ", c, " outside [0, D=", d, ")");
  const std::vector<int64_t> lens = int_values(seq_lens), qsl = int_values(query_start_loc);
  const std::vector<int64_t> table = int_values(block_table);
  const int64_t max_blocks = block_table.size(1);
  TORCH_CHECK_VALUE(qsl[0] == 0 && qsl[bsz] == n, "query_start_loc must run from 0 to N=", n, ", got ", qsl[0], "..",
                    qsl[bsz]);
  std::vector<int64_t> row_seq(n), row_pos(n), row_blk(n);
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t s = qsl[b], e = qsl[b + 1], len = lens[b];
    TORCH_CHECK_VALUE(e >= s && e <= n, "query_start_loc must be non-decreasing from 0 to N=", n, " (at sequence ",
                      b, ")");
    TORCH_CHECK_VALUE(len >= e - s, "seq_lens[", b, "]=", len, " is smaller than its ", e - s, " new tokens");
    const int64_t nblk = (len + bs - 1) / bs;
    TORCH_CHECK_VALUE(nblk <= max_blocks, "seq_lens[", b, "]=", len, " needs ", nblk, " blocks but block_table has ",
                      max_blocks, " columns");
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t id = table[b * max_blocks + j];
      TORCH_CHECK_VALUE(id >= 0 && id < nb, "block_table[", b, ", ", j, "]=", id, " is outside the cache's ", nb,
                        " blocks");
    }
    for (int64_t i = s; i < e; ++i) {
      row_seq[i] = b;
      row_pos[i] = len - (e - s) + (i - s);
      row_blk[i] = table[b * max_blocks + row_pos[i] / bs];
    }
  }
  if (n == 0 || hkv == 0) return;
  at::Tensor k = k_new.to(kp_cache.scalar_type());  // the cache's dtype (no copy when it is already)
  if (d > 1 && k.stride(2) != 1) k = k.contiguous();
  if (kp_cache.element_size() == 4) {
    write_rows<uint32_t>(k, chans, chan_idx.size(0), kp_cache, k_recent, row_seq, row_pos, row_blk, lens);
  } else {
    write_rows<uint16_t>(k, chans, chan_idx.size(0), kp_cache, k_recent, row_seq, row_pos, row_blk, lens);
  }
}

}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def(
      "pack_pruned_keys(Tensor k_new, Tensor chan_idx, Tensor(a!) kp_cache, Tensor(b!) k_recent, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc) -> ()");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) { m.impl("pack_pruned_keys", &kvcomp::pack_pruned_keys_cpu); }
