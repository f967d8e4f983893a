"""A²ATS benches: decode chain (LUT + top-K + sparse attention) and top-K alone (CUDA registry), and the
CPU cases ``vq3`` / ``vq10`` (top-K 3% / 10%, C=256 codes, sink 8, local 64: ``kvcomp.ops.vq_lut`` ->
``vq_topk`` -> ``sparse_attention_host`` over the paged host mirror, as the vLLM backend decodes) and
``duo50+vq3`` (DuoAttention's retrieval heads through that chain, its streaming heads through
``sparse_attention_host`` over their sink + recent rows of the mirror, as the backend's duo+vq).

Byte model: the int16 codes once, the fp32 codebook once per sequence (the LUT is scored per
sequence), the K/V rows selected (CPU: the union over the GQA group actually selected, from one run;
CUDA registry: the upper bound ``G*topk + sink + local`` per KV head).
"""

from __future__ import annotations

import dataclasses

import torch

from kvcomp.bench.core import (Bench, CpuCase, Problem, generator, pages, randn, register, register_cpu, seq_lens,
                               topk_tokens)
from kvcomp.bench.methods.dense import decode_len, full_attention_baselines, kv_read_bytes


def make_vq_decode(p: Problem) -> dict:
    """A²ATS decode state: paged K/V and int16 codes (permuted blocks), a ``n_codes`` codebook per KV head."""
    g = generator(p)
    nb, bt = pages(p, g)
    bs, nc = p.get("block_size"), p.get("n_codes")
    return dict(q=randn(p, g, p.batch, p.hq, p.d), q_wrope=randn(p, g, p.batch, p.hq, p.d),
                codebook=randn(p, g, p.hkv, nc, p.d, dtype=torch.float32),
                code_cache=torch.randint(0, nc, (nb, bs, p.hkv), device=p.device, dtype=torch.int16, generator=g),
                k_cache=randn(p, g, nb, bs, p.hkv, p.d), v_cache=randn(p, g, nb, bs, p.hkv, p.d), block_table=bt,
                seq_lens=seq_lens(p), topk=topk_tokens(p), sink=p.get("sink"), local=p.get("local"))


def run_vq_decode(x):
    from kvcomp.ops import sparse_attention_host, vq_lut, vq_topk

    lut = vq_lut(x["q_wrope"], x["codebook"])
    idx, count = vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                         local=x["local"])
    return sparse_attention_host(x["q"], x["k_cache"], x["v_cache"], idx, count, block_table=x["block_table"])


def ref_vq_decode(x):
    from kvcomp.ref import paged_sparse_attention, vq_lut
    from kvcomp.ref.vq_paged import paged_vq_topk

    lut = vq_lut(x["q_wrope"], x["codebook"])
    idx, count = paged_vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"],
                               sink=x["sink"], local=x["local"])
    return paged_sparse_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], idx, count)


def bytes_vq_decode(p: Problem, heads: int | None = None, selected: int | None = None) -> int:
    """Codes once + codebook per sequence + selected K/V rows (``selected`` = total rows over the
    batch and heads; default the upper bound ``G*topk + sink + local`` per KV head)."""
    h = p.hkv if heads is None else heads
    if selected is None:
        selected = p.batch * h * min(p.context, p.group * topk_tokens(p) + p.get("sink") + p.get("local"))
    return (p.batch * h * p.context * 2 + p.batch * h * p.get("n_codes") * p.d * 4
            + 2 * selected * p.d * p.elt)


register(Bench(
    name="vq_decode",
    description="A2ATS decode: LUT + exact per-KV-head top-K over int16 codes + sparse paged attention",
    make=make_vq_decode, run=run_vq_decode, nbytes=bytes_vq_decode, ref=ref_vq_decode,
    baselines=full_attention_baselines(decode_len),
    defaults=dict(block_size=16, n_codes=4096, topk=0.03, sink=8, local=64),
    smoke=Problem(2, 45, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, n_codes=24, topk=5, sink=2, local=4)),
))


def run_vq_topk_only(x):
    from kvcomp.ops.vq import vq_topk

    return vq_topk(x["lut"], x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                   local=x["local"])[1]


def _make_vq_topk(p: Problem) -> dict:
    x = make_vq_decode(p)
    x["lut"] = torch.randn(p.batch, p.hq, p.get("n_codes"), device=p.device, generator=generator(p, 1))
    return x


def _ref_vq_topk_count(x):
    from kvcomp.ref.vq_paged import paged_vq_topk

    return paged_vq_topk(x["lut"], x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"],
                         sink=x["sink"], local=x["local"])[1].float()


register(Bench(
    name="vq_topk",
    description="A2ATS exact top-K selection alone, output = counts",
    make=_make_vq_topk, run=run_vq_topk_only, ref=_ref_vq_topk_count,
    output=lambda x, count: count.float(),
    nbytes=lambda p: p.batch * p.hkv * 2 * p.context + p.batch * p.hq * p.get("n_codes") * 4,
    defaults=dict(block_size=16, n_codes=4096, topk=0.03, sink=8, local=64),
    smoke=Problem(2, 45, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, n_codes=24, topk=5, sink=2, local=4)),
))


# --------------------------------------------------------------------------------------------------
# CPU cases: the host-mirror chain of the vLLM backend


def _vq_problem(p: Problem, topk: float) -> Problem:
    return dataclasses.replace(p, extra={**p.extra, "n_codes": 256, "topk": topk, "sink": 8, "local": 64})


def make_mirror_chain(p: Problem, n_vq: int) -> dict:
    """Paged host mirror K/V ``[num_blocks, 16, Hkv, D]`` of all KV heads (the first ``n_vq`` are A²ATS
    heads with int16 code pages and a codebook; the others streaming heads), permuted blocks."""
    g = generator(p)
    nb, bt = pages(p, g)
    bs, nc, gq = p.get("block_size"), p.get("n_codes"), p.group
    x = dict(q_vq=randn(p, g, p.batch, n_vq * gq, p.d), q_wrope=randn(p, g, p.batch, n_vq * gq, p.d,
                                                                      dtype=torch.float32),
             codebook=randn(p, g, n_vq, nc, p.d, dtype=torch.float32),
             code_cache=torch.randint(0, nc, (nb, bs, n_vq), device=p.device, dtype=torch.int16, generator=g),
             k=randn(p, g, nb, bs, p.hkv, p.d), v=randn(p, g, nb, bs, p.hkv, p.d), block_table=bt,
             seq_lens=seq_lens(p), topk=topk_tokens(p), sink=p.get("sink"), local=p.get("local"), n_vq=n_vq)
    if n_vq < p.hkv:
        x.update(q_str=randn(p, g, p.batch, (p.hkv - n_vq) * gq, p.d), str_sink=p.get("duo_sink"),
                 str_recent=p.get("duo_recent"))
    return x


def _lut(x):
    from kvcomp.ops import vq_lut

    return vq_lut(x["q_wrope"], x["codebook"])


def _topk(x, lut):
    from kvcomp.ops import vq_topk

    return vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                   local=x["local"])


def _attend(x, idx, count):
    from kvcomp.ops import sparse_attention_host

    n = x["n_vq"]
    return sparse_attention_host(x["q_vq"], x["k"][:, :, :n], x["v"][:, :, :n], idx, count,
                                 block_table=x["block_table"])


def _streaming(x):
    """DuoAttention's streaming heads: their sink + recent rows of the mirror, through the same op."""
    from kvcomp.methods.duo import streaming_selection
    from kvcomp.ops import sparse_attention_host

    n = x["n_vq"]
    sidx, scount = streaming_selection(x["seq_lens"], x["k"].shape[2] - n, x["str_sink"], x["str_recent"])
    return sparse_attention_host(x["q_str"], x["k"][:, :, n:], x["v"][:, :, n:], sidx, scount,
                                 block_table=x["block_table"])


def run_mirror_chain(x):
    """One decode step: LUT -> top-K -> sparse attention over the mirror (and the streaming heads' sink +
    recent rows through the same sparse attention); the outputs of both head groups concatenated."""
    o = _attend(x, *_topk(x, _lut(x)))
    return o if "q_str" not in x else torch.cat([o, _streaming(x)], dim=1)


def chain_stages(x) -> dict:
    """Each stage of :func:`run_mirror_chain` alone on this step's intermediate results (where the time
    goes: LUT scoring, selection, sparse attention, streaming heads)."""
    lut = _lut(x)
    idx, count = _topk(x, lut)
    stages = {"lut": lambda: _lut(x), "topk": lambda: _topk(x, lut), "attn": lambda: _attend(x, idx, count)}
    if "q_str" in x:
        stages["streaming"] = lambda: _streaming(x)
    return stages


def _selected_rows(x) -> int:
    """Rows the A²ATS heads' top-K selected (union over each GQA group), from one run of the selection."""
    return int(_topk(x, _lut(x))[1].sum())


def bytes_mirror_chain(p: Problem, x) -> int:
    n = x["n_vq"]
    total = bytes_vq_decode(p, heads=n, selected=_selected_rows(x))
    if n < p.hkv:
        total += kv_read_bytes(p, min(p.context, x["str_sink"] + x["str_recent"]), p.hkv - n)
    return total


CHAIN_OPS = (("lut", "vq_lut"), ("topk", "vq_topk"), ("attn", "sparse_attention"))


def _mirror_kv_bytes(p: Problem) -> int:
    return kv_read_bytes(p, p.context) + p.batch * p.hkv * p.context * 2


for _name, _frac in (("vq3", 0.03), ("vq10", 0.10)):
    register_cpu(CpuCase(
        name=_name, description=f"A²ATS top-K {_frac:.0%} (C=256, sink 8, local 64): kvcomp.ops vq_lut -> vq_topk "
                                "-> sparse_attention_host over the paged host mirror",
        make=lambda p, t=_frac: make_mirror_chain(_vq_problem(p, t), p.hkv),
        run=run_mirror_chain, ops=CHAIN_OPS, stages=chain_stages,
        nbytes=lambda p, x, t=_frac: bytes_mirror_chain(_vq_problem(p, t), x), kv_bytes=_mirror_kv_bytes))


def _duo_vq(p: Problem) -> Problem:
    return dataclasses.replace(_vq_problem(p, 0.03), extra={**_vq_problem(p, 0.03).extra, "duo_sink": 64,
                                                            "duo_recent": 256})


register_cpu(CpuCase(
    name="duo50+vq3", description="DuoAttention 50% (sink 64 / recent 256) + A²ATS top-K 3% on the retrieval "
                                  "heads, both over the paged host mirror (the vLLM backend's duo+vq decode)",
    make=lambda p: make_mirror_chain(_duo_vq(p), p.hkv // 2), run=run_mirror_chain, ops=CHAIN_OPS,
    stages=chain_stages,
    nbytes=lambda p, x: bytes_mirror_chain(_duo_vq(p), x), kv_bytes=_mirror_kv_bytes))
