"""Static ThinK channels (``kvcomp.calibrate.think``) on a tiny random Llama."""

import pytest
import torch

from kvcomp.calibrate.think import calibrate_think_channels
from kvcomp.config import ThinK


def _samples(n=3, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (1, t), generator=g) for _ in range(n)]


def test_shape_order_and_dead_channels_pruned(model):
    d = model.config.head_dim
    # layer 1, KV head 0: no key energy in pre-RoPE channels 3 and 3 + D/2 (a RoPE pair), so
    # post-RoPE channels 3 and 3 + D/2 carry none either: ThinK's score is 0 there
    with torch.no_grad():
        w = model.model.layers[1].self_attn.k_proj.weight
        w[[3, 3 + d // 2]] = 0.0
    ch = calibrate_think_channels(model, _samples(), 0.25, window=16, multiple=4)
    keep = ThinK(prune_ratio=0.25, channel_multiple=4).kept_dim(d)  # D - D/4, a multiple of 4 already
    assert ch.shape == (2, 2, keep) and ch.dtype == torch.int64
    assert torch.equal(ch, ch.sort(dim=-1).values)
    assert 3 not in ch[1, 0].tolist() and 3 + d // 2 not in ch[1, 0].tolist()
    assert torch.equal(ch, calibrate_think_channels(model, _samples(), 0.25, window=16, multiple=4))  # deterministic


def test_bad_samples_refused(model):
    with pytest.raises(ValueError, match="at least one"):
        calibrate_think_channels(model, [], 0.25)
    with pytest.raises(ValueError, match="not longer than window=32"):
        calibrate_think_channels(model, _samples(t=20), 0.25)
