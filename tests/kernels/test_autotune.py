"""The autotuned Triton kernels: every config of every set gives the reference's result (each run alone
under the interpreter), the keys name only model geometry (never batch size or token counts, checked by
tuning through several batch sizes: one benchmark round), the configs are pruned to the sm_90 budget,
and the interpreter keeps one config. tests/kernels/test_sm90_compile.py compiles every kept config."""

import pytest
import torch

from kvcomp.ref import paged_sparse_attention, streaming_attention, vq_encode, vq_lut
from kvcomp.ref import cache_write as RCW
from kvcomp.ref.duo import duo_decode_attention as ref_duo
from kvcomp.ref.duo import duo_head_map
from kvcomp.ref.vq_paged import paged_vq_topk
from kvcomp.testing import assert_close, assert_equal

# the names an autotune key may use: head dims, GQA group, codebook size, compile-time modes
GEOMETRY = {"D", "DV", "G", "NC", "PAGED", "FINAL", "HAS_QPOS", "HAS_KPOS"}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def paged(lens, hkv, d, bs, seed, dtype=torch.float32):
    """Random pages ``[nb, bs, hkv, d]`` x2 under a permuted block table for ``lens``."""
    gen = _gen(seed)
    b, mb = len(lens), max(-(-n // bs) for n in lens) + 1
    bt = torch.randperm(b * mb + 1, generator=gen)[: b * mb].view(b, mb).to(torch.int32)
    kc = torch.randn(b * mb + 1, bs, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(b * mb + 1, bs, hkv, d, generator=gen).to(dtype)
    return kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def run_cache_write(b):
    from kvcomp.kernels.cache_write import write_paged_kv

    gen = _gen(b)
    kc = torch.randn(6, 4, 2, 16, generator=gen)
    key, val = torch.randn(2, b + 3, 2, 16, generator=gen)
    slots = torch.randperm(24, generator=gen)[: b + 3]
    slots[0] = -1
    out, ref = (kc.clone(), kc.clone()), (kc.clone(), kc.clone())
    write_paged_kv(key, val, *out, slots)
    RCW.write_paged_kv(key, val, *ref, slots)
    assert_equal("k_cache", ref[0], out[0])
    assert_equal("v_cache", ref[1], out[1])


def run_duo(b):
    from kvcomp.kernels.duo_decode import duo_decode_attention

    lens = [5 + 13 * i for i in range(b)]
    kc, vc, bt, sl = paged(lens, 2, 32, 8, seed=b)
    gen = _gen(b + 1)
    ks, vs = torch.randn(2, b, 1, 2 + 6, 32, generator=gen)
    args = (torch.randn(b, 6, 32, generator=gen), kc, vc, bt, sl, ks, vs,
            duo_head_map(torch.tensor([False, True, False])))
    out = duo_decode_attention(*args, sink=2, window=6, num_splits=3)
    assert_close("duo_decode", ref_duo(*args, sink=2, window=6), out, 1e-5)


def run_streaming(b):
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    gen = _gen(b)
    tq, tk = 9 + 5 * b, 20 + 5 * b
    q = torch.randn(b, 4, tq, 32, generator=gen)
    k, v = torch.randn(2, b, 2, tk, 32, generator=gen)
    out = streaming_prefill(q, k, v, sink=3, window=11)
    assert_close("streaming_prefill", streaming_attention(q, k, v, sink=3, window=11), out, 1e-5)
    kp = torch.randperm(tk, generator=gen)  # explicit positions: the HAS_KPOS variant
    qp = torch.arange(tk - tq, tk)
    out = streaming_prefill(q, k, v, sink=3, window=11, q_pos=qp, k_pos=kp)
    ref = streaming_attention(q, k, v, sink=3, window=11, q_pos=qp, k_pos=kp)
    assert_close("streaming_prefill k_pos", ref, out, 1e-5)


def run_sparse(b):
    """The sparse decode, and the split-K combine through it (several parts)."""
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    lens = [40 + 7 * i for i in range(b)]
    kc, vc, bt, sl = paged(lens, 2, 32, 8, seed=b)
    gen = _gen(b + 1)
    n = min(lens)
    idx = torch.stack([torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(2 * b)])
    idx = torch.nn.functional.pad(idx, (0, 8)).view(b, 2, -1).to(torch.int32).contiguous()  # 8 padding entries
    count = torch.full((b, 2), n // 2, dtype=torch.int32)
    q = torch.randn(b, 4, 32, generator=gen)
    out = triton_paged_sparse_attention(q, kc, vc, bt, idx, count, tokens_per_split=16)
    assert_close("sparse_decode", paged_sparse_attention(q, kc, vc, bt, idx, count), out, 1e-5)


def run_lut(b):
    from kvcomp.kernels.vq_lut import triton_vq_lut

    gen = _gen(b)
    q = torch.randn(b, 6, 32, generator=gen)
    cb = torch.randn(2, 75, 32, generator=gen)
    assert_close("vq_lut", vq_lut(q, cb, scale=0.3), triton_vq_lut(q, cb, scale=0.3), 1e-5)


def run_encode(b):
    """A decode-sized step: 130 codes in several codebook splits (the merge / re-rank kernel too)."""
    from kvcomp.kernels.vq_encode import triton_vq_encode

    gen = _gen(b)
    k = torch.randn(b, 2, 3, 16, generator=gen)
    cb = torch.randn(2, 130, 16, generator=gen)
    lw = torch.linalg.qr(torch.randn(2, 16, 16, generator=gen)).Q
    assert_equal("vq_encode", vq_encode(k, cb, lw), triton_vq_encode(k, cb, lw))


def run_topk(b):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    gen = _gen(b)
    lens = [30 + 11 * i for i in range(b)]
    bs, nc = 8, 40
    _, _, bt, sl = paged(lens, 1, 1, bs, seed=b)
    cc = torch.randint(0, nc, (bt.numel() + 1, bs, 2), generator=gen, dtype=torch.int16)
    lut = torch.randn(b, 4, nc, generator=gen).mul(100).round()  # many exponents (radix digits), ties
    ri, rc = paged_vq_topk(lut, cc, bt, sl, topk=5, sink=1, local=2)
    idx, count = triton_vq_topk(lut, cc, bt, sl, topk=5, sink=1, local=2, chunk=16)
    assert_equal("count", rc, count)
    assert_equal("idx", ri, idx[..., : ri.shape[2]])


# (module, tuned kernels, configs list names, key, the launcher run at a batch size)
TUNED = [
    ("cache_write", ["_paged_write_kernel"], ["_CONFIGS"], [["D"]], run_cache_write),
    ("duo_decode", ["_duo_split_kernel", "_duo_reduce_kernel"], ["_CONFIGS", "_REDUCE_CONFIGS"],
     [["D", "G"], ["D"]], run_duo),
    ("streaming_prefill", ["_streaming_prefill_kernel"], ["_CONFIGS"], [["D", "G", "HAS_QPOS", "HAS_KPOS"]],
     run_streaming),
    ("vq_sparse_decode", ["_sparse_decode_kernel"], ["_CONFIGS"], [["G", "D", "DV"]], run_sparse),
    ("splitk", ["_combine_kernel"], ["_COMBINE_CONFIGS"], [["DV"]], run_sparse),
    ("vq_lut", ["_vq_lut_kernel"], ["_CONFIGS"], [["D", "NC"]], run_lut),
    ("vq_encode", ["_vq_encode_kernel"], ["_CONFIGS"], [["D", "NC", "PAGED", "FINAL"]], run_encode),
    ("vq_topk", ["_radix_kernel", "_select_kernel"], ["_RADIX_CONFIGS", "_SELECT_CONFIGS"],
     [["G", "NC"], ["G", "NC"]], run_topk),
]


def _module(name):
    import importlib

    return importlib.import_module(f"kvcomp.kernels.{name}")


def _cases():
    for mod, kernels, lists, _, run in TUNED:
        for kern, lst in zip(kernels, lists):
            for i, _ in enumerate(getattr(_module(mod), lst)):
                yield pytest.param(mod, kern, lst, i, run, id=f"{kern}-{i}")


@pytest.mark.parametrize("mod, kern, lst, i, run", list(_cases()))
def test_every_config_matches_the_reference(monkeypatch, mod, kern, lst, i, run):
    """Config ``i`` alone (the interpreter runs whatever single config a tuner holds) at batch 2."""
    m = _module(mod)
    monkeypatch.setattr(getattr(m, kern), "configs", [getattr(m, lst)[i]])
    run(2)


@pytest.mark.parametrize("mod, kernels, lists, keys, run", TUNED, ids=[t[0] for t in TUNED])
def test_keys_name_only_geometry(mod, kernels, lists, keys, run):
    from kvcomp.kernels import _common as C

    m = _module(mod)
    for kern, lst, key in zip(kernels, lists, keys):
        tuner = getattr(m, kern)
        assert tuner.keys == key and set(key) <= GEOMETRY, (kern, tuner.keys)
        # under the interpreter only the first config exists: no benchmark, no repeated launches
        assert C.interpreting() and tuner.configs == getattr(m, lst)[:1]


@pytest.mark.parametrize("mod, kernels, lists, keys, run", TUNED, ids=[t[0] for t in TUNED])
def test_tuned_once_across_batch_sizes(monkeypatch, mod, kernels, lists, keys, run):
    """Two configs per tuner, the benchmark runs each once (restoring what it accumulates into) and
    prefers the second: batch 1, 3 and 5 share one tuning per kernel, and the results stay exact."""
    m = _module(mod)
    benched = {}
    for kern, lst in zip(kernels, lists):
        tuner, configs = getattr(m, kern), getattr(m, lst)

        def bench(fn, quantiles, kern=kern):
            fn()
            benched[kern] = benched.get(kern, 0) + 1
            return [1.0 / benched[kern]] * len(quantiles)

        monkeypatch.setattr(tuner, "configs", [configs[0], configs[-1]])
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # a cached_property: no getattr first
    for b in (1, 3, 5):
        run(b)
    for kern, lst in zip(kernels, lists):
        tuner = getattr(m, kern)
        keys = 2 if kern == "_streaming_prefill_kernel" else 1  # default and explicit positions
        assert len(tuner.cache) == keys and benched[kern] == 2 * keys, (kern, tuner.cache, benched)
        assert all(c is getattr(m, lst)[-1] for c in tuner.cache.values())


def _kept(prune, configs, **meta):
    return [(c.kwargs, c.num_warps) for c in prune(configs, {"q_ptr": torch.empty(0, dtype=meta.pop("dtype"))},
                                                    **meta)]


def test_sparse_decode_configs_pruned_to_the_register_budget():
    from kvcomp.kernels import vq_sparse_decode as VS

    def fits(dtype, d):
        return [(k["BLOCK_N"], w) for k, w in _kept(VS._fits, VS._CONFIGS, dtype=dtype, BLOCK_D=d, BLOCK_DV=d,
                                                     F32=dtype == torch.float32)]

    assert fits(torch.bfloat16, 128) == [(16, 4), (16, 8), (32, 4), (32, 8), (64, 8)]
    assert fits(torch.float16, 256) == [(16, 4), (16, 8), (32, 4), (32, 8)]
    assert fits(torch.float32, 128) == [(16, 4), (16, 8), (32, 8)]
    assert fits(torch.float32, 256) == [(16, 8)]  # 16 rows of fp32 at D = 256 spill with 4 warps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_every_pruned_set_fits_sm90(dtype, d):
    """Every head dim and dtype keeps at least one config of each set; none kept exceeds 227 KB of shared
    memory in the pipeline model; the largest tiles are dropped where the budget says so."""
    from kvcomp.kernels import _common as C
    from kvcomp.kernels import duo_decode as DD
    from kvcomp.kernels import streaming_prefill as SP
    from kvcomp.kernels import vq_encode as VE
    from kvcomp.kernels import vq_lut as VL
    from kvcomp.kernels import vq_topk as VT

    f32 = dtype == torch.float32
    q = {"q_ptr": torch.empty(0, dtype=dtype)}
    sets = [(DD._tiles, DD._CONFIGS, dict(D=d, F32=f32)),
            (SP._tiles, SP._CONFIGS, dict(D=d, F32=f32)),
            (VL._tiles, VL._CONFIGS, dict(BLOCK_D=d, BLOCK_R=16, F32=True)),
            (VE._tiles, VE._CONFIGS, dict(BLOCK_D=d)),
            (VT._select_tiles, VT._SELECT_CONFIGS, dict(BLOCK_H=4))]
    for tiles, configs, meta in sets:
        kept = C.prune_sm90(tiles)(configs, q, **meta)
        assert kept and all(c in configs for c in kept)
        for c in kept:
            reg, smem, f = tiles(c, q, meta)
            assert c.num_stages * smem <= C.SHARED_LIMIT and reg <= C.reg_budget(f, c.num_warps)
    duo = C.prune_sm90(DD._tiles)(DD._CONFIGS, q, D=d, F32=f32)
    assert (max(c.kwargs["BLOCK_N"] for c in duo) == 64) == (d * (4 if f32 else 2) * 64 <= 16384)
    if d == 256:  # only 16-token encode tiles, and no 64-row streaming tiles
        assert [c.kwargs["BLOCK_T"] for c in C.prune_sm90(VE._tiles)(VE._CONFIGS, q, BLOCK_D=d)] == [16]
        assert all(c.kwargs["BLOCK_N"] < 64 for c in C.prune_sm90(SP._tiles)(SP._CONFIGS, q, D=d, F32=f32))


def test_prune_falls_back_to_the_smallest_tile():
    """A shape outside the tuned range (GQA 64: 64-row select tiles) still gets one config."""
    from kvcomp.kernels import _common as C
    from kvcomp.kernels import vq_topk as VT

    kept = C.prune_sm90(VT._select_tiles)(VT._SELECT_CONFIGS, {}, BLOCK_H=64)
    assert [c.kwargs["BLOCK_T"] for c in kept] == [128]
