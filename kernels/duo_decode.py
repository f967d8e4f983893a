"""DuoAttention paged decode, head-split, split-K (flash-decoding) — Triton.

One launch serves a batch: each KV head of the layer is either a *retrieval* head (full paged KV,
``[num_blocks, block_size, n_ret, D]`` + block table) or a *streaming* head (rings
``[num_rings, n_str, capacity, D]``, read in place: request ``b``'s ring is ``ring_block[b]``), chosen per
KV head by ``head_map [Hkv, 2] = (kind, index)``.

Stage 1 (``_duo_split_kernel``, grid ``(B, Hkv, num_splits)``): a program owns one KV head of one
sequence and all ``G`` query heads reading it (GQA: K/V are loaded once per group), and one slice of
that head's tokens (retrieval: ``seq_len`` tokens; streaming: ``min(seq_len, sink + window)`` valid
ring slots, which are exactly the visible ones). It writes its normalised partial output and its
log-sum-exp (base 2). Stage 2 (``_duo_reduce_kernel``, grid ``(B, Hq)``) merges the splits with a
log-sum-exp weighted sum. Empty splits write ``lse = -inf`` and weigh nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.kernels._common import (autotune, check_device, check_float, check_head_dim, check_int, dot, dot_f32,
                                    next_pow2, num_sms, prune_sm90)

_LOG2E = 1.4426950408889634
SPLIT_TILE = 64  # the largest tuned BLOCK_N: the split count (and so the scratch) never depends on the config


def _tiles(c, nargs, meta):
    """A ``[BLOCK_N, D]`` key tile in registers; keys and values staged per pipeline stage."""
    size = nargs["q_ptr"].element_size()
    tile = c.kwargs["BLOCK_N"] * meta["D"] * size
    return tile, 2 * tile, meta["F32"]


# the first config is the interpreter's; (16, 8 warps) fits every dtype and head dim (fp32 at D = 256)
_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3)]
_REDUCE_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]  # 2 warps spill at fp32 D=128


# keyed by head dim and GQA group (and dtypes): never by batch size, sequence length or split count
@autotune(_CONFIGS, key=["D", "G"], prune=prune_sm90(_tiles))
@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _duo_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, ks_ptr, vs_ptr, rb_ptr, hm_ptr, po_ptr, plse_ptr,
    qk_scale, buf_slots, page_size, G, NUM_SPLITS,
    sq_b, sq_h,
    skc_n, skc_s, skc_h,
    svc_n, svc_s, svc_h,
    sbt_b,
    sks_b, sks_h, sks_s,
    svs_b, svs_h, svs_s,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    kind = tl.load(hm_ptr + pid_h * 2)
    idx = tl.load(hm_ptr + pid_h * 2 + 1).to(tl.int64)
    seq_len = tl.load(sl_ptr + pid_b)
    is_ret = kind == 0
    n_tok = tl.where(is_ret, seq_len, tl.minimum(seq_len, buf_slots))
    chunk = tl.cdiv(tl.cdiv(n_tok, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, n_tok)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < G
    qh = pid_h * G + offs_g
    q = tl.load(q_ptr + pid_b.to(tl.int64) * sq_b + qh[:, None] * sq_h + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    ret_k = kc_ptr + idx * skc_h
    ret_v = vc_ptr + idx * svc_h
    ring = pid_b.to(tl.int64)
    if kind != 0:  # a streaming head reads its request's ring (rb_ptr is not read without one)
        ring = tl.load(rb_ptr + pid_b).to(tl.int64)
    str_k = ks_ptr + ring * sks_b + idx * sks_h
    str_v = vs_ptr + ring * svs_b + idx * svs_h
    # the head kind as a [BLOCK_N] mask: Triton 3.9's interpreter refuses a scalar bool in a mask
    ret_n = (tl.zeros([BLOCK_N], dtype=tl.int32) + kind) == 0
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        valid = tok < end
        blk = tl.load(bt_ptr + pid_b.to(tl.int64) * sbt_b + tok // page_size, mask=valid & ret_n, other=0)
        blk = blk.to(tl.int64)
        off = tok % page_size
        k_base = tl.where(is_ret, ret_k + blk * skc_n + off * skc_s, str_k + tok.to(tl.int64) * sks_s)
        v_base = tl.where(is_ret, ret_v + blk * svc_n + off * svc_s, str_v + tok.to(tl.int64) * svs_s)
        k = tl.load(k_base[None, :] + offs_d[:, None], mask=valid[None, :], other=0.0)  # [D, BLOCK_N]
        v = tl.load(v_base[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = dot(q, k, F32) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (pid_b * (G * tl.num_programs(1)) + qh).to(tl.int64) * NUM_SPLITS + pid_s
    tl.store(plse_ptr + row, lse, mask=g_mask)
    tl.store(po_ptr + row[:, None] * D + offs_d[None, :], o, mask=g_mask[:, None])


@autotune(_REDUCE_CONFIGS, key=["D"])
@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _duo_reduce_kernel(po_ptr, plse_ptr, o_ptr, NUM_SPLITS, so_b, so_h, HQ,
                       D: tl.constexpr, BLOCK_S: tl.constexpr):
    # the splits in fixed tiles of BLOCK_S (one compiled kernel for every split count, no register blow-up)
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    row = (pid_b * HQ + pid_h).to(tl.int64) * NUM_SPLITS
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        lse = tl.load(plse_ptr + row + s0 + offs_s, mask=s0 + offs_s < NUM_SPLITS, other=float("-inf"))
        m = tl.maximum(m, lse)
    m = tl.max(m, 0)
    num = tl.zeros([D], tl.float32)
    den = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        s_mask = s0 + offs_s < NUM_SPLITS
        lse = tl.load(plse_ptr + row + s0 + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.where(s_mask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
        po = tl.load(po_ptr + (row + s0 + offs_s)[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        num += tl.sum(po * w[:, None], 0)
        den += w
    o = num / tl.sum(den, 0)
    tl.store(o_ptr + pid_b.to(tl.int64) * so_b + pid_h * so_h + offs_d, o.to(o_ptr.dtype.element_ty))


def default_num_splits(batch: int, n_ret: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, KV head), sized from the *retrieval* heads (the streaming heads' rings hold
    ``sink + window`` tokens and their extra splits exit at once): ``batch * n_ret * splits`` >= 4
    programs per SM, at most one split per ``block_n`` tokens of capacity, at most 256. Depends only on
    shapes (CUDA-graph safe), never on the autotuned tile (the launcher passes :data:`SPLIT_TILE`; each
    split rounds its slice up to its own ``BLOCK_N``). With no retrieval head the streaming heads are the work."""
    tiles = max(1, triton.cdiv(max_tokens, block_n))
    want = max(1, triton.cdiv(4 * num_sms(device), max(1, batch * n_ret)))
    return int(max(1, min(tiles, want, 256)))


def duo_decode_attention(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, *,
                         sink: int, window: int, scale: float | None = None,
                         num_splits: int | None = None, ring_block: torch.Tensor | None = None) -> torch.Tensor:
    """DuoAttention decode step (Triton): same signature and result as ``kvcomp.ref.duo.duo_decode_attention``.

    Args:
        q: ``[B, Hq, D]``.
        k_cache, v_cache: ``[num_blocks, block_size, n_ret, D]`` retrieval heads (paged).
        block_table: ``[B, max_blocks]`` int32/int64; seq_lens: ``[B]`` int (incl. the new token, >= 1).
        k_stream, v_stream: ``[num_rings, n_str, capacity, D]`` streaming rings, read in place (each
            request its ``min(seq_len, sink + window, capacity)`` first slots: on CUDA a ring too short
            is never read past its end; on the CPU it is an error, as in the reference).
        head_map: ``[n_ret + n_str, 2]`` int ``(kind, index)``; kind 0 retrieval, 1 streaming.
        sink, window: streaming pattern; scale: default ``1/sqrt(D)``.
        num_splits: KV splits per (sequence, KV head); default from shapes only (no host sync). The key
            tile (``BLOCK_N``), warps and pipeline stages are autotuned per (D, G, dtypes).
        ring_block: ``[B]`` int, request ``b``'s ring index in ``k_stream`` (``None``: ring ``b``).
    Returns:
        ``[B, Hq, D]`` in q's dtype.

    Shape/dtype/device checks always run; value checks (head_map, block and ring ids, lengths) run only for
    CPU tensors, so the CUDA path never syncs and can be captured in a CUDA graph.
    """
    from kvcomp.ref.duo import check_duo_inputs, check_duo_values

    g, n_ret, n_str = check_duo_inputs(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream,
                                       head_map, sink, window, ring_block)
    rings = {} if ring_block is None else {"ring_block": ring_block}
    dev = check_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                       k_stream=k_stream, v_stream=v_stream, head_map=head_map, **rings)
    check_float("q", q)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_stream", k_stream), ("v_stream", v_stream)):
        check_float(name, t, q.dtype)
    check_int("block_table", block_table, 2)
    check_int("seq_lens", seq_lens, 1)
    check_int("head_map", head_map, 2)
    if ring_block is not None:
        check_int("ring_block", ring_block, 1)
    bsz, hq, d = q.shape
    check_head_dim("q", d)
    if dev.type == "cpu":
        check_duo_values(head_map, block_table, seq_lens, n_ret, n_str, k_cache.shape[1], k_cache.shape[0],
                         ring_block, (k_stream.shape[0], k_stream.shape[2]), sink, window)
    hkv = n_ret + n_str
    if num_splits is None:
        cap = max(block_table.shape[1] * k_cache.shape[1] if n_ret else 0, sink + window)
        num_splits = default_num_splits(bsz, n_ret if n_ret else n_str, cap, SPLIT_TILE, dev)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    scale = 1.0 / d ** 0.5 if scale is None else float(scale)
    block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()
    head_map = head_map.to(torch.int32).contiguous()
    if ring_block is not None:
        ring_block = ring_block.to(torch.int32).contiguous()
    elif n_str:  # ring b
        ring_block = torch.arange(bsz, device=dev, dtype=torch.int32)
    else:  # no streaming head: never read, any int32 pointer
        ring_block = head_map
    po = torch.empty((bsz, hq, num_splits, d), device=dev, dtype=torch.float32)
    plse = torch.empty((bsz, hq, num_splits), device=dev, dtype=torch.float32)
    out = torch.empty_like(q)
    if bsz == 0 or hq == 0:
        return out
    f32 = dot_f32(dev, q.dtype)
    # zero-head caches still need a valid pointer; strides of an empty dim are harmless (never read)
    _duo_split_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, ring_block, head_map, po, plse,
        scale * _LOG2E, min(sink + window, k_stream.shape[2]), k_cache.shape[1], g, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        k_stream.stride(0), k_stream.stride(1), k_stream.stride(2),
        v_stream.stride(0), v_stream.stride(1), v_stream.stride(2),
        D=d, BLOCK_G=max(16, next_pow2(g)), F32=f32,
    )
    _duo_reduce_kernel[(bsz, hq)](po, plse, out, num_splits, out.stride(0), out.stride(1), hq, D=d, BLOCK_S=16)
    return out
