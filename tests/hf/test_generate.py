"""Model-level tests of the HF path: tiny random Llama (fast) and the bundled SmolLM2 (marked model)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval
from kvcomp.hf import compress, dynamic_cache_bytes, restore


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _gen(model, ids, cache=None, n=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def test_identity_config_equals_stock_generate(tiny):
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    want = _gen(tiny, ids)
    cache = compress(tiny, CompressionConfig.for_model(tiny))
    got = _gen(tiny, ids, cache)
    restore(tiny)
    assert torch.equal(want, got)
    assert tiny.config._attn_implementation == "sdpa"
    # the identity cache holds exactly what DynamicCache holds
    from transformers import DynamicCache

    dc = DynamicCache(config=tiny.config)
    _gen(tiny, ids, dc)
    assert cache.kv_bytes() == {"device": dynamic_cache_bytes(dc)["device"], "host": 0}


def test_compressed_logits_follow_the_method(tiny):
    """Full-window streaming and zero pruning are exact: logits equal stock ones."""
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    want = _gen(tiny, ids)
    L, H = 2, 2
    exact = CompressionConfig.for_model(tiny, duo=DuoAttention(pattern=torch.ones(L, H, dtype=torch.bool), sink=0, recent=4096),
                                        think=None)
    got = _gen(tiny, ids, compress(tiny, exact))
    restore(tiny)
    assert torch.equal(want, got)
    vq_all = CompressionConfig.for_model(tiny, vq=VQRetrieval(codebook=torch.randn(L, H, 8, 16),
                                                              whiten=torch.eye(16).expand(L, H, 16, 16).clone(),
                                                              topk=4096, local=8))
    cache = compress(tiny, vq_all)
    got = _gen(tiny, ids, cache)
    restore(tiny)
    assert torch.equal(want, got)
    b = cache.kv_bytes()
    t = cache.get_seq_length()
    assert b["device"] == L * H * t * 2  # int16 codes only


def test_bad_use_is_a_clear_error(tiny):
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = compress(tiny, CompressionConfig.for_model(tiny, think=ThinK()))
    with pytest.raises(ValueError, match="padded"):
        tiny.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    restore(tiny)
    with pytest.raises(ValueError, match="KV heads"):
        compress(tiny, CompressionConfig(2, 3, 16))


METHODS = ["full", "duo", "think", "vq", "all"]


@pytest.fixture(scope="module")
def smollm2():
    from kvcomp.models import load_model

    try:
        return load_model("smollm2")
    except Exception as e:  # the package ships the weights; without it the error says how to install
        pytest.fail(f"bundled SmolLM2 did not load: {e}")


@pytest.mark.model
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_generate_per_method(smollm2, method):
    """One short real generate per method: answer a passkey, bytes shrink as the policy says."""
    from kvcomp.eval.score import string_match_all
    from kvcomp.eval.tasks import make_sample
    from kvcomp.hf.generate import generate, sample_input_ids
    from kvcomp.methods import MethodOptions, build_method

    model, tok = smollm2
    opts = MethodOptions(sink=16, recent=64)
    if method in ("vq", "all"):
        opts.topk = 16  # with the codebooks shipped for SmolLM2
    cfg = build_method(method, model, tok, "smollm2", opts, progress=False)
    s = make_sample("passkey", tok, 400, haystack="noise", seed=3, chat=True)
    r = generate(model, tok, sample_input_ids(tok, s), cfg, max_new_tokens=s.max_new_tokens)
    full_bpt = 30 * 3 * 64 * 2 * 4  # fp32 K+V for 30 layers x 3 KV heads x d=64
    if method == "full":
        assert r.device_bytes_per_token == full_bpt
    else:
        assert r.device_bytes_per_token < full_bpt
    if method in ("vq", "all"):
        assert r.kv_bytes["host"] > 0 and r.selected_fraction is not None and r.selected_fraction < 1
    # the passkey at 400 tokens is easy: the full cache answers it, and so must every method here
    assert string_match_all(r.text, s.answers) == 1.0, (method, r.text, s.answers)


def _fork_configs(model):
    L, H = 2, 2
    pat = torch.tensor([[True, False], [False, True]])
    vq = VQRetrieval(codebook=torch.randn(L, H, 8, 16, generator=torch.Generator().manual_seed(3)),
                     whiten=torch.eye(16).expand(L, H, 16, 16).clone(), topk=0.25, sink=2, local=4)
    return {
        "stock": None,
        "duo": CompressionConfig.for_model(model, duo=DuoAttention(pattern=pat, sink=2, recent=8)),
        "think": CompressionConfig.for_model(model, think=ThinK(prune_ratio=0.5, window=4, channel_multiple=4)),
        "vq": CompressionConfig.for_model(model, vq=vq),
        "all": CompressionConfig.for_model(model, duo=DuoAttention(pattern=pat, sink=2, recent=8),
                                           think=ThinK(prune_ratio=0.5, window=4, channel_multiple=4), vq=vq),
    }


@pytest.mark.parametrize("method", ["stock", "duo", "think", "vq", "all"])
def test_forked_answer_leaves_the_shared_cache_as_it_was(tiny, method):
    """The gold-history multi-query turn: an answer decoded on a copy of the cache is the answer decoded on
    the cache itself, and the cache then continues exactly as if no answer had been decoded."""
    from transformers import DynamicCache

    from kvcomp.hf.generate import _greedy

    cfg = _fork_configs(tiny)[method]
    g = torch.Generator().manual_seed(5)
    ids0, ids1 = torch.randint(1, 128, (1, 45), generator=g), torch.randint(1, 128, (1, 7), generator=g)

    def fresh():
        return DynamicCache(config=tiny.config) if cfg is None else compress(tiny, cfg)

    try:
        forked = fresh()
        ans_fork = _greedy(tiny, forked, ids0, 6, set(), fork=True)
        assert forked.get_seq_length() == 45  # the answer went to the copy only
        with torch.inference_mode():
            after_fork = tiny(input_ids=ids1, past_key_values=forked, use_cache=True).logits
        ans = _greedy(tiny, fresh(), ids0, 6, set())
        plain = fresh()
        with torch.inference_mode():
            tiny(input_ids=ids0, past_key_values=plain, use_cache=True)
            want = tiny(input_ids=ids1, past_key_values=plain, use_cache=True).logits
    finally:
        if cfg is not None:
            restore(tiny)
    assert ans_fork == ans and len(ans) == 6
    assert torch.equal(after_fork, want)
