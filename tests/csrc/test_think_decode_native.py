"""Native CPU ThinK decode (torch.ops.kvcomp_C.think_decode) vs kvcomp.ref.think_paged.

The caches hold NaN in every slot the decode must not read (page slots of ring tokens, ring slots
past the sequence, blocks no table points to), so a read out of place shows as NaN in the output.
"""

from __future__ import annotations

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ref.think_paged import paged_pruned_key_attention
from kvcomp.testing import assert_close, assert_equal

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")

RATIO = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def native(*args, scale: float):
    return torch.ops.kvcomp_C.think_decode(*args, scale, 0, 0)


def build(b, hkv, g, d, dk, w, bs, lens, dtype, *, shared_chan=False, seed=0, fused_pages=False):
    """Random ThinK cache over randomly permuted blocks (table [B, max_blocks] int32), NaN elsewhere.

    ``fused_pages``: kp_cache and v_cache are views into one [NB, BS, Hkv, Dk + Dv] buffer (strided pages).
    """
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + 3
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    nan = dict(fill_value=float("nan"), dtype=dtype)
    if fused_pages:
        pages = torch.full((nb, bs, hkv, dk + d), **nan)
        kp, vc = pages[..., :dk], pages[..., dk:]
    else:
        kp, vc = torch.full((nb, bs, hkv, dk), **nan), torch.full((nb, bs, hkv, d), **nan)
    kr = torch.full((b, hkv, w, d), **nan)
    for i, length in enumerate(lens):
        tp = max(length - w, 0)
        for p in range(length):
            blk, slot = bt[i, p // bs], p % bs
            vc[blk, slot] = torch.randn(hkv, d, generator=gen)
            if p < tp:
                kp[blk, slot] = torch.randn(hkv, dk, generator=gen)
            else:
                kr[i, :, p % w] = torch.randn(hkv, d, generator=gen)
    nchan = 1 if shared_chan else b
    chan = torch.stack([torch.randperm(d, generator=gen)[:dk].sort().values for _ in range(nchan * hkv)])
    q = torch.randn(b, hkv * g, d, generator=gen)
    return q.to(dtype), kp, chan.view(nchan, hkv, dk), kr, vc, bt, torch.tensor(lens, dtype=torch.int32)


W = 32
# (id, B, Hkv, G, D, Dk, W, block_size, seq_lens, shared chan)
CASES = [
    ("b1-g1-len1", 1, 2, 1, 64, 38, W, 16, [1], False),
    ("b2-g2-w-1-w", 2, 2, 2, 128, 77, W, 16, [W - 1, W], True),
    ("b3-g4-w+1-333", 3, 2, 4, 128, 77, W, 16, [W + 1, 333, 5], False),
    ("b8-g8-mixed", 8, 1, 8, 64, 38, W, 8, [1, W - 1, W, W + 1, 333, 64, 65, 2], True),
    ("b4-g1-no-ring", 4, 3, 1, 64, 38, 0, 16, [1, 17, 333, 48], False),
    ("b2-g4-ring-gt-len", 2, 2, 4, 128, 77, 40, 32, [12, 39], False),
    ("b1-g4-long", 1, 8, 4, 128, 77, W, 16, [2 * 1024 + 333], True),
    ("b5-g2-dk1-dkfull", 5, 1, 2, 64, 1, 7, 16, [300, 1, 8, 9, 64], False),
    ("b2-g2-unpruned", 2, 2, 2, 64, 64, 7, 16, [100, 6], True),
    # ThinK's stored widths (kept count rounded up to 16: no tail in the AVX2 dot), odd tiles and odd G
    ("b3-g3-dk48-of-64", 3, 2, 3, 64, 48, W, 16, [W + 1, 333, 70], False),
    ("b2-g4-dk80-of-128", 2, 2, 4, 128, 80, W, 16, [333, 5], True),
    ("b1-g5-dk160-of-256", 1, 2, 5, 256, 160, W, 16, [301], False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_think_decode_native_matches_reference(case, dtype, cpu_isa):
    _, b, hkv, g, d, dk, w, bs, lens, shared = case
    args = build(b, hkv, g, d, dk, w, bs, lens, dtype, shared_chan=shared)
    ref = paged_pruned_key_attention(*args, scale=0.3)
    out = native(*args, scale=0.3)
    assert out.dtype == dtype and out.shape == ref.shape
    # fp32 max-abs: 1e-5; the generic loops (scalar sums over the head dim) reached 1.03e-5 on one case
    # against torch's AVX2 reference (AVX2 CPU emulated by qemu), so 2e-5 there.
    atol = (2e-5 if cpu_isa == "generic" else 1e-5) if dtype == torch.float32 else None
    assert_close(f"think_native[{case[0]}]", ref.float(), out.float(), RATIO[dtype], atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_think_decode_native_strided_layouts(dtype, cpu_isa):
    """Transposed-contiguous block table, int64 chan / lens, pages as views of one fused buffer."""
    q, kp, chan, kr, vc, bt, lens = build(3, 2, 4, 64, 38, W, 16, [333, W + 1, 70], dtype, fused_pages=True)
    assert not kp.is_contiguous() and not vc.is_contiguous()
    ref = paged_pruned_key_attention(q, kp, chan, kr, vc, bt, lens, scale=0.125)
    bt_t = bt.t().contiguous().t()
    assert not bt_t.is_contiguous()
    out = native(q, kp, chan.long(), kr, vc, bt_t, lens.long(), scale=0.125)
    assert_close("think_native_strided", ref.float(), out.float(), RATIO[dtype])


def test_think_decode_native_fp32_query_over_bf16_cache(cpu_isa):
    q, kp, chan, kr, vc, bt, lens = build(2, 2, 2, 64, 38, W, 16, [90, 3], torch.bfloat16)
    ref = paged_pruned_key_attention(q.float(), kp, chan, kr, vc, bt, lens, scale=0.125)
    out = native(q.float(), kp, chan, kr, vc, bt, lens, scale=0.125)
    assert out.dtype == torch.float32
    assert_close("think_native_mixed", ref, out, RATIO[torch.bfloat16])


def test_think_decode_ops_dispatches_native(monkeypatch):
    """kvcomp.ops.think_decode with KVCOMP_OPS=native runs the native op (bit-equal to the direct call)."""
    from kvcomp.ops.think import think_decode

    monkeypatch.setenv("KVCOMP_OPS", "native")
    args = build(3, 2, 4, 128, 77, W, 16, [1, W + 1, 333], torch.float32, seed=3)
    out = think_decode(*args, scale=0.2, max_seq_len=333)
    assert_equal("think_ops_native", native(*args, scale=0.2), out)
    assert_close("think_ops_native_vs_ref", paged_pruned_key_attention(*args, scale=0.2), out, 1e-5)
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    assert_close("think_ops_reference", think_decode(*args, scale=0.2), out, 1e-5)


def _bad_inputs():
    q, kp, chan, kr, vc, bt, lens = build(2, 2, 2, 64, 38, 8, 16, [20, 40], torch.float32)
    good = dict(q=q, kp=kp, chan=chan, kr=kr, vc=vc, bt=bt, lens=lens)
    bad_bt, bad_chan = bt.clone(), chan.clone()
    bad_bt[1, 2] = kp.shape[0]
    bad_chan[0, 1, 3] = 64
    neg_bt, neg_chan = bt.clone(), chan.clone()
    neg_bt[0, 0] = -1
    neg_chan[1, 0, 0] = -2
    return good, {
        "q-2d": dict(q=q[0]),
        "q-int": dict(q=q.long()),
        "q-float64": dict(q=q.double()),
        "heads-not-multiple": dict(q=q[:, :3]),
        "cache-dtypes-differ": dict(vc=vc.to(torch.bfloat16)),
        "kp-3d": dict(kp=kp[0]),
        "kp-last-dim-strided": dict(kp=torch.zeros(*kp.shape[:3], 2 * kp.shape[3])[..., ::2]),
        "v-blocks-differ": dict(vc=vc[:-1]),
        "ring-wrong-d": dict(kr=kr[..., :32]),
        "ring-wrong-batch": dict(kr=kr[:1]),
        "chan-float": dict(chan=chan.float()),
        "chan-wrong-dk": dict(chan=chan[..., :5]),
        "chan-wrong-batch": dict(chan=torch.cat([chan, chan[:1]])),
        "chan-out-of-range": dict(chan=bad_chan),
        "chan-negative": dict(chan=neg_chan),
        "dk-gt-d": dict(q=q[..., :32], kr=kr[..., :32]),
        "table-float": dict(bt=bt.float()),
        "table-rows": dict(bt=bt[:1]),
        "block-out-of-range": dict(bt=bad_bt),
        "block-negative": dict(bt=neg_bt),
        "lens-zero": dict(lens=torch.tensor([0, 40], dtype=torch.int32)),
        "lens-too-long": dict(lens=torch.tensor([20, 16 * bt.shape[1] + 1], dtype=torch.int32)),
        "lens-wrong-size": dict(lens=lens[:1]),
        "lens-float": dict(lens=lens.float()),
    }


_GOOD, _BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(_BAD))
def test_think_decode_native_rejects_bad_inputs(name):
    a = {**_GOOD, **_BAD[name]}
    with pytest.raises(ValueError):
        native(a["q"], a["kp"], a["chan"], a["kr"], a["vc"], a["bt"], a["lens"], scale=0.1)


def test_think_decode_native_rejects_non_finite_scale():
    g = _GOOD
    with pytest.raises(ValueError):
        native(g["q"], g["kp"], g["chan"], g["kr"], g["vc"], g["bt"], g["lens"], scale=float("nan"))
