// SPDX-License-Identifier: Apache-2.0
// torch.ops.kvcomp_C.streaming_prefill: sink + window attention of DuoAttention's streaming heads
// (reference kvcomp/ref/streaming.py::streaming_attention), varlen over requests. Request b owns
// query rows cu_q[b] : cu_q[b+1] and key / value rows cu_k[b] : cu_k[b+1] of the packed tensors; a
// query at position qp sees the request's keys at positions kp <= qp with kp < sink or
// qp - kp < window (window >= 1 counts the query's own token). Key rows may be in any order (e.g.
// a ring's kept tokens, then a chunk): the kernel sorts each request's keys by position once, so a
// query's visible keys are two runs of the sorted order, the sink run (kp < min(sink, qp - window
// + 1)) and the window run (qp - window < kp <= qp), found by binary search. Work per query is
// O(sink + window + tile), not O(T).
//
// Flash-attention tiles (prefill_tiles.h): a work item is (request, KV head, tile of query tokens),
// its rows the whole GQA group of that KV head, so each key / value row is read once per group; the
// sink run and the union of the tile's window runs are walked in key tiles, each row masked to its
// own range. Items are taken dynamically by the threads of at::parallel_for.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "checks.h"
#include "prefill_tiles.h"

namespace kvcomp {
namespace {

struct Work {
  int64_t b, h, i0, i1;  // request, KV head, query tokens [i0, i1) of the request
};

struct Problem {
  int64_t hq, hkv, g, d, sink, window;
  float scale;
  std::vector<int64_t> cq, ck;     // [B + 1] query / key row offsets
  std::vector<int64_t> qpos;       // [total_q] query positions
  std::vector<int64_t> ord, spos;  // [total_k] per request: key rows in position order, their positions
  const float* q;                  // [total_q, Hq, D] fp32, contiguous
  float* out;                      // [total_q, Hq, D] fp32, contiguous
  int64_t k_tok, k_head, v_tok, v_head;  // strides of k and v (last dim contiguous)
};

// Copies key / value rows ord[s0 + j] (j < nb) of KV head h into buf.k, buf.v as fp32.
template <typename T>
void load_keys(const Problem& p, const T* kp, const T* vp, const int64_t* ord, int64_t s0, int64_t nb, Buffers& buf,
               const Kernels<T>& kn) {
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t row = ord[s0 + j];
    kn.to_float(kp + row * p.k_tok, p.d, buf.k.data() + j * p.d);
    kn.to_float(vp + row * p.v_tok, p.d, buf.v.data() + j * p.d);
  }
}

template <typename T>
void run_item(const Problem& p, const Work& w, const T* k, const T* v, Buffers& buf, const Kernels<T>& kn) {
  const int64_t d = p.d, g = p.g, nt = w.i1 - w.i0, rows = nt * g;
  const int64_t qrow = p.cq[w.b] + w.i0, row0 = qrow * p.hq + w.h * g;
  const int64_t* sp = p.spos.data() + p.ck[w.b];
  const int64_t* ord = p.ord.data() + p.ck[w.b];
  const int64_t n = p.ck[w.b + 1] - p.ck[w.b];
  const T* kh = k + w.h * p.k_head;
  const T* vh = v + w.h * p.v_head;
  // Per token: sink run [0, a_end), window run [w_beg, w_end) of the sorted keys.
  std::vector<int64_t> a_end(nt), w_beg(nt), w_end(nt);
  int64_t a_max = 0, lo = n, hi = 0;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t qp = p.qpos[qrow + t], first = qp - p.window + 1;
    a_end[t] = std::lower_bound(sp, sp + n, std::min(p.sink, first)) - sp;
    w_beg[t] = std::lower_bound(sp, sp + n, first) - sp;
    w_end[t] = std::upper_bound(sp, sp + n, qp) - sp;
    a_max = std::max(a_max, a_end[t]);
    if (w_end[t] > w_beg[t]) {
      lo = std::min(lo, w_beg[t]);
      hi = std::max(hi, w_end[t]);
    }
  }
  begin_rows(buf, p.q + row0 * d, p.hq * d, nt, g, d, p.scale);
  for (int64_t n0 = 0; n0 < a_max; n0 += kKTile) {  // sink run
    const int64_t nb = std::min(kKTile, a_max - n0);
    load_keys<T>(p, kh, vh, ord, n0, nb, buf, kn);
    for (int64_t r = 0; r < rows; ++r) {
      buf.first[r] = 0;
      buf.valid[r] = a_end[r / g] - n0;
    }
    flash_step<T>(buf, rows, nb, d, kn);
  }
  for (int64_t n0 = lo; n0 < hi; n0 += kKTile) {  // window runs
    const int64_t nb = std::min(kKTile, hi - n0);
    load_keys<T>(p, kh, vh, ord, n0, nb, buf, kn);
    for (int64_t r = 0; r < rows; ++r) {
      buf.first[r] = w_beg[r / g] - n0;
      buf.valid[r] = w_end[r / g] - n0;
    }
    flash_step<T>(buf, rows, nb, d, kn);
  }
  end_rows(buf, p.out + row0 * d, p.hq * d, nt, g, d);
}

template <typename T>
void run(const Problem& p, const std::vector<Work>& work, const at::Tensor& k, const at::Tensor& v) {
  const Kernels<T> kn = kernels<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  for_items(static_cast<int64_t>(work.size()), std::max<int64_t>(1, kQRows / p.g) * p.g, p.d,
            [&](int64_t i, Buffers& buf) { run_item<T>(p, work[i], kp, vp, buf, kn); });
}

// [n] int64 copy of a 1-D int32 / int64 tensor.
std::vector<int64_t> longs(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

void check_offsets(const std::vector<int64_t>& cu, int64_t total, const char* name, const char* what) {
  TORCH_CHECK_VALUE(cu.front() == 0 && cu.back() == total, name, " must run from 0 to the number of ", what, " rows ",
                    total, ", got ", cu.front(), " .. ", cu.back());
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    TORCH_CHECK_VALUE(cu[b] <= cu[b + 1], name, " must be non-decreasing, got ", cu[b], " then ", cu[b + 1]);
  }
}

void check_rows(const at::Tensor& t, const char* name, const char* layout) {
  using namespace detail;
  check_cpu(t, name);
  check_dim(t, 3, name, layout);
  check_float_dtype(t, name);
  check_last_dim_contiguous(t, name);
}

at::Tensor streaming_prefill_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                                 const at::Tensor& k_pos, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t sink,
                                 int64_t window, double scale) {
  using namespace detail;
  check_rows(q, "q", "[total_q, Hq, D] (packed queries)");
  check_rows(k, "k", "[total_k, Hkv, D] (packed keys)");
  check_rows(v, "v", "[total_k, Hkv, D] (packed values)");
  TORCH_CHECK_VALUE(v.scalar_type() == k.scalar_type(), "v dtype ", v.scalar_type(), " differs from k dtype ",
                    k.scalar_type());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v shape ", shape_str(v), " differs from k shape ", shape_str(k));
  check_index(q_pos, "q_pos", 1, "[total_q]");
  check_index(k_pos, "k_pos", 1, "[total_k]");
  check_index(cu_q, "cu_q", 1, "[B + 1]");
  check_index(cu_k, "cu_k", 1, "[B + 1]");
  Problem p;
  const int64_t total_q = q.size(0), total_k = k.size(0);
  p.hq = q.size(1);
  p.hkv = k.size(1);
  p.d = q.size(2);
  TORCH_CHECK_VALUE(k.size(2) == p.d, "k head dim ", k.size(2), " must equal q's ", p.d);
  TORCH_CHECK_VALUE(p.d == 16 || p.d == 32 || p.d == 64 || p.d == 128 || p.d == 256, "head dim ", p.d,
                    " is not supported (kvcomp's kernels take 16, 32, 64, 128, 256)");
  TORCH_CHECK_VALUE(p.hkv > 0 && p.hq % p.hkv == 0, "q heads Hq=", p.hq, " must be a multiple of the KV heads Hkv=",
                    p.hkv);
  TORCH_CHECK_VALUE(q_pos.size(0) == total_q && k_pos.size(0) == total_k, "q_pos must be [", total_q,
                    "] and k_pos [", total_k, "], got ", shape_str(q_pos), " and ", shape_str(k_pos));
  TORCH_CHECK_VALUE(cu_q.size(0) >= 1 && cu_k.size(0) == cu_q.size(0), "cu_q and cu_k must both be [B + 1], got ",
                    shape_str(cu_q), " and ", shape_str(cu_k));
  TORCH_CHECK_VALUE(sink >= 0, "sink must be >= 0, got ", sink);
  TORCH_CHECK_VALUE(window >= 1, "window must be >= 1 (it counts the query's own token), got ", window);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  p.g = p.hq / p.hkv;
  p.sink = sink;
  p.window = window;
  p.scale = static_cast<float>(scale);
  p.cq = longs(cu_q);
  p.ck = longs(cu_k);
  check_offsets(p.cq, total_q, "cu_q", "query");
  check_offsets(p.ck, total_k, "cu_k", "key");
  p.qpos = longs(q_pos);
  p.spos = longs(k_pos);
  p.ord.resize(total_k);
  const int64_t nreq = static_cast<int64_t>(p.cq.size()) - 1;
  for (int64_t b = 0; b < nreq; ++b) {  // each request's key rows in position order
    int64_t* o = p.ord.data() + p.ck[b];
    int64_t* s = p.spos.data() + p.ck[b];
    const int64_t n = p.ck[b + 1] - p.ck[b];
    std::iota(o, o + n, p.ck[b]);
    if (std::is_sorted(s, s + n)) continue;
    const std::vector<int64_t> pos(s, s + n);
    std::stable_sort(o, o + n, [&](int64_t x, int64_t y) { return pos[x - p.ck[b]] < pos[y - p.ck[b]]; });
    for (int64_t j = 0; j < n; ++j) s[j] = pos[o[j] - p.ck[b]];
  }
  p.k_tok = k.stride(0);
  p.k_head = k.stride(1);
  p.v_tok = v.stride(0);
  p.v_head = v.stride(1);

  at::Tensor out = at::empty({total_q, p.hq, p.d}, q.options().dtype(at::kFloat));
  if (total_q == 0) return out.to(q.scalar_type());
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  p.q = qf.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<float>();
  const int64_t qtok = std::max<int64_t>(1, kQRows / p.g);
  std::vector<Work> work;
  for (int64_t b = 0; b < nreq; ++b) {
    const int64_t nq = p.cq[b + 1] - p.cq[b];
    for (int64_t h = 0; h < p.hkv; ++h) {
      for (int64_t i0 = 0; i0 < nq; i0 += qtok) work.push_back({b, h, i0, std::min(nq, i0 + qtok)});
    }
  }
  by_kv_dtype(k.scalar_type(), [&](auto t) { run<decltype(t)>(p, work, k, v); });
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace
}  // namespace kvcomp

TORCH_LIBRARY_FRAGMENT(kvcomp_C, m) {
  m.def(
      "streaming_prefill(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor k_pos, Tensor cu_q, Tensor cu_k, "
      "int sink, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvcomp_C, CPU, m) { m.impl("streaming_prefill", &kvcomp::streaming_prefill_cpu); }
