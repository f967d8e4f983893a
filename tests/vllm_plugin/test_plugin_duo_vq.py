"""DuoAttention + A²ATS through kvcomp's vLLM backend: every retrieval head an A²ATS head (one code
cell per token in the pages); streaming heads hold nothing on the device (their K/V sits in the
host mirror beside the retrieval heads', read at the sink and recent positions).

The ``duo+vq`` engine of the session fixture (conftest.py) combines the DuoAttention test config
(one of two KV heads per layer streaming, sink 16 + recent 48) with the tiny model's A²ATS
codebooks on the other head, at the 8 MiB device budget of the A²ATS test, prefix caching on.
"""

from __future__ import annotations

from _vllm_common import D, L, VQ_KV_BYTES


def test_pages_hold_codes_of_the_retrieval_heads(engines):
    r = engines["duo+vq"]
    assert sorted(t["layer"] for t in r["trace"]) == [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    for t in r["trace"]:
        assert t["method"] == "duo+vq" and t["ring"] is None
        assert t["kv_cache_shape"][1] == 1 and t["kv_cache_shape"][3] == 1, t  # 1 retrieval head, 1 code cell
    # the mirror holds both heads (retrieval + streaming) of every code block
    assert max(t["host_mirror_bytes"] for t in r["trace"]) == L * r["num_blocks"] * r["block_size"] * 2 * 2 * D * 4


def test_capacity_grows_beyond_vq_alone(engines):
    r, vq = engines["duo+vq"], engines["vq"]
    print(f"Duo+A2ATS: vLLM KV cache size {r['log_kv_tokens']:,} tokens in {VQ_KV_BYTES >> 20} MiB "
          f"(A2ATS alone {vq['log_kv_tokens']:,}); max concurrency {r['log_max_concurrency']}")
    # half the heads leave the device: twice the blocks, twice vLLM's capacity
    assert r["num_blocks"] == 2 * vq["num_blocks"] and r["log_kv_tokens"] == 2 * vq["log_kv_tokens"]


def test_greedy_tokens_match_kvcomp_hf_path(engines):
    got, want = engines["duo+vq"]["tokens"], engines["hf_kvcomp"]["duo+vq"]
    assert want != engines["hf_full"] and want != engines["hf_kvcomp"]["duo"]
    assert got == want, f"vLLM+Duo+A2ATS {got}\nkvcomp HF path {want}"
