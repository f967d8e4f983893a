// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the host-mirror launchers. Every failure is a TORCH_CHECK_VALUE (a
// ValueError in Python, like the pure-torch versions) naming the argument, raised before any work.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kvcomp/host_mirror.h"

namespace kvcomp::detail {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", layout, ", got shape ", shape_str(t));
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
              " must be int32 or int64, got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", st);
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

// Addressing for a dense [Hkv, T, D] mirror (head_dim = 0) or a dense [B, Hkv, T, D] one
// (head_dim = 1; the caller adds the batch offset) or a paged [NB, BS, Hkv, D] mirror.
inline TokenAddr make_addr(const at::Tensor& t, bool paged, int64_t head_dim) {
  TokenAddr a;
  a.paged = paged;
  if (paged) {
    a.stride_block = t.stride(0);
    a.stride_tok = t.stride(1);
    a.stride_head = t.stride(2);
    a.block_size = t.size(1);
  } else {
    a.stride_head = t.stride(head_dim);
    a.stride_tok = t.stride(head_dim + 1);
  }
  return a;
}

// Checks that every token id in ids[0:n] addresses a valid row: dense 0 <= id < T; paged with a
// block-table row of `table_len` entries: 0 <= id < table_len * block_size and the block it maps
// to is in [0, num_blocks); paged without a table: 0 <= id < num_blocks * block_size.
template <typename index_t>
inline void check_token_ids(const index_t* ids, int64_t n, const char* name, bool paged,
                            int64_t num_tokens_dense, int64_t num_blocks, int64_t block_size,
                            const int32_t* table, int64_t table_len, const char* table_name) {
  const int64_t limit = !paged ? num_tokens_dense : (table ? table_len * block_size : num_blocks * block_size);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(t >= 0 && t < limit, name, " has an out-of-range token index ", t, " (valid: 0 <= index < ",
                limit, paged ? (table ? ", i.e. max_blocks * block_size" : ", i.e. num_blocks * block_size") : "",
                ")");
    if (paged && table) {
      const int64_t blk = table[t / block_size];
      TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, table_name, " maps token ", t, " to block ", blk,
                  ", outside the cache's ", num_blocks, " blocks");
    }
  }
}

}  // namespace kvcomp::detail
