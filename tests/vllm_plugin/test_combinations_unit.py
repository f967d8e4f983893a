"""Every method combination laid out as kvcomp's vLLM backend lays it out, without vLLM: the plan's
page / ring / host-page layout (:mod:`kvcomp.methods.layout`) over permuted paged blocks, driven
the way the backend drives it (``write`` without the step's metadata, then ``attend`` with the
ring), against the transformers path's method objects (:func:`~kvcomp.methods.layout.build_hf_layer`)
on the same queries, keys and values: prompts prefilled in one step, then decode steps. With
``--kv-cache-dtype fp8`` (uint8 pages and ring, :class:`~kvcomp.methods.fp8.Fp8Pages`) against the
transformers path on K/V rounded to e4m3 with the layer's scales (the reference that dequantises).
"""

from __future__ import annotations

import pytest
import torch

from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval
from kvcomp.methods import layout
from kvcomp.methods.fp8 import Fp8Pages
from kvcomp.methods.step import Step
from kvcomp.vllm_plugin.plan import plan_from_config

HQ, HKV, D, BS, NB, RB = 4, 2, 64, 8, 24, 5
KEEP, WINDOW, SINK, RECENT = 48, 8, 4, 12
PROMPTS, DECODES = (29, 29), 6  # the HF path's batch: equal prompt lengths


def _config(parts: str, query_driven: bool) -> CompressionConfig:
    g = torch.Generator().manual_seed(3)
    kw = {}
    if "duo" in parts:
        kw["duo"] = DuoAttention(pattern=torch.tensor([[False, True]]), sink=SINK, recent=RECENT)
    if "think" in parts:
        ch = None if query_driven else torch.stack([torch.randperm(D, generator=g)[:KEEP].sort().values
                                                    for _ in range(HKV)])[None]
        kw["think"] = ThinK(prune_ratio=0.25, window=WINDOW, channels=ch)
    if "vq" in parts:
        kw["vq"] = VQRetrieval(codebook=torch.randn(1, HKV, 16, D, generator=g), whiten=torch.eye(D).expand(1, HKV, D, D),
                               topk=0.2, sink=2, local=WINDOW, rel_pos=64)
    return CompressionConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, num_q_heads=HQ, **kw)


class VllmLayer:
    """One layer's storage as vLLM binds it (pages ``[blocks, H, block_size, C]``, a ring per
    request, host pages for A²ATS) and the backend's calls into the method object."""

    def __init__(self, plan, rope, fp8: Fp8Pages | None = None):
        n_str = plan.num_streaming
        elem, dtype = (1, torch.uint8) if fp8 is not None else (4, torch.float32)
        changes = layout.page_changes(plan, HKV, D, D, elem, n_str)
        heads = changes.get("num_head_slots", HKV)
        content = changes.get("state_content_bytes", 2 * D * elem) // elem
        self.plan, self.fp8 = plan, fp8
        self.kv_cache = torch.zeros(NB, heads, BS, content, dtype=dtype)
        req = layout.ring_request(plan, HKV, D, n_str, BS, elem)
        self.ring = None if req is None else torch.zeros(RB, req[0], req[1], req[2], dtype=dtype)
        kd = layout.mirror_key_dim(plan, D)
        n_host = layout.mirror_heads(plan, HKV)
        self.mirror = torch.zeros(NB, BS, n_host, kd + D) if n_host else None
        self.kd = kd
        self.method = layout.build_layer(plan, 0, HQ, HKV, 0, D ** -0.5, "cpu", rope)

    def store(self, ring_block, with_ring: bool):
        st = layout.page_store(self.plan, self.kv_cache, D)
        if with_ring and self.ring is not None:
            st.ring, st.ring_block = self.ring, ring_block
        if self.mirror is not None:
            st.mirror = (self.mirror[..., : self.kd], self.mirror[..., self.kd:])
        return st

    def step(self, q, k, v, md, ring_block):
        out = torch.full_like(q, float("nan"))
        if self.fp8 is not None:
            self.fp8.write(self.method, self.store(ring_block, False), md.slot_mapping, k, v)
            self.fp8.attend(self.method, self.store(ring_block, True), q, k, v, md, out)
            return out
        self.method.write(self.store(ring_block, False), md.slot_mapping, k, v)
        self.method.attend(self.store(ring_block, True), q, k, v, md, out)
        return out


def _vllm_step(tables, seen: list[int], new: list[int]) -> Step:
    qsl = [0]
    for n in new:
        qsl.append(qsl[-1] + n)
    slots = [int(tables[b, p // BS]) * BS + p % BS for b in range(len(new)) for p in range(seen[b], seen[b] + new[b])]
    lens = [s + n for s, n in zip(seen, new)]
    return Step(len(new), qsl[-1], max(new), max(lens), torch.tensor(qsl, dtype=torch.int32),
                torch.tensor(lens, dtype=torch.int32), tables, torch.tensor(slots), qsl)


def _compare(parts: str, query_driven: bool, fp8: bool = False) -> VllmLayer:
    """Prompts prefilled in one step, then decode steps, through the vLLM layout and the HF path
    (with ``fp8``: uint8 pages and ring, scales 0.5 / 0.25, the HF path on K/V rounded to e4m3)."""
    cfg = _config(parts, query_driven)
    plan = plan_from_config(cfg)
    assert plan.method == parts and plan.per_request_channels == query_driven
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    rope = (inv_freq, 1.0)
    pages = None
    if fp8:
        pages = Fp8Pages(0.5, 0.25, torch.float32, key_width=D, ids=layout.ring_id_cells(plan, HKV, plan.num_streaming))
    vl = VllmLayer(plan, rope, pages)
    hf = layout.build_hf_layer(cfg, 0, HQ, D ** -0.5, rope, "cpu")
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(NB, generator=g)
    tables = torch.stack([perm[:NB // 2], perm[NB // 2:]]).to(torch.int32)[:, :-1]  # non-contiguous, permuted
    ring_block = torch.tensor([3, 1])
    seen = [0, 0]
    batch = len(PROMPTS)
    for step in range(1 + DECODES):
        new = list(PROMPTS) if step == 0 else [1] * batch
        n = sum(new)
        q, k, v = (torch.randn(n, h, D, generator=g) for h in (HQ, HKV, HKV))
        k = k * 3  # keys beyond the values' range: the two scales matter
        got = vl.step(q, k, v, _vllm_step(tables, seen, new), ring_block)
        if fp8:
            k, v = pages.round(k, 0.5), pages.round(v, 0.25)
        want = hf.step(q, k, v, Step.uniform(batch, seen[0], new[0], seen[0] + new[0], "cpu"), head_dim=D, pin=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{parts} step {step}")
        seen = [s + x for s, x in zip(seen, new)]
    return vl


@pytest.mark.parametrize("parts", ["duo+think", "think+vq", "duo+think+vq", "think", "duo+vq"])
@pytest.mark.parametrize("query_driven", [False, True])
def test_vllm_layout_equals_hf_path(parts, query_driven, monkeypatch):
    if "think" not in parts and query_driven:
        pytest.skip("no ThinK")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU route (native kernels / references) in both paths
    _compare(parts, query_driven)


@pytest.mark.parametrize("parts,query_driven", [("duo", False), ("think", False), ("think", True),
                                                ("duo+think", False), ("duo+think", True), ("think+vq", False),
                                                ("think+vq", True), ("duo+think+vq", False),
                                                ("duo+think+vq", True)])
def test_fp8_pages_and_ring_equal_hf_path_over_rounded_kv(parts, query_driven, monkeypatch):
    """fp8 e4m3 pages and ring (keys x/0.5, values x/0.25; query-driven channel ids as bytes; A²ATS:
    int16 codes in 2-byte cells, ThinK's ring in e4m3, the host pages holding the e4m3 values in
    the model dtype): attention equals the transformers path over the same K/V rounded to e4m3."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    vl = _compare(parts, query_driven, fp8=True)
    assert vl.kv_cache.dtype == vl.ring.dtype == torch.uint8 and vl.kv_cache.any() and vl.ring.any()


def test_query_driven_channels_kept_in_the_ring(monkeypatch):
    """The ids chosen at the first chunk sit in ring slot ``window`` and equal the HF path's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = _config("duo+think", True)
    plan = plan_from_config(cfg)
    vl = VllmLayer(plan, None)
    hf = layout.build_hf_layer(cfg, 0, HQ, D ** -0.5, None, "cpu")
    g = torch.Generator().manual_seed(9)
    tables = torch.arange(NB, dtype=torch.int32).view(2, -1)
    q, k, v = (torch.randn(20, h, D, generator=g) for h in (HQ, HKV, HKV))
    vl.step(q, k, v, _vllm_step(tables, [0, 0], [10, 10]), torch.tensor([4, 0]))
    hf.step(q, k, v, Step.uniform(2, 0, 10, 10, "cpu"), head_dim=D, pin=False)
    want = next(st.chan for st, (_, _, m) in zip(hf.stores, hf.parts) if m.name == "think")  # [2, 1, KEEP]
    # the streaming head's ring: its sink + recent slots, then the retrieval head's window + its channel slot
    assert vl.ring.shape[1] == 1 and vl.ring.shape[2] >= SINK + RECENT + WINDOW + 1
    got = vl.ring[[4, 0], 0, SINK + RECENT + WINDOW, :KEEP].long()
    assert torch.equal(got, want[:, 0]) and not torch.equal(got[0], got[1])


def test_layouts_of_the_combinations():
    """Page, ring and host-page shapes vLLM is asked for."""
    p = plan_from_config(_config("duo+think", False))
    assert layout.page_changes(p, HKV, D, D, 4, 1) == {"num_head_slots": 1, "state_content_bytes": (KEEP + D) * 4}
    heads, cap, content = layout.ring_request(p, HKV, D, 1, BS, 4)
    # the streaming head's sink + recent K/V, then the retrieval head's window (its key in the first D)
    assert (heads, content) == (1, 2 * D) and cap >= SINK + RECENT + WINDOW
    assert (heads * cap * content) % (1 * BS * (KEEP + D)) == 0  # a whole number of pages
    p = plan_from_config(_config("think+vq", True))
    assert layout.page_changes(p, HKV, D, D, 4, 0) == {"state_content_bytes": 4}
    assert layout.ring_request(p, HKV, D, 0, BS, 4) == (HKV, WINDOW + 1, D)
    assert layout.ring_request(p, HKV, D, 0, 128, 4) == (HKV, WINDOW + 2, D)  # 5 code pages of 128 tokens, no padding
    # fp8: 1-byte ring elements beside 2-byte code cells: 3 code pages of 128 tokens, no padding
    assert layout.page_changes(p, HKV, D, D, 1, 0) == {"state_content_bytes": 2}
    assert layout.ring_request(p, HKV, D, 0, 128, 1) == (HKV, WINDOW + 4, D)
    assert (HKV * (WINDOW + 4) * D) % (HKV * 128 * 2) == 0
    assert layout.mirror_heads(p, HKV) == HKV and layout.mirror_key_dim(p, D) == KEEP
    p = plan_from_config(_config("duo+think+vq", False))
    assert layout.page_changes(p, HKV, D, D, 4, 1) == {"num_head_slots": 1, "state_content_bytes": 4}
    assert layout.ring_request(p, HKV, D, 1, BS, 4) == (1, WINDOW, D)  # ThinK's window of the retrieval head
    p = plan_from_config(_config("think", False))
    heads, cap, content = layout.ring_request(p, HKV, D, 0, 128, 4)
    assert (heads, content) == (HKV, D) and cap >= WINDOW and heads * cap * content % (HKV * 128 * (KEEP + D)) == 0
    assert layout.mirror_key_dim(p, D) == D  # the streaming head beside it needs full keys
