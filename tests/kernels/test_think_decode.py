"""ThinK pruned-key paged decode (Triton) vs kvcomp.ref.think_paged and vs dense pruned_key_attention."""

import pytest
import torch

from kvcomp.ref import pack_pruned_keys, pruned_key_attention
from kvcomp.ref.think_paged import paged_pruned_key_attention
from kvcomp.testing import assert_close

RATIO = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(b, hkv, g, d, dk, w, bs, lens, dtype, *, shared_chan=False, seed=0):
    """Random ThinK cache with a permuted block table; NaN in every slot decode must not read:
    kp_cache slots of recent tokens (p >= T_p), ring slots past the sequence, unused blocks."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + 2
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    kp = torch.empty(nb, bs, hkv, dk)
    vc = torch.empty(nb, bs, hkv, d)
    kr = torch.empty(b, hkv, w, d)
    for t_ in (kp, vc, kr):
        t_.fill_(float("nan"))
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
    chan = chan.view(nchan, hkv, dk)
    q = torch.randn(b, hkv * g, d, generator=gen)
    t = lambda x: x.to(device=dev(), dtype=dtype)  # noqa: E731
    return t(q), t(kp), chan.to(dev()), t(kr), t(vc), bt.to(dev()), torch.tensor(lens, dtype=torch.int32, device=dev())


# (id, B, Hkv, G, D, Dk, W, block_size, seq_lens, shared chan, tokens_per_split)
CASES = [
    ("b1-g1-dk38of64-split16", 1, 2, 1, 64, 38, 8, 16, [41], False, 16),
    ("b3-g3-odd-lens", 3, 2, 3, 32, 20, 4, 16, [1, 5, 33], False, 16),
    ("b3-g4-shared-chan", 3, 1, 4, 32, 9, 6, 8, [7, 16, 17], True, 32),
    ("b2-g3-no-window", 2, 1, 3, 32, 16, 0, 16, [1, 30], False, 16),
    ("b2-g1-window-gt-len", 2, 2, 1, 16, 16, 40, 8, [12, 39], False, 16),
    # ThinK's stored widths (kept count rounded up to 16): unmasked two-tile loads (48 = 32 + 16, 80 = 64 + 16,
    # 160 = 128 + 32), whole-vector mask (112 = 64 + 48 of 64), one tile (64), a ragged tail (77 = 64 + 13)
    ("b2-g4-d64-dk48", 2, 2, 4, 64, 48, 8, 16, [5, 70], False, 32),
    ("b2-g2-d128-dk80", 2, 2, 2, 128, 80, 8, 16, [40, 9], False, 16),
    ("b1-g2-d128-dk112", 1, 2, 2, 128, 112, 4, 8, [37], True, 16),
    ("b1-g1-d128-dk64", 1, 1, 1, 128, 64, 4, 8, [30], False, 16),
    ("b1-g2-d128-dk77", 1, 2, 2, 128, 77, 4, 8, [30], False, 16),
    ("b1-g2-d256-dk160", 1, 1, 2, 256, 160, 4, 16, [33], False, 16),
]


def test_dk_tiles():
    """Two power-of-two tiles cover the kept width; masked only where they pass it."""
    from kvcomp.kernels.think_decode import dk_tiles

    assert [dk_tiles(dk) for dk in (48, 80, 160, 64, 112, 77, 9, 16, 256)] == [
        (32, 16), (64, 16), (128, 32), (64, 0), (64, 64), (64, 16), (16, 0), (16, 0), (256, 0)]


def test_think_decode_autotune_key_and_configs():
    """Tuned per (G, D, Dk, Dv, dtype), never per batch or length; configs within sm_90's register budget."""
    from kvcomp.kernels import _common as C
    from kvcomp.kernels import think_decode as TD

    tuner = TD._think_decode_kernel
    assert tuner.keys == ["G", "D", "DK", "DV"]
    assert C.interpreting() and len(tuner.configs) == 1 and tuner.configs[0].kwargs == {"BLOCK_N": 16}

    def fits(dtype, d):
        kept = TD._fits(TD._CONFIGS, {"q_ptr": torch.empty(1, 1, d, dtype=dtype)}, BLOCK_D=d, BLOCK_DV=d)
        return [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept]

    assert fits(torch.bfloat16, 128) == [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
    assert fits(torch.float32, 256) == [(16, 8)]
    assert max(c.kwargs["BLOCK_N"] for c in TD._CONFIGS) == TD._MAX_BLOCK_N


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_think_decode_fp32(case, nan_empty):
    from kvcomp.kernels.think_decode import triton_think_decode

    _, b, hkv, g, d, dk, w, bs, lens, shared, per = case
    args = build(b, hkv, g, d, dk, w, bs, lens, torch.float32, shared_chan=shared)
    ref = paged_pruned_key_attention(*args)
    out = triton_think_decode(*args, tokens_per_split=per)
    assert_close("think_decode", ref, out, RATIO[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_think_decode_half(dtype, nan_empty):
    from kvcomp.kernels.think_decode import triton_think_decode

    args = build(3, 2, 2, 32, 19, 5, 16, [2, 18, 35], dtype, seed=1)
    ref = paged_pruned_key_attention(*args, scale=0.2)
    out = triton_think_decode(*args, scale=0.2)
    assert out.dtype == dtype
    assert_close("think_decode", ref.float(), out.float(), RATIO[dtype])


def test_think_ops_write_then_decode_matches_dense(nan_empty):
    """A prefill chunk + one decode token stored as ThinK stores them (kept channels in the pages, the
    last W keys full width in the ring), then the decode op, against dense pruned_key_attention on
    the full key history (the paged layout is a faithful encoding)."""
    from kvcomp.ops.think import think_decode

    gen = torch.Generator().manual_seed(3)
    b, hkv, g, d, dk, w, bs = 2, 2, 2, 32, 13, 4, 8
    lens0 = [9, 21]
    max_blocks = 4
    nb = b * max_blocks
    bt = torch.randperm(nb, generator=gen).view(b, max_blocks).to(torch.int32)
    chan = torch.stack([torch.randperm(d, generator=gen)[:dk].sort().values for _ in range(hkv)]).view(1, hkv, dk)
    kfull = [torch.randn(hkv, n + 1, d, generator=gen) for n in lens0]
    vfull = [torch.randn(hkv, n + 1, d, generator=gen) for n in lens0]
    kp = torch.empty(nb, bs, hkv, dk)
    kr = torch.empty(b, hkv, w, d)
    vc = torch.empty(nb, bs, hkv, d)
    lens1 = torch.tensor([n + 1 for n in lens0], dtype=torch.int32)
    for i, n in enumerate(lens1.tolist()):
        for p in range(n):
            vc[bt[i, p // bs], p % bs] = vfull[i][:, p]
            kp[bt[i, p // bs], p % bs] = kfull[i][:, p].gather(1, chan[0])
        for p in range(max(n - w, 0), n):
            kr[i, :, p % w] = kfull[i][:, p]
    q = torch.randn(b, hkv * g, d, generator=gen)
    out = think_decode(q, kp, chan, kr, vc, bt, lens1, max_seq_len=int(lens1.max()))
    for i, n in enumerate(lens1.tolist()):
        tp = max(n - w, 0)
        kfb, vfb = kfull[i].unsqueeze(0), vfull[i].unsqueeze(0)
        ref = pruned_key_attention(q[i:i + 1, :, None], pack_pruned_keys(kfb[:, :, :tp], chan), chan,
                                   kfb[:, :, tp:], vfb)
        assert_close(f"think_ops[{i}]", ref[:, :, 0], out[i:i + 1], 1e-5)


def test_think_decode_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kvcomp.ops import think  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q = torch.empty(3, 8, 64, dtype=torch.float16)
        kp = torch.empty(10, 16, 2, 40, dtype=torch.float16)
        out = torch.ops.kvcomp.think_decode(q, kp, torch.empty(1, 2, 40, dtype=torch.int64),
                                            torch.empty(3, 2, 32, 64, dtype=torch.float16),
                                            torch.empty(10, 16, 2, 128, dtype=torch.float16),
                                            torch.empty(3, 5, dtype=torch.int32), torch.empty(3, dtype=torch.int32),
                                            0.125, 0, 0)
        assert tuple(out.shape) == (3, 8, 128) and out.dtype == torch.float16


@pytest.mark.parametrize("bad", ["chan_batch", "dtype", "head_dim", "gqa", "recent_shape", "dk_gt_d"])
def test_think_decode_rejects_bad_inputs(bad):
    from kvcomp.kernels.think_decode import triton_think_decode

    q, kp, chan, kr, vc, bt, sl = build(2, 2, 2, 32, 8, 4, 8, [3, 9], torch.float32)
    if bad == "chan_batch":
        chan = torch.cat([chan, chan[:1]])
    elif bad == "dtype":
        kp = kp.half()
    elif bad == "head_dim":
        q, kr, vc = q[..., :24], kr[..., :24], vc[..., :24]
    elif bad == "gqa":
        q = q[:, :3]
    elif bad == "recent_shape":
        kr = kr[:1]
    elif bad == "dk_gt_d":
        kp = torch.zeros(*kp.shape[:3], 40, device=kp.device)
        chan = torch.zeros(chan.shape[0], chan.shape[1], 40, dtype=chan.dtype, device=chan.device)
    with pytest.raises(ValueError):
        triton_think_decode(q, kp, chan, kr, vc, bt, sl)


@pytest.mark.gpu
def test_think_decode_gpu_long_bf16():
    from kvcomp.kernels.think_decode import triton_think_decode

    args = build(2, 8, 4, 128, 80, 32, 16, [3000, 5017], torch.bfloat16, seed=5)
    ref = paged_pruned_key_attention(*args)
    out = triton_think_decode(*args)
    assert_close("think_decode_gpu", ref.float(), out.float(), RATIO[torch.bfloat16])


def test_think_ops_cpu_fallback_is_the_reference(monkeypatch):
    """On CPU without the interpreter, KVCOMP_OPS=reference runs the references (else the native kernels)."""
    from kvcomp.ops.think import think_decode

    args = [a.cpu() for a in build(2, 1, 2, 32, 8, 4, 8, [3, 11], torch.float32)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    assert torch.equal(think_decode(*args), paged_pruned_key_attention(*args))