// SPDX-License-Identifier: Apache-2.0
// Checked launcher of the zero-copy host->device gather (kernel in include/kvcomp/gather.cuh),
// registered as kvcomp_C::gather_tokens_uva for the CUDA dispatch key (idx and out live on the GPU,
// the source mirror in pinned host memory).
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "checks.h"
#include "kvcomp/gather.cuh"

namespace kvcomp {
namespace {

template <typename IndexT>
void launch(const cuda::GatherParams& p, int64_t align, cudaStream_t stream, int sms) {
  const int threads = 256;
  const int64_t rows = p.hkv * p.k;
  const int64_t want = (rows + (threads / 32) - 1) / (threads / 32);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t{sms} * 8)));
  if (align % 16 == 0) {
    cuda::gather_rows_kernel<uint4, IndexT><<<blocks, threads, 0, stream>>>(p);
  } else if (align % 8 == 0) {
    cuda::gather_rows_kernel<uint2, IndexT><<<blocks, threads, 0, stream>>>(p);
  } else if (align % 4 == 0) {
    cuda::gather_rows_kernel<uint32_t, IndexT><<<blocks, threads, 0, stream>>>(p);
  } else {
    cuda::gather_rows_kernel<uint8_t, IndexT><<<blocks, threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// gcd-like alignment of every byte offset the kernel forms, so the widest safe word is chosen.
int64_t common_alignment(std::initializer_list<int64_t> values) {
  int64_t a = 16;
  for (int64_t v : values) {
    while (a > 1 && v % a != 0) a /= 2;
  }
  return a;
}

}  // namespace

// Returns a [1] int32 status tensor on out's device: 0 when every index was valid, 1 otherwise
// (invalid rows are zero-filled). Reading it synchronises; callers that trust their indices skip it.
at::Tensor gather_tokens_uva(const at::Tensor& src, const at::Tensor& idx, at::Tensor& out,
                             const std::optional<at::Tensor>& block_table) {
  using namespace detail;
  TORCH_CHECK_VALUE(src.device().is_cpu() && src.is_pinned(),
              "src must be a pinned host tensor (allocate it with pin_memory=True), got device ", src.device(),
              src.device().is_cpu() ? " (not pinned)" : "");
  TORCH_CHECK_VALUE(idx.is_cuda(), "idx must be a CUDA tensor for the zero-copy gather, got ", idx.device());
  TORCH_CHECK_VALUE(out.is_cuda() && out.device() == idx.device(), "out must be on idx's device ", idx.device(),
              ", got ", out.device());
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
    TORCH_CHECK_VALUE(bt.device() == idx.device(), "block_table must be on idx's device ", idx.device(), ", got ",
                bt.device());
    check_dim(bt, 1, "block_table", "[max_blocks] (one sequence)");
    TORCH_CHECK_VALUE(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
    check_contiguous(bt, "block_table");
    table = bt.data_ptr<int32_t>();
    table_len = bt.size(0);
  }

  const c10::cuda::CUDAGuard guard(idx.device());
  auto status = at::zeros({1}, idx.options().dtype(at::kInt));
  if (k == 0 || hkv == 0) return status;

  // Device alias of the pinned allocation (equal to the host pointer on UVA systems, but this is
  // the documented way to obtain it); the tensor's offset into its storage is added afterwards.
  void* host_base = src.storage().mutable_data();
  void* dev_base = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev_base, host_base, 0));
  const int64_t es = src.element_size();
  const int64_t byte_offset = static_cast<const char*>(src.data_ptr()) - static_cast<const char*>(host_base);

  cuda::GatherParams p{};
  p.src = static_cast<const char*>(dev_base) + byte_offset;
  p.out = static_cast<char*>(out.data_ptr());
  p.idx = idx.data_ptr();
  p.table = table;
  p.table_len = table_len;
  p.hkv = hkv;
  p.k = k;
  p.row_bytes = d * es;
  p.paged = paged;
  if (paged) {
    p.src_block = src.stride(0) * es;
    p.src_tok = src.stride(1) * es;
    p.src_head = src.stride(2) * es;
    p.block_size = src.size(1);
    p.num_blocks = src.size(0);
    p.limit = table ? table_len * src.size(1) : src.size(0) * src.size(1);
  } else {
    p.src_head = src.stride(0) * es;
    p.src_tok = src.stride(1) * es;
    p.block_size = 1;
    p.num_blocks = 0;
    p.limit = src.size(1);
  }
  p.out_head = out.stride(0) * es;
  p.out_tok = out.stride(1) * es;
  p.status = status.data_ptr<int32_t>();

  const int64_t align = common_alignment({reinterpret_cast<int64_t>(p.src), reinterpret_cast<int64_t>(p.out),
                                          p.row_bytes, p.src_head, p.src_tok, p.src_block, p.out_head, p.out_tok});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(idx.device().index());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, idx.device().index()));
  if (idx.scalar_type() == at::kInt) {
    launch<int32_t>(p, align, stream, sms);
  } else {
    launch<int64_t>(p, align, stream, sms);
  }
  return status;
}

TORCH_LIBRARY_IMPL(kvcomp_C, CUDA, m) { m.impl("gather_tokens_uva", &gather_tokens_uva); }

}  // namespace kvcomp
