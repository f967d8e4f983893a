// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the host-mirror launchers. Every failure is a TORCH_CHECK_VALUE (a
// ValueError in Python, like the pure-torch versions) naming the argument, raised before any work.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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
  // A shift instead of an integer division per id where block_size is a power of two (vLLM's 16).
  const int shift = block_size > 0 && (block_size & (block_size - 1)) == 0 ? __builtin_ctzll(block_size) : -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_VALUE(t >= 0 && t < limit, name, " has an out-of-range token index ", t, " (valid: 0 <= index < ",
                limit, paged ? (table ? ", i.e. max_blocks * block_size" : ", i.e. num_blocks * block_size") : "",
                ")");
    if (paged && table) {
      const int64_t blk = table[shift >= 0 ? t >> shift : t / block_size];
      TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, table_name, " maps token ", t, " to block ", blk,
                  ", outside the cache's ", num_blocks, " blocks");
    }
  }
}

// Entry [i, j] of a 2-D (or [i] of a 1-D, j = 0) int32/int64 tensor, any strides.
inline int64_t index_at(const at::Tensor& t, int64_t i, int64_t j) {
  const int64_t off = i * t.stride(0) + j * (t.dim() > 1 ? t.stride(1) : 0);
  return t.scalar_type() == at::kInt ? static_cast<int64_t>(t.const_data_ptr<int32_t>()[off])
                                     : t.const_data_ptr<int64_t>()[off];
}

inline void check_index(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  check_cpu(t, name);
  check_index_dtype(t, name);
  check_dim(t, dim, name, layout);
}

// A K/V cache pair: CPU, 4-D, float dtype, equal dtypes and shapes, last dims contiguous.
inline void check_kv_pair(const at::Tensor& k, const at::Tensor& v, const char* kn, const char* vn,
                          const char* layout) {
  check_cpu(k, kn);
  check_cpu(v, vn);
  check_dim(k, 4, kn, layout);
  check_dim(v, 4, vn, layout);
  check_float_dtype(k, kn);
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), vn, " dtype ", v.scalar_type(), " differs from ", kn,
                    " dtype ", k.scalar_type());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), vn, " shape ", shape_str(v), " differs from ", kn, " shape ",
                    shape_str(k));
  check_last_dim_contiguous(k, kn);
  check_last_dim_contiguous(v, vn);
}

// Reads the block ids each table row s with used[s] needs (ceil(seq_lens[s] / block_size)) into
// ids [rows, width], width the most any used row needs (returned); checks width against the table's
// columns and every id read against the cache's num_blocks (any table strides).
inline int64_t read_block_ids(const at::Tensor& block_table, const int64_t* seq_lens, const std::vector<char>& used,
                              int64_t block_size, int64_t num_blocks, std::vector<int64_t>& ids) {
  const int64_t nseq = block_table.size(0), max_blocks = block_table.size(1);
  int64_t width = 0;
  for (int64_t s = 0; s < nseq; ++s) {
    if (used[s]) width = std::max(width, (seq_lens[s] + block_size - 1) / block_size);
  }
  TORCH_CHECK_VALUE(width <= max_blocks, "seq_lens need up to ", width, " blocks but block_table has ", max_blocks,
                    " columns");
  ids.assign(nseq * width, 0);
  for (int64_t s = 0; s < nseq; ++s) {
    for (int64_t j = 0; used[s] && j * block_size < seq_lens[s]; ++j) {
      const int64_t id = index_at(block_table, s, j);
      TORCH_CHECK_VALUE(id >= 0 && id < num_blocks, "block_table[", s, ", ", j, "] = ", id, " is outside the cache's ",
                        num_blocks, " blocks (seq_lens[", s, "] = ", seq_lens[s], ")");
      ids[s * width + j] = id;
    }
  }
  return width;
}

}  // namespace kvcomp::detail
