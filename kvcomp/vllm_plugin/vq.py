"""A²ATS in vLLM: VQ codes in the device pages, full K/V in the host mirror, top-K exact attention.

Semantics equal kvcomp's HF path (:class:`kvcomp.hf.cache.KVCompLayer`, ``vq`` group): a query of
more than one token (prefill, chunked prefill) attends exactly to every token; a one-token query
(decode) scores every cached code through the windowed-RoPE lookup table, keeps each query head's
``topk`` tokens (union over the GQA group) plus ``sink`` first and ``local`` last tokens, and
attends exactly over them, gathered from the mirror. Codes of this step's tokens are written
before attending, so the current token is always among the ``local`` ones.

Page content: one int16 code per (token, KV head) in a cell of ``max(2, dtype size)`` bytes
(2 bytes in fp16/bf16; fp32 models use 4, the upper half unused).
"""

from __future__ import annotations

import torch

from .. import ops, ref
from .prefill import dense_rows


def rope_from_hf_config(hf_config, head_size: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2], attention_scaling)`` of the model's RoPE, as transformers computes them.

    Raises:
        ValueError: partial rotary embeddings or a RoPE type transformers does not know.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"kvcomp A2ATS: partial rotary embeddings (factor {partial}) are not supported")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
        if theta is None:
            raise ValueError("kvcomp A2ATS: the model config has no rope_theta")
        inv = 1.0 / (float(theta) ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ValueError(f"kvcomp A2ATS: RoPE type {rope_type!r} unknown to transformers")
    inv, scaling = fn(hf_config, torch.device("cpu"))
    return inv.float().cpu(), float(scaling)


def code_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, Hkv]`` int16 view of a code page ``[blocks, Hkv, block_size, C]``."""
    return kv_cache.view(torch.int16)[..., 0].permute(0, 2, 1)


def token_positions(md) -> torch.Tensor:
    """Absolute position of every packed query row ``[num_actual_tokens]`` (int64)."""
    qsl = md.query_start_loc.long()
    qlens = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(md.num_reqs, device=qsl.device), qlens)
    start = md.seq_lens.long() - qlens
    return start[req] + torch.arange(md.num_actual_tokens, device=qsl.device) - qsl[req]


class VQLayer:
    """One layer's A²ATS state on a rank: codebooks of its KV heads, RoPE tables, the host mirror."""

    def __init__(self, vq, layer: int, heads: list[int], inv_freq: torch.Tensor, scaling: float,
                 device: torch.device, mirror):
        """``heads``: global KV-head indices held in this rank's code pages, in page order."""
        self.vq = vq
        idx = torch.tensor(heads, dtype=torch.long)
        self.codebook = vq.codebook[layer, idx].float().to(device)
        self.whiten = vq.whiten[layer, idx].float().to(device)
        self.inv_freq = inv_freq.to(device)
        self.scaling = scaling
        self.mirror = mirror
        self.n_heads = len(heads)  # the mirror's first heads (Duo + A²ATS appends the streaming heads)

    def _cos_sin(self, pos: torch.Tensor):
        return ref.rope_cos_sin(pos, self.inv_freq, self.scaling)

    def write_codes(self, key: torch.Tensor, kv_cache: torch.Tensor, md) -> None:
        """Encode this step's (post-RoPE) keys ``[n, Hkv, D]`` into their code slots (the slots of
        ``md.block_table`` at the tokens' positions, i.e. vLLM's slot mapping)."""
        pos = token_positions(md)
        cos, sin = self._cos_sin(pos)
        k_pre = ref.unapply_rope(key.float(), cos[:, None, :], sin[:, None, :])
        ops.vq_encode_paged(k_pre, self.codebook, self.whiten, code_view(kv_cache), md.block_table, md.seq_lens,
                            md.query_start_loc)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, md, scale: float, output: torch.Tensor,
               multi, single) -> None:
        """Exact attention for multi-token queries, top-K sparse attention for one-token queries.

        ``q [n, Hq', D]`` holds the query heads of the paged KV heads (GQA groups in page order);
        ``multi`` / ``single`` are :class:`~.decode.Rows` (or None) of the multi-token and
        one-token requests; their rows of ``output [.., Hq', Dv]`` are written."""
        if multi is not None:  # each request's K/V from the mirror to q's device, one dense call
            dense_rows(q, *self._mirror_kv(), md, multi.reqs, scale, output)
        if single is not None:
            output[single.rows] = self.decode(q[single.rows], kv_cache, single, scale, md.max_seq_len).to(output.dtype)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, r, scale: float, max_seq_len: int) -> torch.Tensor:
        """A²ATS decode of ``q [d, Hq', D]`` through kvcomp's ops: windowed-RoPE LUT, top-K over the
        code pages (Triton on the GPU), exact attention over the selected mirror rows on the host."""
        lens = r.seq_lens.long()
        cos, sin = self._cos_sin(lens - 1)
        q_pre = ref.unapply_rope(q.float(), cos[:, None, :], sin[:, None, :])
        qw = ref.windowed_rope_query(q_pre, self.inv_freq, self.vq.rel_pos, self.scaling)
        lut = ops.vq_lut(qw.contiguous(), self.codebook, scale=scale)
        kw = {}
        if self.vq.topk >= 1:
            topk = int(self.vq.topk)
        else:  # VQRetrieval.topk_tokens per request, on the device
            topk = torch.clamp(torch.round(lens.double() * self.vq.topk), min=1).to(torch.int32)
            kw["topk_max"] = self.vq.topk_tokens(max(int(max_seq_len), 1))
        idx, count = ops.vq_topk(lut, code_view(kv_cache), r.block_table, r.seq_lens, topk=topk, sink=self.vq.sink,
                                 local=self.vq.local, **kw)
        return ops.sparse_attention_host(q, *self._mirror_kv(), idx, count, block_table=r.block_table, scale=scale)

    def _mirror_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The host mirror's ``(k, v)`` pages of this layer's A²ATS heads (its first ``n_heads``)."""
        return self.mirror.k[:, :, : self.n_heads], self.mirror.v[:, :, : self.n_heads]
