"""The GPU route of kvcomp's vLLM backend, run on the CPU: decode rows through the Triton kernels.

The ``think-triton``, ``duo-triton`` and ``vq-triton`` engines of the session fixture (conftest.py)
repeat the ``think``, ``duo`` and ``vq`` runs under ``TRITON_INTERPRET=1``: every one-token request
goes through ``kvcomp::think_decode`` / ``kvcomp::duo_decode`` / ``kvcomp::vq_lut`` +
``kvcomp::vq_topk`` (and ``kvcomp::vq_encode_paged`` for every code write) on their Triton kernels,
as on a GPU, instead of the CPU route (the native kernels, or the references without the
extension). Greedy tokens must still equal kvcomp's own HF path.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("method", ["think", "duo", "vq"])
def test_triton_decode_tokens_match_kvcomp_hf_path(engines, method):
    r, ref_route = engines[f"{method}-triton"], engines[method]
    assert r["trace"] and {t["decode_ops"] for t in r["trace"]} == {"triton"}, r["trace"]
    from kvcomp.ops._dispatch import has_native

    cpu = "native" if has_native("duo_decode") else "reference"  # the CPU route: native kernels when built
    assert {t["decode_ops"] for t in ref_route["trace"]} == {cpu}, ref_route["trace"]
    assert {t["method"] for t in r["trace"]} == {method}
    want = engines["hf_kvcomp"][method]
    assert r["tokens"] == want, f"vLLM+{method} (Triton decode) {r['tokens']}\nkvcomp HF path {want}"
