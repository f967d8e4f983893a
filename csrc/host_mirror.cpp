// SPDX-License-Identifier: Apache-2.0
// Host-mirror gather / scatter: row copies between a (pinned) host KV mirror and contiguous
// buffers, multi-threaded with at::parallel_for. Copies are dtype-agnostic (memcpy of D elements).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "kvcomp/host_mirror.h"

namespace kvcomp {
namespace {

// Rows per parallel task: at least ~32 KiB of copying so thread start-up stays negligible.
int64_t copy_grain(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(row_bytes, 1)); }

}  // namespace

void gather_tokens_cpu(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out,
                       const std::optional<at::Tensor>& block_table) {
  using namespace detail;
  check_cpu(src, "src");
  check_cpu(idx, "idx");
  check_cpu(out, "out");
  TORCH_CHECK_VALUE(src.dim() == 3 || src.dim() == 4,
              "src must be a dense [Hkv, T, D] or paged [num_blocks, block_size, Hkv, D] mirror, got shape ",
              shape_str(src));
  const bool paged = src.dim() == 4;
  const int64_t hkv = paged ? src.size(2) : src.size(0);
  const int64_t d = src.size(-1);
  check_dim(idx, 2, "idx", "[Hkv, K]");
  check_index_dtype(idx, "idx");
  check_contiguous(idx, "idx");
  TORCH_CHECK_VALUE(idx.size(0) == hkv, "idx has ", idx.size(0), " heads but src has Hkv=", hkv);
  const int64_t k = idx.size(1);
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == hkv && out.size(1) == k && out.size(2) == d,
              "out must have shape [Hkv, K, D] = [", hkv, ", ", k, ", ", d, "], got ", shape_str(out));
  TORCH_CHECK_VALUE(out.scalar_type() == src.scalar_type(), "out dtype ", out.scalar_type(), " differs from src dtype ",
              src.scalar_type());
  check_last_dim_contiguous(src, "src");
  check_last_dim_contiguous(out, "out");
  const int32_t* table = nullptr;
  int64_t table_len = 0;
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_VALUE(paged, "block_table is only valid with a paged src [num_blocks, block_size, Hkv, D]");
    check_cpu(bt, "block_table");
    check_dim(bt, 1, "block_table", "[max_blocks] (one sequence)");
    TORCH_CHECK_VALUE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    check_contiguous(bt, "block_table");
    table = bt.data_ptr<int32_t>();
    table_len = bt.size(0);
  }
  if (k == 0 || hkv == 0) return;

  const TokenAddr addr = [&] {
    TokenAddr a = make_addr(src, paged, 0);
    a.table = table;
    return a;
  }();
  const int64_t esize = src.element_size();
  const int64_t row_bytes = d * esize;
  const char* sbase = static_cast<const char*>(src.data_ptr());
  char* obase = static_cast<char*>(out.data_ptr());
  const int64_t o_sh = out.stride(0), o_sk = out.stride(1);

  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "gather_tokens_cpu", [&] {
    const index_t* ids = idx.data_ptr<index_t>();
    check_token_ids(ids, hkv * k, "idx", paged, paged ? 0 : src.size(1), paged ? src.size(0) : 0,
                    paged ? src.size(1) : 1, table, table_len, "block_table");
    at::parallel_for(0, hkv * k, copy_grain(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t h = r / k, j = r % k;
        const int64_t so = addr.offset(h, static_cast<int64_t>(ids[r]));
        std::memcpy(obase + (h * o_sh + j * o_sk) * esize, sbase + so * esize, row_bytes);
      }
    });
  });
}

void scatter_tokens_cpu(at::Tensor& cache, const at::Tensor& new_tokens, const at::Tensor& slots) {
  using namespace detail;
  check_cpu(cache, "cache");
  check_cpu(new_tokens, "new_tokens");
  check_cpu(slots, "slots");
  TORCH_CHECK_VALUE(cache.dim() == 3 || cache.dim() == 4,
              "cache must be a dense [Hkv, T, D] or paged [num_blocks, block_size, Hkv, D] mirror, got shape ",
              shape_str(cache));
  const bool paged = cache.dim() == 4;
  const int64_t hkv = paged ? cache.size(2) : cache.size(0);
  const int64_t d = cache.size(-1);
  check_dim(new_tokens, 3, "new_tokens", "[N, Hkv, D]");
  check_dim(slots, 1, "slots", "[N]");
  check_index_dtype(slots, "slots");
  check_contiguous(slots, "slots");
  const int64_t n = new_tokens.size(0);
  TORCH_CHECK_VALUE(new_tokens.size(1) == hkv && new_tokens.size(2) == d, "new_tokens must have shape [N, Hkv, D] = [N, ",
              hkv, ", ", d, "], got ", shape_str(new_tokens));
  TORCH_CHECK_VALUE(slots.size(0) == n, "slots has ", slots.size(0), " entries but new_tokens has N=", n);
  TORCH_CHECK_VALUE(new_tokens.scalar_type() == cache.scalar_type(), "new_tokens dtype ", new_tokens.scalar_type(),
              " differs from cache dtype ", cache.scalar_type());
  check_last_dim_contiguous(cache, "cache");
  check_last_dim_contiguous(new_tokens, "new_tokens");
  if (n == 0 || hkv == 0) return;

  const int64_t num_slots = paged ? cache.size(0) * cache.size(1) : cache.size(1);
  const TokenAddr addr = make_addr(cache, paged, 0);
  const int64_t esize = cache.element_size();
  const int64_t row_bytes = d * esize;
  char* cbase = static_cast<char*>(cache.data_ptr());
  const char* nbase = static_cast<const char*>(new_tokens.data_ptr());
  const int64_t n_sn = new_tokens.stride(0), n_sh = new_tokens.stride(1);

  AT_DISPATCH_INDEX_TYPES(slots.scalar_type(), "scatter_tokens_cpu", [&] {
    const index_t* sl = slots.data_ptr<index_t>();
    // duplicates found by sorting the N slots (not a flag per cache slot: the cache may hold millions)
    std::vector<int64_t> used;
    used.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = static_cast<int64_t>(sl[i]);
      if (s < 0) continue;
      TORCH_CHECK_VALUE(s < num_slots, "slots has an out-of-range slot ", s, " (the cache has ", num_slots,
                  paged ? " slots = num_blocks * block_size)" : " token positions)");
      used.push_back(s);
    }
    std::sort(used.begin(), used.end());
    const auto dup = std::adjacent_find(used.begin(), used.end());
    TORCH_CHECK_VALUE(dup == used.end(), "slots has the slot ", dup == used.end() ? 0 : *dup,
                      " more than once (which token wins would be undefined)");
    at::parallel_for(0, n * hkv, copy_grain(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r / hkv, h = r % hkv;
        const int64_t s = static_cast<int64_t>(sl[i]);
        if (s < 0) continue;
        std::memcpy(cbase + addr.offset(h, s) * esize, nbase + (i * n_sn + h * n_sh) * esize, row_bytes);
      }
    });
  });
}

}  // namespace kvcomp
