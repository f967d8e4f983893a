"""Harness accuracy through vLLM equals kvcomp's HF path (DuoAttention on the bundled SmolLM2).

The ``smol-duo`` engine of the session fixture (conftest.py) answers the quality harness's passkey
samples (prose haystack, 1K tokens) with the DuoAttention pattern shipped for SmolLM2 (thresholded
per layer, as ``kvcomp vllm-config --method duo`` writes it); kvcomp's HF DuoAttention path
answers the same samples. Both are scored by the harness's own metric.
"""

from __future__ import annotations


def test_harness_accuracy_matches_kvcomp_hf_path(engines):
    from kvcomp.eval.score import string_match_all

    h, r = engines["harness"], engines["smol-duo"]
    tok, samples = h["tokenizer"], h["samples"]
    assert len(r["tokens"]) == len(samples)
    answers = [tok.decode(t, skip_special_tokens=True) for t in r["tokens"]]

    def acc(texts):
        return sum(string_match_all(p, s.answers) for p, s in zip(texts, samples)) / len(samples)

    print(f"passkey accuracy over {len(samples)} SmolLM2 samples: vLLM+duo {acc(answers):.3f}, "
          f"kvcomp HF duo {acc(h['hf_duo']):.3f}, HF full cache {acc(h['hf_full']):.3f}")
    assert acc(h["hf_full"]) > 0, "the full cache answers nothing: the comparison could not tell methods apart"
    assert [a.strip() for a in answers] == [a.strip() for a in h["hf_duo"]]
    assert acc(answers) == acc(h["hf_duo"])
    assert r["trace"] and {t["method"] for t in r["trace"]} == {"duo"}, "kvcomp's backend did not run"
