"""fp8 pages (``--kv-cache-dtype fp8``): the quantise/dequantise reference and kvcomp's fp8 page
adapter (:class:`kvcomp.methods.fp8.Fp8Pages`) around exact paged attention, against the reference
that dequantises the pages on read, over permuted blocks, GQA 1-8, batch 1-5, odd lengths and a
step mixing decode, chunked prefill and whole prefill rows."""

from __future__ import annotations

import pytest
import torch

from kvcomp.methods import layout
from kvcomp.methods.dense import Dense
from kvcomp.methods.fp8 import Fp8Pages
from kvcomp.methods.step import Step
from kvcomp.ref.fp8 import FP8, FP8_MAX, dequantize_fp8, paged_attention_fp8, quantize_fp8
from kvcomp.vllm_plugin.plan import Plan

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_quantize_is_e4m3_of_x_over_scale_saturated():
    x = torch.randn(7, 3, 33) * 300
    q = quantize_fp8(x, 0.75)
    assert q.dtype == torch.uint8
    want = (x / 0.75).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(q.view(FP8).float(), want.float())
    d = dequantize_fp8(q, 0.75)
    assert torch.equal(d, want.float() * 0.75)
    assert d.abs().max() <= FP8_MAX * 0.75
    assert torch.equal(quantize_fp8(d, 0.75), q), "a dequantised value must requantise to itself"
    assert dequantize_fp8(q, 0.75, torch.bfloat16).dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match="scale"):
        quantize_fp8(torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="scale"):
        quantize_fp8(torch.ones(2), float("inf"))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_fp8(torch.ones(2), 1.0)


def _step(ctx: list[int], new: list[int], block_size: int, num_blocks: int, g: torch.Generator):
    """A batch: request b has ``ctx[b]`` cached tokens and ``new[b]`` new ones, its blocks a random
    permutation slice of the pool, its block-table row padded with a stray id."""
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-(c + n) // block_size) for c, n in zip(ctx, new)) + 1
    table, slots, qsl = [], [], [0]
    for c, n in zip(ctx, new):
        need = -(-(c + n) // block_size)
        row = [perm.pop() for _ in range(need)]
        table.append(row + [row[0]] * (width - need))
        slots += [row[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    lens = [c + n for c, n in zip(ctx, new)]
    return Step(len(ctx), qsl[-1], max(new), max(lens), torch.tensor(qsl, dtype=torch.int32),
                torch.tensor(lens, dtype=torch.int32), torch.tensor(table, dtype=torch.int32),
                torch.tensor(slots, dtype=torch.long), qsl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,group,ctx,new", [
    (1, 1, [0], [37]),
    (2, 4, [0, 45], [1, 1]),
    (2, 3, [17, 0, 130], [1, 29, 15]),
    (1, 8, [63, 5, 0, 99, 1], [1, 1, 3, 2, 1]),
])
def test_fp8_pages_equal_reference_that_dequantises(dtype, hkv, group, ctx, new):
    g = torch.Generator().manual_seed(hkv * 100 + group + len(ctx))
    d, bs, num_blocks = 64, 16, 48
    kv_cache = torch.zeros(num_blocks, hkv, bs, 2 * d, dtype=torch.uint8)  # vLLM's logical page view
    pages = layout.page_store(Plan(), kv_cache, d)
    fp8 = Fp8Pages(0.5, 0.25, dtype)
    method = Dense(hkv, d ** -0.5, "cpu")
    step = _step(ctx, new, bs, num_blocks, g)
    if any(ctx):  # the cached tokens, written by earlier steps into the same blocks
        slots = torch.tensor([int(step.block_table[b, p // bs]) * bs + p % bs for b, c in enumerate(ctx)
                              for p in range(c)], dtype=torch.long)
        kc = (torch.randn(len(slots), hkv, d, generator=g) * 3).to(dtype)
        fp8.write(method, pages, slots, kc, torch.randn(len(slots), hkv, d, generator=g).to(dtype))
    n = step.num_actual_tokens
    q = torch.randn(n, hkv * group, d, generator=g).to(dtype)
    k = (torch.randn(n, hkv, d, generator=g) * 3).to(dtype)
    v = torch.randn(n, hkv, d, generator=g).to(dtype)
    before = kv_cache.clone()
    fp8.write(method, pages, step.slot_mapping, k, v)
    touched = torch.zeros(num_blocks, dtype=torch.bool)
    touched[step.slot_mapping // bs] = True
    assert torch.equal(kv_cache[~touched], before[~touched]), "blocks without new tokens changed"
    out = torch.zeros(n, hkv * group, d, dtype=dtype)
    fp8.attend(method, pages, q, k, v, step, out)
    want = paged_attention_fp8(q.float(), pages.k, pages.v, step.block_table, step.seq_lens, step.query_start_loc,
                               k_scale=0.5, v_scale=0.25, scale=d ** -0.5)
    tol = TOL[dtype]
    assert torch.allclose(out.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    # the pages hold the new tokens as fp8 at their slots
    got_k = pages.k.reshape(-1, hkv, d)[step.slot_mapping]
    assert torch.equal(got_k, quantize_fp8(k, 0.5))
