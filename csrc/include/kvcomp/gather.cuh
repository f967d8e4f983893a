// SPDX-License-Identifier: Apache-2.0
// Zero-copy gather of selected KV rows from pinned host memory into device memory (no torch
// dependency). The source pointer is the device alias of a pinned host mirror
// (cudaHostGetDevicePointer), so each row is read across PCIe exactly once, straight into its
// destination: no staging copy and no full-cache transfer.
#pragma once

#include <cstdint>

namespace kvcomp::cuda {

struct GatherParams {
  const char* src;      // device-visible alias of the host mirror's first element
  char* out;            // [Hkv, K, D] on the device
  const void* idx;      // [Hkv, K] int32 or int64 (contiguous), on the device
  const int32_t* table; // paged with block table: [table_len] int32 on the device, else nullptr
  int64_t table_len;
  int64_t hkv, k;
  int64_t row_bytes;                                 // D * element size
  int64_t src_head, src_tok, src_block, block_size;  // byte strides; block_size only when paged
  bool paged;
  int64_t limit;       // valid token ids: [0, limit)
  int64_t num_blocks;  // paged: valid block ids [0, num_blocks)
  int64_t out_head, out_tok;  // byte strides of out
  int32_t* status;     // set to 1 when an index or block id is out of range (that row is zero-filled)
};

// One warp per row, grid-stride over the Hkv * K rows; each lane moves VecT-sized words.
template <typename VecT, typename IndexT>
__global__ void gather_rows_kernel(GatherParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t nvec = p.row_bytes / static_cast<int64_t>(sizeof(VecT));
  const IndexT* ids = static_cast<const IndexT*>(p.idx);
  for (int64_t r = warp; r < p.hkv * p.k; r += nwarps) {
    const int64_t h = r / p.k, j = r - h * p.k;
    const int64_t t = static_cast<int64_t>(ids[r]);
    VecT* dst = reinterpret_cast<VecT*>(p.out + h * p.out_head + j * p.out_tok);
    bool valid = t >= 0 && t < p.limit;
    int64_t off = 0;
    if (valid) {
      if (p.paged) {
        const int64_t blk = p.table ? static_cast<int64_t>(p.table[t / p.block_size]) : t / p.block_size;
        valid = blk >= 0 && blk < p.num_blocks;
        off = blk * p.src_block + (t % p.block_size) * p.src_tok + h * p.src_head;
      } else {
        off = h * p.src_head + t * p.src_tok;
      }
    }
    if (!valid) {
      for (int64_t w = lane; w < nvec; w += 32) dst[w] = VecT{};
      if (lane == 0) atomicExch(p.status, 1);
      continue;
    }
    const VecT* s = reinterpret_cast<const VecT*>(p.src + off);
    for (int64_t w = lane; w < nvec; w += 32) dst[w] = s[w];
  }
}

}  // namespace kvcomp::cuda
