"""Harness accuracy through vLLM equals kvcomp's HF path, every method, on the bundled SmolLM2.

The ``smol-<method>`` engines of the session fixture (conftest.py) answer the quality harness's
passkey samples (prose haystack, 1K tokens) with the config ``kvcomp vllm-config --method <method>``
writes (DuoAttention: the shipped gates thresholded per layer; ThinK: static channels; A²ATS: the
shipped codebooks on every layer); kvcomp's HF path answers the same samples with the same config.
Both are scored by the harness's own metric.
"""

from __future__ import annotations

import pytest
from _vllm_common import HARNESS_METHODS


@pytest.mark.parametrize("method", HARNESS_METHODS)
def test_harness_accuracy_matches_kvcomp_hf_path(engines, method):
    from kvcomp.eval.score import string_match_all

    h, r = engines["harness"], engines[f"smol-{method}"]
    tok, samples = h["tokenizer"], h["samples"]
    assert r["trace"] and {t["method"] for t in r["trace"]} == {method}, "kvcomp's backend did not run"
    assert len(r["tokens"]) == len(samples)
    answers = [tok.decode(t, skip_special_tokens=True) for t in r["tokens"]]

    def acc(texts):
        return sum(string_match_all(p, s.answers) for p, s in zip(texts, samples)) / len(samples)

    print(f"passkey accuracy over {len(samples)} SmolLM2 samples: vLLM+{method} {acc(answers):.3f}, "
          f"kvcomp HF {method} {acc(h['hf'][method]):.3f}, HF full cache {acc(h['hf']['full']):.3f}")
    assert acc(h["hf"]["full"]) > 0, "the full cache answers nothing: the comparison could not tell methods apart"
    assert [a.strip() for a in answers] == [a.strip() for a in h["hf"][method]]
    assert acc(answers) == acc(h["hf"][method])
