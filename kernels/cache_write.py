"""Cache writes (Triton): paged KV by slot mapping, and the DuoAttention streaming ring buffer.

``write_paged_kv``: vLLM ``reshape_and_cache`` semantics; grid ``(cdiv(N, BLOCK_T), Hkv)``, each program
copies a ``[BLOCK_T, D]`` tile of one head to its slots (``slot == -1`` skips the token).

``write_streaming_kv``: grid ``(B, cdiv(sink + window, BLOCK_S))``; each program owns ring *slots*
(not tokens) and pulls, for every slot, the unique new token that must end there: slot ``s < sink``
takes token ``s``; ring slot ``s`` takes ``p = L-1 - ((L-1-s) mod window)``, the newest position
``<= L-1`` congruent to it, if that token is new in this call (``p >= L - q_len``) and ``p >= sink``.
Owning slots makes the write race-free when a chunk wraps the ring, and needs no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.kernels._common import (check_device, check_float, check_head_dim, check_int, check_shape, kv_block_n,
                                    next_pow2)


@triton.jit
def _paged_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, N, page_size,
                        sk_n, sk_h, sv_n, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                        D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    in_range = tok < N
    slot = tl.load(slot_ptr + tok, mask=in_range, other=-1).to(tl.int64)
    keep = in_range & (slot >= 0)
    blk = tl.where(keep, slot // page_size, 0)
    off = tl.where(keep, slot % page_size, 0)
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64[:, None] * sk_n + h * sk_h + offs_d[None, :], mask=keep[:, None])
    v = tl.load(v_ptr + tok64[:, None] * sv_n + h * sv_h + offs_d[None, :], mask=keep[:, None])
    tl.store(kc_ptr + (blk * skc_b + off * skc_s + h * skc_h)[:, None] + offs_d[None, :], k, mask=keep[:, None])
    tl.store(vc_ptr + (blk * svc_b + off * svc_s + h * svc_h)[:, None] + offs_d[None, :], v, mask=keep[:, None])


def write_paged_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``N`` tokens into a paged cache in place (Triton; same contract as
    ``kvcomp.ref.cache_write.write_paged_kv``).

    Args:
        key, value: ``[N, Hkv, D]`` (last dim contiguous, any other strides).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, same dtype as key.
        slot_mapping: ``[N]`` int32/int64, ``block * block_size + offset`` or ``-1`` (skip).
    Slot values are range-checked only for CPU tensors (no host sync on CUDA).
    """
    check_int("slot_mapping", slot_mapping, 1)
    n = slot_mapping.shape[0]
    check_float("k_cache", k_cache)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have shape [num_blocks, block_size, Hkv, D], got {list(k_cache.shape)}")
    nb, bs, h, d = k_cache.shape
    check_shape("v_cache", v_cache, (nb, bs, h, d))
    check_float("v_cache", v_cache, k_cache.dtype)
    check_shape("key", key, (n, h, d))
    check_shape("value", value, (n, h, d))
    check_float("key", key, k_cache.dtype)
    check_float("value", value, k_cache.dtype)
    check_head_dim("k_cache", d)
    dev = check_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if dev.type == "cpu" and n and (int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= nb * bs):
        raise ValueError(f"slot_mapping values must be -1 or in [0, {nb * bs})")
    if n == 0 or h == 0:
        return
    block_t = 16
    _paged_write_kernel[(triton.cdiv(n, block_t), h)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(), n, bs,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        D=d, BLOCK_T=block_t, num_warps=4)


@triton.jit
def _stream_write_kernel(k_ptr, v_ptr, kb_ptr, vb_ptr, qsl_ptr, sl_ptr, H, sink, window,
                         sk_n, sk_h, sv_n, sv_h, skb_b, skb_h, skb_s, svb_b, svb_h, svb_s,
                         D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    slot = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    q0 = tl.load(qsl_ptr + b)
    n_new = tl.load(qsl_ptr + b + 1) - q0
    seq_len = tl.load(sl_ptr + b)
    r = ((seq_len - 1 - slot) % window + window) % window
    pos = tl.where(slot < sink, slot, seq_len - 1 - r)
    keep = (slot < sink + window) & (pos >= seq_len - n_new) & (pos < seq_len) & (pos >= 0)
    keep = keep & ((slot < sink) | (pos >= sink))
    row = tl.where(keep, q0 + pos - (seq_len - n_new), 0).to(tl.int64)
    slot64 = tl.where(keep, slot, 0).to(tl.int64)
    b64 = b.to(tl.int64)
    for h in range(0, H):
        k = tl.load(k_ptr + row[:, None] * sk_n + h * sk_h + offs_d[None, :], mask=keep[:, None])
        v = tl.load(v_ptr + row[:, None] * sv_n + h * sv_h + offs_d[None, :], mask=keep[:, None])
        tl.store(kb_ptr + (b64 * skb_b + h * skb_h + slot64 * skb_s)[:, None] + offs_d[None, :], k,
                 mask=keep[:, None])
        tl.store(vb_ptr + (b64 * svb_b + h * svb_h + slot64 * svb_s)[:, None] + offs_d[None, :], v,
                 mask=keep[:, None])


def write_streaming_kv(key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                       query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, sink: int) -> None:
    """Roll the streaming window: write packed new tokens into the compact ring buffers in place (Triton;
    same contract as ``kvcomp.ref.cache_write.write_streaming_kv``).

    Args:
        key, value: ``[total_new, n_str, D]``; sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b+1]`` (its last tokens).
        k_buf, v_buf: ``[B, n_str, sink + window, D]``, same dtype as key.
        query_start_loc: ``[B+1]`` int; seq_lens: ``[B]`` int (tokens incl. the new ones).
        sink: sink slots; ``window = k_buf.shape[2] - sink`` must be >= 1.
    Lengths are checked only for CPU tensors (no host sync on CUDA).
    """
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be a non-negative int, got {sink!r}")
    check_float("k_buf", k_buf)
    if k_buf.dim() != 4:
        raise ValueError(f"k_buf must have shape [B, n_str, sink + window, D], got {list(k_buf.shape)}")
    bsz, h, slots, d = k_buf.shape
    window = slots - sink
    if window < 1:
        raise ValueError(f"sink={sink} leaves no window slots in k_buf with {slots} slots")
    check_shape("v_buf", v_buf, (bsz, h, slots, d))
    check_float("v_buf", v_buf, k_buf.dtype)
    check_int("query_start_loc", query_start_loc, 1)
    check_int("seq_lens", seq_lens, 1)
    check_shape("query_start_loc", query_start_loc, (bsz + 1,))
    check_shape("seq_lens", seq_lens, (bsz,))
    if key.dim() != 3:
        raise ValueError(f"key must have shape [total_new, {h}, {d}], got {list(key.shape)}")
    check_shape("key", key, (None, h, d))
    check_shape("value", value, (key.shape[0], h, d))
    check_float("key", key, k_buf.dtype)
    check_float("value", value, k_buf.dtype)
    check_head_dim("k_buf", d)
    dev = check_device(key=key, value=value, k_buf=k_buf, v_buf=v_buf, query_start_loc=query_start_loc,
                       seq_lens=seq_lens)
    if dev.type == "cpu":
        qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
        if qsl[0] != 0 or qsl[-1] != key.shape[0]:
            raise ValueError(f"query_start_loc must run from 0 to total_new={key.shape[0]}, got {qsl}")
        for i in range(bsz):
            if qsl[i + 1] < qsl[i] or lens[i] < qsl[i + 1] - qsl[i]:
                raise ValueError(f"sequence {i}: {qsl[i + 1] - qsl[i]} new tokens but seq_lens[{i}]={lens[i]}")
    if bsz == 0 or h == 0:
        return
    block_s = min(kv_block_n(d, k_buf.dtype), max(16, next_pow2(slots)))  # D=256: 64 slots spill on sm_90
    _stream_write_kernel[(bsz, triton.cdiv(slots, block_s))](
        key, value, k_buf, v_buf, query_start_loc.contiguous(), seq_lens.contiguous(), h, sink, window,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
        D=d, BLOCK_S=block_s, num_warps=4)
