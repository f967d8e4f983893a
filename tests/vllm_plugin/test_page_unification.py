"""vLLM's page-size unification over kvcomp's pages and rings, every method combination (no engine).

vLLM puts every KV-cache group's page at the largest page (``unify_kv_cache_spec_page_size``): a
smaller page that divides it gets a larger block size, one that does not is padded. kvcomp's
per-request ring (one block per request) is often the largest page, so the ring's bytes decide
the retrieval pages' block size and a request's minimum footprint. SmolLM2-135M's shape (3 KV
heads of 64, DuoAttention one streaming head, sink 64 + recent 256; ThinK 48 kept channels,
window 32; vLLM's CPU block size 128), fp32 and fp8 (1-byte) pages.

Runs only in an interpreter that imports vLLM (its spec classes and unification).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

_spec = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(_spec is None or _spec.origin is None, reason="vllm is not importable in this interpreter")

HKV, D, KEEP, BS, MAX_LEN = 3, 64, 48, 128, 1024
# unified block size (tokens) of the retrieval / code pages, fp32 and fp8
BLOCKS = {"off": (128, 128), "duo": (256, 256), "think": (128, 128), "vq": (128, 128), "duo+vq": (128, 128),
          "duo+think": (256, 256), "think+vq": (2048, 1024), "duo+think+vq": (2048, 1024)}
# query-driven ThinK beside A2ATS codes: one more ring slot (the channel ids) and a ring of whole code
# pages, 17 x 128 (fp32: 34 slots) or 9 x 128 (fp8: 36 slots); the code pages cost 12 / 6 B a token
BLOCKS_QUERY = {"think+vq": (2176, 1152), "duo+think+vq": (2176, 1152)}


def _plan(name: str, query_driven: bool):
    from kvcomp.vllm_plugin.plan import Plan

    kw = {}
    if "duo" in name:
        kw.update(streaming=torch.tensor([[True, False, False]]), sink=64, recent=256)
    if "think" in name:
        kw.update(think_window=32)
        if query_driven:
            kw.update(think_keep=KEEP, think_prune_ratio=0.4)
        else:
            kw.update(think_channels=torch.arange(KEEP).expand(1, HKV, KEEP))
    if "vq" in name:
        kw.update(vq=object())  # the page layout only asks whether A2ATS is on
    return Plan(num_layers=1, num_kv_heads=HKV, head_dim=D, **kw)


def _unified(plan, dtype: torch.dtype):
    """``(retrieval-page spec, ring spec or None)`` after vLLM's unification."""
    from vllm.v1.core.kv_cache_utils import unify_kv_cache_spec_page_size
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvcomp.methods import layout
    from kvcomp.vllm_plugin.ring import KVCompRingLayer

    elem = dtype.itemsize
    page = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=dtype)
    page = dataclasses.replace(page, **layout.page_changes(plan, HKV, D, D, elem, plan.num_streaming))
    specs = {"attn": page}
    req = layout.ring_request(plan, HKV, D, plan.num_streaming, BS, elem)
    if req is not None:
        specs["ring"] = KVCompRingLayer("ring", req[0], D, req[1], dtype, req[2]).get_kv_cache_spec(None)
    out = unify_kv_cache_spec_page_size(specs)
    return out["attn"], out.get("ring")


# query-driven channels only where there is a ThinK part
CASES = [(n, q) for n in BLOCKS for q in (False, True) if not q or "think" in n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["fp32", "fp8"])
@pytest.mark.parametrize("name,query_driven", CASES, ids=[f"{n}-{'query' if q else 'static'}" for n, q in CASES])
def test_unified_block_and_request_footprint(name, query_driven, dtype):
    plan = _plan(name, query_driven)
    assert plan.method == name
    attn, ring = _unified(plan, dtype)
    want = (BLOCKS_QUERY if query_driven and name in BLOCKS_QUERY else BLOCKS)[name][dtype == torch.uint8]
    # never padded: the smaller page divides the larger one, vLLM only enlarges its block size
    assert attn.page_size_padded is None and (ring is None or ring.page_size_padded is None)
    assert attn.block_size == want, (name, attn.block_size, None if ring is None else ring.block_size)
    if ring is not None:
        assert ring.page_size_bytes == attn.page_size_bytes
    # one request of MAX_LEN tokens: its pages plus one ring block, against MAX_LEN tokens of exact pages
    need = (-(-MAX_LEN // attn.block_size) + (ring is not None)) * attn.page_size_bytes
    exact = MAX_LEN * HKV * 2 * D * dtype.itemsize
    print(f"{name} {'fp8' if dtype == torch.uint8 else 'fp32'}: block {attn.block_size}, page {attn.page_size_bytes:,} B, "
          f"one {MAX_LEN}-token request {need:,} B ({need / exact:.2f} x exact pages)")
    if name in ("duo+think", "duo"):
        assert need < 0.85 * exact  # the savings survive the block granularity
    if name == "duo+think":
        _, duo_ring = _unified(_plan("duo", False), dtype)
        assert need < (-(-MAX_LEN // 256) + 1) * duo_ring.page_size_bytes  # below DuoAttention alone
