import pytest
import torch

import kvcomp.ref as R
from kvcomp.testing import assert_close


def _inv_freq(d, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)


def _brute_rope(x, pos, inv_freq, scaling=1.0):
    """Rotate pair (i, i + D/2) of x[..., t, :] by angle pos[t] * inv_freq[i] with complex numbers.

    The angle is rounded to fp32 as HF computes it (so cos/sin match the model's own tables)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    ang = (pos.float()[:, None] * inv_freq.float()[None, :]).double()
    z = z * torch.polar(torch.full_like(ang, scaling), ang)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("d", [8, 64, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("scaling", [1.0, 1.25], ids=["s1", "s1.25"])
def test_apply_rope_matches_complex_rotation(d, scaling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 33, d, generator=g)
    pos = torch.randint(0, 5000, (33,), generator=g)
    cos, sin = R.rope_cos_sin(pos, _inv_freq(d), scaling)
    assert cos.shape == (33, d) and cos.dtype == torch.float32
    assert_close("rope", _brute_rope(x, pos, _inv_freq(d), scaling), R.apply_rope(x, cos, sin), 1e-5)


def test_apply_rope_matches_hf_llama():
    mod = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6]])
    cos, sin = R.rope_cos_sin(pos, _inv_freq(16))  # [B, T, D]
    hq, hk = mod.apply_rotary_pos_emb(q, k, cos, sin)  # unsqueezes dim 1
    assert_close("hf q", hq, R.apply_rope(q, cos[:, None], sin[:, None]), 1e-6)
    assert_close("hf k", hk, R.apply_rope(k, cos[:, None], sin[:, None]), 1e-6)


@pytest.mark.parametrize("scaling", [1.0, 0.7], ids=["s1", "s0.7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_unapply_inverts_apply(scaling, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 129, 64, generator=g).to(dtype)
    cos, sin = R.rope_cos_sin(torch.arange(100000, 100129), _inv_freq(64, 500000.0), scaling)
    y = R.apply_rope(x, cos, sin)
    assert y.dtype == dtype
    back = R.unapply_rope(y, cos, sin)
    assert back.dtype == dtype
    assert_close("roundtrip", x, back, 1e-5 if dtype != torch.bfloat16 else 2e-2)


@pytest.mark.parametrize("rel", [0, 1, 64, 2048], ids=lambda r: f"rel{r}")
@pytest.mark.parametrize("scaling", [1.0, 1.3], ids=["s1", "s1.3"])
def test_windowed_rope_query_equals_post_rope_logit_at_distance(rel, scaling):
    d = 64
    inv = _inv_freq(d, 100000.0)
    g = torch.Generator().manual_seed(3)
    q_pre = torch.randn(5, d, generator=g, dtype=torch.float64).float()
    k_pre = torch.randn(5, d, generator=g, dtype=torch.float64).float()
    qt = R.windowed_rope_query(q_pre, inv, rel_pos=rel, attention_scaling=scaling)
    approx = (qt.double() * k_pre.double()).sum(-1)
    for p in (rel, rel + 17, rel + 3000):
        cq, sq = R.rope_cos_sin(torch.full((5,), p), inv, scaling)
        ck, sk = R.rope_cos_sin(torch.full((5,), p - rel), inv, scaling)
        exact = (R.apply_rope(q_pre, cq, sq).double() * R.apply_rope(k_pre, ck, sk).double()).sum(-1)
        assert_close(f"wrope p={p}", exact, approx, 2e-4)


def test_rope_validation():
    inv = _inv_freq(8)
    cos, sin = R.rope_cos_sin(torch.arange(4), inv)
    with pytest.raises(ValueError, match="cos"):
        R.apply_rope(torch.randn(2, 5, 8), cos, sin)
    with pytest.raises(ValueError, match="x"):
        R.apply_rope(torch.randn(4, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="q_pre"):
        R.windowed_rope_query(torch.randn(3, 6), inv)
    with pytest.raises(ValueError, match="attention_scaling"):
        R.rope_cos_sin(torch.arange(3), inv, 0.0)
    with pytest.raises(ValueError, match="inv_freq"):
        R.rope_cos_sin(torch.arange(3), torch.arange(4))
