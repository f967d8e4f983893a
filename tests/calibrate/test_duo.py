import argparse
import json
import os

import pytest
import torch

from calib_helpers import tiny_llama

from kvcomp.calibrate.data import make_multi_passkey_samples
from kvcomp.calibrate.duo import (DUO_ATTN_NAME, _final_hidden, add_duo_args, duo_lr_factor, duo_mixed_attention,
                                  duo_training_mode, gate_summary, save_duo_pattern, train_gates)
from kvcomp.patterns import read_pattern_tsv
from kvcomp.ref import attention, streaming_attention
from kvcomp.testing import assert_close, assert_equal


class _Mod:
    def __init__(self, layer_idx, state):
        self.layer_idx, self.training, self._kvcomp_duo = layer_idx, False, state


def _call(model_gates, q, k, v, sink, window):
    from kvcomp.calibrate.duo import _DuoState

    mod = _Mod(0, _DuoState(gates=model_gates, sink=sink, window=window))
    out, w = duo_mixed_attention(mod, q, k, v, None, scaling=q.shape[-1] ** -0.5)
    assert w is None
    return out.transpose(1, 2)  # back to [B, Hq, T, D]


@pytest.mark.parametrize("t", [1, 37, 100])
def test_mixed_attention_endpoints(t):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, t, 16), torch.randn(2, 2, t, 16)
    out1 = _call(torch.ones(1, 2), q, k, v, 4, 8)
    assert_close("alpha=1 vs full", attention(q, k, v), out1, 1e-5)
    out0 = _call(torch.zeros(1, 2), q, k, v, 4, 8)
    assert_close("alpha=0 vs streaming", streaming_attention(q, k, v, sink=4, window=8), out0, 1e-5)
    # a per-KV-head gate applies to the whole query group (query head h reads KV head h // 2)
    outm = _call(torch.tensor([[1.0, 0.0]]), q, k, v, 4, 8)
    assert_close("group 0 full", out1[:, :2], outm[:, :2], 1e-6)
    assert_close("group 1 streaming", out0[:, 2:], outm[:, 2:], 1e-6)
    a = torch.tensor([[0.3, 0.8]])
    ref = a.repeat_interleave(2, 1).view(1, 4, 1, 1)
    assert_close("mix", ref * out1 + (1 - ref) * out0, _call(a, q, k, v, 4, 8), 1e-5)


def test_model_alpha_one_is_exactly_full(model):
    ids = torch.randint(1, 257, (1, 90))
    with torch.no_grad():
        ref = _final_hidden(model, ids)
        with duo_training_mode(model, torch.ones(2, 2), sink=4, window=8):
            assert model.config._attn_implementation == DUO_ATTN_NAME
            out = _final_hidden(model, ids)
        assert model.config._attn_implementation == "sdpa"
        assert_equal("alpha=1 hidden", ref, out)
        with duo_training_mode(model, torch.zeros(2, 2), sink=4, window=8):
            out0 = _final_hidden(model, ids)
    assert (out0 - ref).abs().max() > 1e-4  # streaming really differs beyond the window
    assert not hasattr(model.model.layers[0].self_attn, "_kvcomp_duo")


def test_training_mode_validates(model):
    with pytest.raises(ValueError, match="gates"):
        with duo_training_mode(model, torch.ones(3, 2), sink=4, window=8):
            pass
    with pytest.raises(ValueError, match="window"):
        with duo_training_mode(model, torch.ones(2, 2), sink=4, window=0):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_lr_schedule():
    f = [duo_lr_factor(s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[19] == 1.0 and f[50] == 1.0 and f[99] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(f[:20], f[1:21])) and all(a >= b for a, b in zip(f[80:], f[81:]))


def test_train_gates_and_pattern_roundtrip(model, tok, tmp_path):
    samples = make_multi_passkey_samples(tok, 2, min_len=480, max_len=520, num_passkeys=1, passkey_words=3, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    res = train_gates(model, samples, steps=8, lr=0.05, reg=0.05, sink=4, window=16, progress=False)
    assert res.alphas.shape == (2, 2)
    assert float(res.alphas.min()) >= 0.0 and float(res.alphas.max()) <= 1.0
    # step 0 has alpha = 1 (exact full attention): zero distillation loss; the L1 term then pulls gates down
    assert res.distill[0] == pytest.approx(0.0, abs=1e-10)
    assert float(res.alphas.mean()) < 1.0
    assert res.losses[-1] < res.losses[0]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # model untouched
    assert all(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    tsv = save_duo_pattern(tmp_path / "pat", res.alphas, res.config)
    assert_close("tsv roundtrip", res.alphas, read_pattern_tsv(tsv), 1e-7)
    cfg = json.loads((tmp_path / "pat" / "config.json").read_text())
    assert cfg["steps"] == 8 and cfg["sink_size"] == 4 and cfg["recent_size"] == 16
    s = gate_summary(res.alphas)
    assert s["num_heads"] == 4 and sum(s["streaming_heads_per_layer_at_sparsity_0.5"]) == 2


def test_distillation_gradient_keeps_needed_heads(tok):
    """Without the L1 term, gates pushed to 0.5 drift back up where streaming hurts."""
    m = tiny_llama(seed=1)
    samples = make_multi_passkey_samples(tok, 1, min_len=480, max_len=480, num_passkeys=1, passkey_words=3, seed=2)
    res = train_gates(m, samples, steps=6, lr=0.05, reg=0.0, sink=2, window=4, init=0.5, progress=False)
    assert res.distill[-1] < res.distill[0]
    assert float(res.alphas.mean()) > 0.5


def test_train_gates_bad_inputs(model, tok):
    samples = make_multi_passkey_samples(tok, 1, min_len=480, max_len=480, num_passkeys=1, passkey_words=2)
    with pytest.raises(ValueError, match="steps"):
        train_gates(model, samples, steps=0)
    with pytest.raises(ValueError, match="samples"):
        train_gates(model, [], steps=1)
    samples[0].answer_mask[:] = False
    with pytest.raises(ValueError, match="answer"):
        train_gates(model, samples, steps=1)


def test_cli_args_defaults():
    a = add_duo_args(argparse.ArgumentParser()).parse_args([])
    assert (a.sink, a.recent, a.reg, a.model, a.min_len, a.max_len) == (64, 256, 0.05, "smollm2-135m", 1024, 1024)
    assert a.steps * a.lr >= 1.5  # gates must be able to move from 1 to 0


def test_shipped_smollm2_pattern():
    import kvcomp

    d = os.path.join(os.path.dirname(kvcomp.__file__), "patterns_data", "smollm2-135m")
    a = read_pattern_tsv(os.path.join(d, "full_attention_heads.tsv"))
    assert a.shape == (30, 3) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.std()) > 0.1  # trained, not constant
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    assert cfg["model"] == "smollm2-135m" and cfg["steps"] >= 1 and cfg["reg"] == 0.05
