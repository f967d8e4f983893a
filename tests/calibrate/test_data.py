import pytest
import torch

from kvcomp.calibrate.data import (NATO_WORDS, default_passkey_config, make_multi_passkey_sample,
                                   make_multi_passkey_samples, make_text_samples, ordinal)


def test_passkey_sample_deterministic(tok):
    a = make_multi_passkey_sample(tok, 1500, seed=3, num_passkeys=3, passkey_words=5)
    b = make_multi_passkey_sample(tok, 1500, seed=3, num_passkeys=3, passkey_words=5)
    c = make_multi_passkey_sample(tok, 1500, seed=4, num_passkeys=3, passkey_words=5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.answer_mask, b.answer_mask)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_answer_mask_covers_exactly_answers(tok):
    s = make_multi_passkey_sample(tok, 1200, seed=1, num_passkeys=3, passkey_words=4)
    assert s.input_ids.shape == (1, 1200) and s.answer_mask.shape == (1, 1200)
    assert s.input_ids[0, 0] == tok.bos_token_id
    # the masked tokens decode to exactly the passkeys, in question order
    masked = bytes(int(i) - 1 for i in s.input_ids[0][s.answer_mask[0]]).decode()
    expected = "".join(" " + " ".join(k) for k in s.passkeys)
    assert masked == expected
    assert all(w in NATO_WORDS for k in s.passkeys for w in k)
    # masked tokens form exactly one contiguous run per passkey, each preceded by its question
    m = s.answer_mask[0].int()
    starts = ((m[1:] - m[:-1]) == 1).nonzero().flatten() + 1
    assert len(starts) == 3
    text = bytes(int(i) - 1 for i in s.input_ids[0, 1:]).decode()
    for i in range(3):
        assert f"What is the {ordinal(i + 1)} passkey to the vault? Answer:" in text
        assert f"it's the {ordinal(i + 1)} passkey to the vault: {' '.join(s.passkeys[i])}." in text
    # needles come before the questions and in order
    assert s.needle_positions == sorted(s.needle_positions) and s.needle_positions[-1] < int(starts[0])


def test_defaults_and_lengths(tok):
    assert default_passkey_config(1024) == (4, 8)
    assert default_passkey_config(2048) == (8, 8)
    assert default_passkey_config(32000) == (10, 32)
    ss = make_multi_passkey_samples(tok, 3, min_len=1000, max_len=2000, num_passkeys=2, passkey_words=6, seed=0)
    assert [s.num_tokens for s in ss] == [1000, 1500, 2000]
    assert all(len(s.passkeys) == 2 and len(s.passkeys[0]) == 6 for s in ss)
    assert ss[0].passkeys != ss[1].passkeys


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="context_len"):
        make_multi_passkey_sample(tok, 10)
    with pytest.raises(ValueError, match="too small"):
        make_multi_passkey_sample(tok, 300, num_passkeys=10, passkey_words=32)
    with pytest.raises(ValueError, match="num_passkeys"):
        make_multi_passkey_sample(tok, 1000, num_passkeys=0)
    with pytest.raises(ValueError, match="tokenizer"):
        make_multi_passkey_sample(object(), 1000)
    with pytest.raises(ValueError, match="min_len"):
        make_multi_passkey_samples(tok, 2, min_len=2000, max_len=1000)
    with pytest.raises(ValueError, match="ordinal|k must"):
        ordinal(0)


def test_text_samples(tok):
    s = make_text_samples(tok, 5000, sample_len=2048, uuid_fraction=0.2, seed=0)
    assert sum(x.shape[1] for x in s) == 5000 and all(x.shape[1] <= 2048 for x in s)
    assert torch.equal(torch.cat(s, 1), torch.cat(make_text_samples(tok, 5000, sample_len=2048, seed=0), 1))
    tail = bytes(int(i) - 1 for i in s[-1][0, :80]).decode(errors="replace")
    assert tail.count("-") >= 4  # UUID text
    with pytest.raises(ValueError, match="uuid_fraction"):
        make_text_samples(tok, 100, uuid_fraction=2.0)
