import argparse

import pytest
import torch
from calib_helpers import tiny_llama

from kvcomp.calibrate.data import make_text_samples
from kvcomp.calibrate.vq import (VQ_FORMAT, add_vq_args, calibrate_codebooks, capture_qk, load_codebooks,
                                 quantization_error, save_codebooks)
from kvcomp.ref import apply_rope, rope_cos_sin
from kvcomp.testing import assert_close, assert_equal


def test_capture_qk_matches_projections(model, tok):
    samples = make_text_samples(tok, 400, sample_len=200, uuid_fraction=0.0, seed=0)
    keys, queries = capture_qk(model, samples, progress=False)
    assert keys.shape == (2, 400, 2, 16) and queries.shape == (2, 400, 4, 16)
    assert keys.dtype == torch.float32 and queries.dtype == torch.float32
    # layer 0 keys/queries are the projections of the embedded, normed tokens
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(samples[1][0]))
        k0 = model.model.layers[0].self_attn.k_proj(x).view(-1, 2, 16)
        q0 = model.model.layers[0].self_attn.q_proj(x).view(-1, 4, 16)
    assert_close("k layer0", k0, keys[0, 200:], 1e-6)
    assert_close("q layer0", q0, queries[0, 200:], 1e-6)
    # pre-RoPE: rotating the captured keys reproduces the model's post-RoPE keys of layer 1
    post = {}
    import transformers.models.llama.modeling_llama as ml

    orig = ml.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *a, **kw):
        out = orig(q, k, cos, sin, *a, **kw)
        post.setdefault(len(post), out[1])
        return out

    ml.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            model(input_ids=samples[0], use_cache=False)
    finally:
        ml.apply_rotary_pos_emb = orig
    cos, sin = rope_cos_sin(torch.arange(200), model.model.rotary_emb.inv_freq)
    k1 = apply_rope(keys[1, :200].transpose(0, 1), cos, sin)  # [Hkv, T, D]
    assert_close("post-rope k layer1", post[1][0], k1, 1e-5)


def test_calibrate_save_load_roundtrip(model, tok, tmp_path):
    samples = make_text_samples(tok, 600, sample_len=300, uuid_fraction=0.25, seed=0)
    held = make_text_samples(tok, 200, sample_len=200, uuid_fraction=0.0, seed=5)
    res = calibrate_codebooks(model, samples, n_codes=32, iters=5, rel_pos=64, seed=0, eval_samples=held, progress=False)
    cb, wh = res["codebook"], res["whiten"]
    assert cb.shape == (2, 2, 32, 16) and cb.dtype == torch.float32
    assert wh.shape == (2, 2, 16, 16) and wh.dtype == torch.float32
    assert torch.equal(wh, torch.tril(wh)) and bool((torch.diagonal(wh, dim1=-2, dim2=-1) > 0).all())
    st = res["stats"]
    assert 0.0 < st["calib"]["mean_rel_err"] < 1.0 and 0.0 < st["heldout"]["mean_rel_err"]
    assert st["calib"]["tokens"] == 600 and st["heldout"]["tokens"] == 200
    # deterministic
    res2 = calibrate_codebooks(model, samples, n_codes=32, iters=5, rel_pos=64, seed=0, progress=False)
    assert_equal("codebook determinism", cb, res2["codebook"])
    p = tmp_path / "cb.safetensors"
    save_codebooks(p, cb, wh, rel_pos=64, model="tiny", tokens=res["tokens"], extra={"iters": 5})
    got = load_codebooks(p)
    assert_equal("codebook", cb, got["codebook"])
    assert_equal("whiten", wh, got["whiten"])
    assert (got["n_codes"], got["rel_pos"], got["model"], got["tokens"], got["extra"]) == (32, 64, "tiny", 600, {"iters": 5})


def test_quantization_error_exact_when_codebook_holds_keys():
    torch.manual_seed(0)
    k = torch.randn(20, 2, 8)
    cb = k.permute(1, 0, 2).contiguous()  # every key is a code
    wh = torch.eye(8).expand(2, 8, 8).contiguous()
    e = quantization_error(k, cb, wh)
    assert e["mean_rel_err"] == pytest.approx(0.0, abs=1e-10) and e["codes_used"] == [20, 20]
    e1 = quantization_error(k, torch.zeros(2, 1, 8), wh)  # single zero code: the whole key is error
    assert e1["mean_rel_err"] == pytest.approx(1.0, rel=1e-6)


def test_save_load_errors(tmp_path):
    cb, wh = torch.randn(2, 2, 8, 4), torch.eye(4).expand(2, 2, 4, 4).contiguous()
    with pytest.raises(ValueError, match="whiten"):
        save_codebooks(tmp_path / "a.safetensors", cb, torch.eye(3).expand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="codebook"):
        save_codebooks(tmp_path / "a.safetensors", cb[0], wh)
    with pytest.raises(ValueError, match="NaN"):
        save_codebooks(tmp_path / "a.safetensors", cb * float("nan"), wh)
    with pytest.raises(FileNotFoundError):
        load_codebooks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_codebooks(bad)
    from safetensors.torch import save_file

    p = tmp_path / "wrong.safetensors"
    save_file({"codebook": cb}, p, metadata={"format": VQ_FORMAT, "n_codes": "8", "rel_pos": "1"})
    with pytest.raises(ValueError, match="missing tensors"):
        load_codebooks(p)
    save_file({"codebook": cb.half(), "whiten": wh}, p, metadata={"format": VQ_FORMAT, "n_codes": "8", "rel_pos": "1"})
    with pytest.raises(ValueError, match="dtype"):
        load_codebooks(p)
    save_file({"codebook": cb, "whiten": wh}, p, metadata={"format": VQ_FORMAT, "n_codes": "9", "rel_pos": "1"})
    with pytest.raises(ValueError, match="n_codes"):
        load_codebooks(p)
    save_file({"codebook": cb, "whiten": wh}, p, metadata={"format": "other"})
    with pytest.raises(ValueError, match="format"):
        load_codebooks(p)
    save_file({"codebook": cb, "whiten": wh}, p, metadata={"rel_pos": "7"})  # as VQRetrieval.save writes it
    got = load_codebooks(p)
    assert got["n_codes"] == 8 and got["rel_pos"] == 7


def test_calibrate_bad_inputs(model, tok):
    s = make_text_samples(tok, 50, sample_len=50, seed=0)
    with pytest.raises(ValueError, match="fewer than n_codes"):
        calibrate_codebooks(model, s, n_codes=64, progress=False)
    with pytest.raises(ValueError, match="n_codes"):
        calibrate_codebooks(model, s, n_codes=40000, progress=False)
    with pytest.raises(ValueError, match="samples"):
        capture_qk(model, [torch.zeros(3)], progress=False)
    with pytest.raises(ValueError, match="samples"):
        capture_qk(model, [], progress=False)


def test_cli_args_defaults():
    a = add_vq_args(argparse.ArgumentParser()).parse_args([])
    assert a.rel_pos == 2048 and a.model == "smollm2-135m" and a.tokens >= a.n_codes


def test_shipped_smollm2_codebooks():
    import os

    import kvcomp

    p = os.path.join(os.path.dirname(kvcomp.__file__), "patterns_data", "smollm2-135m", "vq_codebooks.safetensors")
    assert os.path.exists(p), "the SmolLM2 codebooks must ship: kvcomp.methods uses them by default"
    d = load_codebooks(p)
    c = d["n_codes"]
    assert d["codebook"].shape == (30, 3, c, 64) and d["whiten"].shape == (30, 3, 64, 64)
    assert d["rel_pos"] == 2048 and d["model"] == "smollm2-135m" and d["tokens"] >= c
    assert d["extra"]["stats"]["heldout"]["mean_rel_err_centered"] < 0.5
