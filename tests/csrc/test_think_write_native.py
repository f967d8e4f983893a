"""Native CPU ThinK cache write (torch.ops.kvcomp_C.pack_pruned_keys) vs kvcomp.ref.compressed_write."""

from __future__ import annotations

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ref.compressed_write import pack_pruned_keys_paged
from kvcomp.testing import assert_equal

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")


def build(b, hkv, d, dk, w, bs, lens, new, dtype, *, shared_chan=False, k_dtype=None, seed=0):
    """Caches filled with random values, a permuted block table, ``new[i]`` new rows for sequence ``i``."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + 3
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    kp = torch.randn(nb, bs, hkv, dk, generator=gen).to(dtype)
    kr = torch.randn(b, hkv, w, d, generator=gen).to(dtype)
    nchan = 1 if shared_chan else b
    chan = torch.stack([torch.randperm(d, generator=gen)[:dk] for _ in range(nchan * hkv)]).view(nchan, hkv, dk)
    k_new = torch.randn(sum(new), hkv, d, generator=gen).to(k_dtype or dtype)
    qsl = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    return k_new, chan, kp, kr, bt, torch.tensor(lens, dtype=torch.int32), qsl


# (id, B, Hkv, D, Dk, W, block_size, seq_lens, new rows per sequence)
CASES = [
    ("decode-b3", 3, 2, 128, 77, 32, 16, [1, 33, 333], [1, 1, 1]),
    ("prefill-mixed-b4", 4, 2, 64, 38, 32, 16, [31, 32, 33, 100], [31, 5, 33, 0]),
    ("no-ring-b2", 2, 3, 64, 38, 0, 8, [20, 9], [20, 3]),
    ("ring-gt-new-b8", 8, 1, 64, 1, 7, 16, [1, 2, 3, 8, 9, 64, 65, 333], [1, 2, 3, 8, 2, 64, 1, 40]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pack_pruned_keys_native_matches_reference(case, dtype):
    _, b, hkv, d, dk, w, bs, lens, new = case
    k_new, chan, kp, kr, bt, sl, qsl = build(b, hkv, d, dk, w, bs, lens, new, dtype, shared_chan=b % 2 == 0)
    kp_ref, kr_ref = kp.clone(), kr.clone()
    pack_pruned_keys_paged(k_new, chan, kp_ref, kr_ref, bt, sl, qsl)
    torch.ops.kvcomp_C.pack_pruned_keys(k_new, chan, kp, kr, bt.t().contiguous().t(), sl.long(), qsl)
    assert_equal("kp_cache", kp_ref, kp)
    assert_equal("k_recent", kr_ref, kr)


def test_pack_pruned_keys_native_strided_and_converting():
    """fp32 keys into bf16 caches; strided k_new rows and pages that are views of a wider buffer."""
    k_new, chan, kp, kr, bt, sl, qsl = build(2, 2, 64, 38, 8, 16, [40, 7], [9, 7], torch.bfloat16,
                                             k_dtype=torch.float32)
    wide = torch.zeros(*kp.shape[:3], 50, dtype=torch.bfloat16)
    kp_view = wide[..., 3:41]
    kp_view.copy_(kp)
    k_strided = torch.cat([k_new, k_new], dim=1)[:, ::2]
    kp_ref, kr_ref = kp.clone(), kr.clone()
    pack_pruned_keys_paged(k_strided, chan, kp_ref, kr_ref, bt, sl, qsl)
    torch.ops.kvcomp_C.pack_pruned_keys(k_strided, chan, kp_view, kr, bt, sl, qsl)
    assert_equal("kp_cache", kp_ref, kp_view)
    assert_equal("k_recent", kr_ref, kr)
    assert (wide[..., :3] == 0).all() and (wide[..., 41:] == 0).all()


def test_pack_pruned_keys_ops_dispatches_native(monkeypatch):
    from kvcomp.ops.think import pack_pruned_keys_paged as op

    monkeypatch.setenv("KVCOMP_OPS", "native")
    k_new, chan, kp, kr, bt, sl, qsl = build(3, 2, 64, 38, 32, 16, [3, 40, 200], [3, 1, 1], torch.float32)
    kp_ref, kr_ref = kp.clone(), kr.clone()
    pack_pruned_keys_paged(k_new, chan, kp_ref, kr_ref, bt, sl, qsl)
    out_kp, out_kr = op(k_new, chan, kp, kr, bt, sl, qsl)
    assert out_kp is kp and out_kr is kr
    assert_equal("kp_cache", kp_ref, kp)
    assert_equal("k_recent", kr_ref, kr)


def _bad_inputs():
    k_new, chan, kp, kr, bt, sl, qsl = build(2, 2, 64, 38, 8, 16, [20, 40], [4, 1], torch.float32)
    good = dict(k=k_new, chan=chan, kp=kp, kr=kr, bt=bt, sl=sl, qsl=qsl)
    bad_bt, bad_chan = bt.clone(), chan.clone()
    bad_bt[1, 2] = kp.shape[0]
    bad_chan[0, 1, 3] = 64
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return good, {
        "k-2d": dict(k=k_new[0]),
        "k-int": dict(k=k_new.long()),
        "k-wrong-heads": dict(k=k_new[:, :1]),
        "dk-gt-d": dict(k=k_new[..., :32], kr=kr[..., :32]),
        "ring-dtype": dict(kr=kr.to(torch.bfloat16)),
        "ring-wrong-d": dict(kr=kr[..., :32]),
        "ring-wrong-batch": dict(kr=kr[:1]),
        "kp-last-dim-strided": dict(kp=torch.zeros(*kp.shape[:3], 2 * kp.shape[3])[..., ::2]),
        "chan-float": dict(chan=chan.float()),
        "chan-wrong-batch": dict(chan=torch.cat([chan, chan[:1]])),
        "chan-out-of-range": dict(chan=bad_chan),
        "table-float": dict(bt=bt.float()),
        "block-out-of-range": dict(bt=bad_bt),
        "lens-too-long": dict(sl=i32(20, 16 * bt.shape[1] + 1)),
        "lens-below-new": dict(sl=i32(3, 40)),
        "qsl-wrong-size": dict(qsl=qsl[:2]),
        "qsl-not-from-0": dict(qsl=i32(1, 4, 5)),
        "qsl-not-to-n": dict(qsl=i32(0, 4, 4)),
        "qsl-decreasing": dict(qsl=i32(0, 6, 5)),
    }


_GOOD, _BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(_BAD))
def test_pack_pruned_keys_native_rejects_bad_inputs(name):
    a = {**_GOOD, **_BAD[name]}
    kp, kr = a["kp"].clone(), a["kr"].clone()  # snapshots (the caches themselves may be strided views)
    with pytest.raises(ValueError):
        torch.ops.kvcomp_C.pack_pruned_keys(a["k"], a["chan"], a["kp"], a["kr"], a["bt"], a["sl"], a["qsl"])
    assert_equal("kp untouched", kp, a["kp"])
    assert_equal("kr untouched", kr, a["kr"])
