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

import itertools

import torch

from .. import ref


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
        """Encode this step's (post-RoPE) keys ``[n, Hkv, D]`` into their code slots."""
        slots = md.slot_mapping.long()
        keep = slots >= 0
        pos = token_positions(md)
        cos, sin = self._cos_sin(pos)
        k_pre = ref.unapply_rope(key.float(), cos[:, None, :], sin[:, None, :])
        codes = ref.vq_encode(k_pre.permute(1, 0, 2).unsqueeze(0), self.codebook, self.whiten)[0].T  # [n, Hkv]
        codes, slots = codes[keep], slots[keep]
        view = code_view(kv_cache)
        bs = view.shape[1]
        view[slots // bs, slots % bs] = codes.to(torch.int16)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, md, scale: float, output: torch.Tensor) -> None:
        """Exact attention for multi-token queries, top-K sparse attention for one-token queries.

        ``q [n, Hq', D]`` holds the query heads of the paged KV heads (GQA groups in page order);
        rows ``[:n]`` of ``output [.., Hq', Dv]`` are written."""
        qsl = md.query_start_loc.tolist()
        qlens = [qsl[b + 1] - qsl[b] for b in range(md.num_reqs)]
        hk, hv = self.mirror.k[:, :, : self.n_heads], self.mirror.v[:, :, : self.n_heads]
        dev = q.device
        multi = [b for b, n in enumerate(qlens) if n > 1]
        single = [b for b, n in enumerate(qlens) if n == 1]
        if multi:
            bt = md.block_table[multi].cpu()
            lens = md.seq_lens[multi].cpu()
            rows = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in multi])
            sub_qsl = torch.tensor([0] + list(itertools.accumulate(qlens[b] for b in multi)))
            o = ref.paged_attention(q[rows.to(dev)].cpu(), hk, hv, bt, lens, sub_qsl, scale=scale)
            output[rows.to(dev)] = o.to(output.dtype).to(dev)
        if single:
            rows = torch.tensor([qsl[b] for b in single], device=dev)
            bsel = torch.tensor(single, device=dev)
            lens = md.seq_lens[bsel].long()
            bt = md.block_table[bsel]
            qd = q[rows]  # [Bd, Hq, D]
            cos, sin = self._cos_sin(lens - 1)
            q_pre = ref.unapply_rope(qd.float(), cos[:, None, :], sin[:, None, :])
            qw = ref.windowed_rope_query(q_pre, self.inv_freq, self.vq.rel_pos, self.scaling)
            lut = ref.vq_lut(qw, self.codebook, scale=scale)
            topk = torch.tensor([self.vq.topk_tokens(int(n)) for n in lens.tolist()], device=dev)
            idx, count = ref.paged_vq_topk(lut, code_view(kv_cache), bt, lens, topk=topk, sink=self.vq.sink,
                                           local=self.vq.local)
            o = ref.paged_sparse_attention(qd.cpu(), hk, hv, bt.cpu(), idx.cpu(), count.cpu(), scale=scale)
            output[rows] = o.to(output.dtype).to(dev)
