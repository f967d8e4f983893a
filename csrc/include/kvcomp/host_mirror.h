// SPDX-License-Identifier: Apache-2.0
// Host-mirror (CPU) operators of A2ATS offloading: declarations and the shared token-addressing
// helper. The operators are registered with the torch dispatcher in csrc/bindings.cpp under the
// namespace `kvcomp_C` and called from kvcomp/ops/host_mirror.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace kvcomp {

// Copies the tokens idx[h, :] of every KV head h into out[h, :, :].
//   src  dense  [Hkv, T, D]                 (idx = token positions)
//        paged  [num_blocks, block_size, Hkv, D]
//               with block_table [max_blocks] int32: idx = token positions of one sequence
//               without block_table:             idx = flat slots (block * block_size + offset)
//   idx  [Hkv, K] int32/int64, out [Hkv, K, D] with src's dtype and device (CPU).
void gather_tokens_cpu(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out,
                       const std::optional<at::Tensor>& block_table);

// Writes new tokens into a host mirror: cache[slot of n][h] = new_tokens[n, h] for every n with
// slots[n] >= 0 (negative slots are skipped, vLLM's padding convention).
//   cache dense [Hkv, T, D] (slot = token position) or paged [num_blocks, block_size, Hkv, D]
//         (slot = block * block_size + offset); new_tokens [N, Hkv, D]; slots [N] int32/int64.
void scatter_tokens_cpu(at::Tensor& cache, const at::Tensor& new_tokens, const at::Tensor& slots);

// Exact decode attention on the CPU over the selected tokens of each KV head.
//   q [B, Hq, D]; k, v dense [B, Hkv, T, D|Dv] or paged [num_blocks, block_size, Hkv, D|Dv] with
//   block_table [B, max_blocks] int32; idx [B, Hkv, K] int32/int64 token positions, of which the
//   first count[b, h] (1 <= count <= K) are used; query head h reads KV head h / (Hq / Hkv).
//   Returns out [B, Hq, Dv] in q's dtype; softmax and accumulation in fp32.
at::Tensor sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& idx, const at::Tensor& count,
                                const std::optional<at::Tensor>& block_table, double scale);

namespace detail {

// Address of one token row of one KV head in a dense [.., Hkv, T, D] or paged
// [num_blocks, block_size, Hkv, D] host mirror, in elements from the tensor's data pointer.
struct TokenAddr {
  bool paged = false;
  int64_t stride_tok = 0;    // dense: stride of T; paged: stride of the in-block offset
  int64_t stride_head = 0;   // stride of Hkv
  int64_t stride_block = 0;  // paged only
  int64_t block_size = 1;    // paged only
  const int32_t* table = nullptr;  // paged with block table: one row of it (nullptr: flat slots)

  inline int64_t offset(int64_t head, int64_t token) const {
    if (!paged) return head * stride_head + token * stride_tok;
    const int64_t blk = table ? static_cast<int64_t>(table[token / block_size]) : token / block_size;
    return blk * stride_block + (token % block_size) * stride_tok + head * stride_head;
  }
};

}  // namespace detail
}  // namespace kvcomp
