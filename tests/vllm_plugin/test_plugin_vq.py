"""A²ATS through kvcomp's vLLM backend: VQ codes in the device pages, full K/V in the host mirror.

The ``vq`` engine of the session fixture (conftest.py) runs with codebooks fitted on the tiny
model (32 codes per KV head, top 10% of the context + 4 sink + 8 local tokens at decode) and an
8 MiB device KV budget. Checks: the page cell is one fp32 element (the int16 code) per token and KV
head, the host mirror holds the full K/V of every code page, vLLM's own capacity per device byte
grows by the page ratio (2·64·4 / 4 = 128), and greedy tokens equal kvcomp's HF A²ATS path on the
same config (and differ from full attention, so the comparison can fail).
"""

from __future__ import annotations

from _vllm_common import D, HKV, L, VQ_KV_BYTES


def test_pages_hold_codes_and_mirror_holds_kv(engines):
    r = engines["vq"]
    assert sorted(t["layer"] for t in r["trace"]) == [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    for t in r["trace"]:
        assert t["method"] == "vq"
        assert t["kv_cache_shape"][1:] == [HKV, r["block_size"], 1], t
    # every layer's mirror: num_blocks x block x Hkv x (D + Dv) fp32, allocated before the first batch ran
    per_layer = r["num_blocks"] * r["block_size"] * HKV * 2 * D * 4
    assert max(t["host_mirror_bytes"] for t in r["trace"]) == L * per_layer


def test_kv_capacity_per_device_byte_grows(engines):
    r, off = engines["vq"], engines["off"]
    per_byte_vq = r["log_kv_tokens"] / VQ_KV_BYTES
    per_byte_off = off["log_kv_tokens"] / (1 << 30)
    print(f"A2ATS: vLLM KV cache size {r['log_kv_tokens']:,} tokens in {VQ_KV_BYTES >> 20} MiB of device pages "
          f"(stock: {off['log_kv_tokens']:,} in 1 GiB) = x{per_byte_vq / per_byte_off:.1f} tokens per device byte; "
          f"max concurrency {r['log_max_concurrency']} at {r['max_model_len']} tokens")
    assert r["log_kv_tokens"] == r["kv_tokens"] == (VQ_KV_BYTES // (L * HKV * r["block_size"] * 4)) * r["block_size"]
    assert abs(per_byte_vq / per_byte_off - 2 * D * 4 / 4) < 1e-6


def test_greedy_tokens_match_kvcomp_hf_path(engines):
    got, want = engines["vq"]["tokens"], engines["hf_kvcomp"]["vq"]
    assert want != engines["hf_full"], "top-K selection changes nothing: the test could not fail"
    assert got == want, f"vLLM+A2ATS {got}\nkvcomp HF A2ATS path {want}"
