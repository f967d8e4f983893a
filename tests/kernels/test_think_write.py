"""ThinK cache write (Triton) vs kvcomp.ref.compressed_write.pack_pruned_keys_paged."""

import pytest
import torch

from kvcomp.ref.compressed_write import pack_pruned_keys_paged


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def same(name, ref, out):
    """Exact equality, NaN (never-written slots) included."""
    r, o = ref.float().nan_to_num(1234.5), out.float().cpu().nan_to_num(1234.5)
    assert torch.equal(r, o), f"{name}: {int((r != o).sum())} entries differ"


# (id, seq_lens, new tokens per sequence, Hkv, D, Dk, W, block_size, shared chan)
CASES = [
    ("prefill-longer-than-window", [23, 9], [23, 9], 2, 32, 13, 4, 8, False),
    ("decode-and-chunk-mixed", [5, 40, 17], [1, 0, 6], 3, 64, 38, 8, 16, True),
    ("no-window", [7, 3], [2, 3], 1, 32, 32, 0, 8, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pack_pruned_keys_paged(case, dtype, nan_empty):
    from kvcomp.kernels.think_write import triton_pack_pruned_keys_paged

    _, lens, new, hkv, d, dk, w, bs, shared = case
    gen = torch.Generator().manual_seed(len(lens))
    b = len(lens)
    max_blocks = max(-(-x // bs) for x in lens)
    nb = b * max_blocks + 1
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    nchan = 1 if shared else b
    chan = torch.stack([torch.randperm(d, generator=gen)[:dk].sort().values for _ in range(nchan * hkv)])
    chan = chan.view(nchan, hkv, dk).to(torch.int32)
    k_new = torch.randn(sum(new), hkv, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    kp = torch.empty(nb, bs, hkv, dk, dtype=dtype)
    kr = torch.empty(b, hkv, w, d, dtype=dtype)
    kp.fill_(float("nan"))
    kr.fill_(float("nan"))
    rp, rr = pack_pruned_keys_paged(k_new, chan, kp.clone(), kr.clone(), bt, sl, qsl)
    d_ = dev()
    op, orr = triton_pack_pruned_keys_paged(k_new.to(d_), chan.to(d_), kp.to(d_), kr.to(d_), bt.to(d_), sl.to(d_),
                                            qsl.to(d_))
    same("kp_cache", rp, op)
    same("k_recent", rr, orr)
    assert int((~rp.isnan()).sum()) == sum(new) * hkv * dk


@pytest.mark.parametrize("bad", ["chan_shape", "qsl_len", "recent_batch", "dk_gt_d"])
def test_pack_pruned_keys_rejects_bad_inputs(bad):
    from kvcomp.kernels.think_write import triton_pack_pruned_keys_paged

    d_ = dev()
    k_new = torch.randn(3, 2, 32, device=d_)
    chan = torch.zeros(1, 2, 8, dtype=torch.int64, device=d_)
    kp = torch.zeros(4, 8, 2, 8, device=d_)
    kr = torch.zeros(2, 2, 4, 32, device=d_)
    bt = torch.zeros(2, 2, dtype=torch.int32, device=d_)
    sl = torch.tensor([2, 1], dtype=torch.int32, device=d_)
    qsl = torch.tensor([0, 2, 3], dtype=torch.int32, device=d_)
    if bad == "chan_shape":
        chan = chan[:, :1]
    elif bad == "qsl_len":
        qsl = qsl[:2]
    elif bad == "recent_batch":
        kr = kr[:1]
    elif bad == "dk_gt_d":
        kp = torch.zeros(4, 8, 2, 40, device=d_)
        chan = torch.zeros(1, 2, 40, dtype=torch.int64, device=d_)
    with pytest.raises(ValueError):
        triton_pack_pruned_keys_paged(k_new, chan, kp, kr, bt, sl, qsl)


def test_pack_pruned_keys_op_schema_and_fake():
    """torch.library.opcheck: the declared mutations (kp_cache, k_recent) and the fake implementation."""
    from kvcomp.ops import think  # noqa: F401  (registers the ops)

    d_ = dev()
    chan = torch.tensor([[[1, 4, 6, 30]]], device=d_)
    args = (torch.randn(3, 1, 32, device=d_), chan, torch.zeros(4, 8, 1, 4, device=d_),
            torch.zeros(2, 1, 4, 32, device=d_), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=d_),
            torch.tensor([2, 9], dtype=torch.int32, device=d_), torch.tensor([0, 2, 3], dtype=torch.int32, device=d_))
    res = torch.library.opcheck(torch.ops.kvcomp.pack_pruned_keys.default, args,
                                test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}
