"""DuoAttention + ThinK (and all three methods) on the bundled SmolLM2 at a small device KV budget.

vLLM makes every KV-cache group's page as large as the largest one (here the per-request ring):
with the ring DuoAttention + ThinK share holding every KV head for ``sink + recent`` slots, the
retrieval pages were enlarged to 768-token blocks and vLLM refused to start at 64 MiB / 1024
tokens ("0.06 GiB KV cache is needed ... > 0.04 GiB available"). The shared ring now holds the
streaming head's slots followed by the retrieval heads' ThinK windows (:func:`kvcomp.methods.duo.shared_ring`;
SmolLM2: 1 streaming, 2 retrieval KV heads, so the windows are stacked in the one streaming head's
slots), and the block stays at 256 tokens. Engines (in-process, prefix caching off):

* ``duo+think``: the shipped DuoAttention pattern (one streaming head per layer, sink 64 + recent
  256), query-driven ThinK (40 % pruned, window 32: channel ids in the shared ring), 64 MiB, 1024;
* ``duo+think+vq``: the same plus A²ATS on the retrieval heads (shipped codebooks), 4 code blocks
  (the host mirror shadows them).

References: kvcomp's transformers path with the same saved configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _vllm_common import MAX_TOKENS, collect_engines, kvcomp_hf_greedy, start_engine, vllm_python

KV_BYTES, MAX_LEN = 64 << 20, 1024


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    from kvcomp.calibrate.data import haystack_token_ids
    from kvcomp.methods import MethodOptions, build_vllm_method
    from kvcomp.models import load_model, model_folder

    work = tmp_path_factory.mktemp("vllm_small_budget")
    smol, tok = load_model("smollm2-135m", device="cpu")
    text = haystack_token_ids(tok)
    prompts = [text[o:o + n].tolist() for o, n in ((500, 61), (2000, 400))]
    (work / "prompts.json").write_text(json.dumps(prompts))
    opts = MethodOptions(think_channels="query")
    cfgs = {m: build_vllm_method(m, smol, tok, "smollm2-135m", opts) for m in ("duo+think", "duo+think+vq")}
    budget = ("--kv-cache-bytes", str(KV_BYTES), "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "1024")
    extra = {"duo+think": budget, "duo+think+vq": budget + ("--num-blocks", "4")}
    procs = {}
    for name, c in cfgs.items():
        c.save(work / f"{name}_config")
        procs[name] = start_engine(py, work, name, Path(model_folder("smollm2-135m")), work / "prompts.json",
                                   MAX_TOKENS, "kvcomp", config=str(work / f"{name}_config"),
                                   trace=str(work / f"{name}.trace"), inproc=True, prefix_caching=False,
                                   extra=extra[name])
    ref = {name: kvcomp_hf_greedy(smol, prompts, MAX_TOKENS, c) for name, c in cfgs.items()}
    res = collect_engines(procs, timeout=900)
    for name in cfgs:
        res[name]["trace"] = [json.loads(x) for x in (work / f"{name}.trace").read_text().splitlines()]
    res["hf"] = ref
    return res


@pytest.mark.parametrize("name", ["duo+think", "duo+think+vq"])
def test_serves_at_small_budget_and_matches_hf_path(runs, name):
    r = runs[name]
    print(f"{name}: {r['num_blocks']} blocks x {r['block_size']}, vLLM KV cache size {r['log_kv_tokens']:,} tokens, "
          f"ring {r['trace'][0]['ring_view']}")
    assert r["tokens"] == runs["hf"][name], f"vLLM {r['tokens']}\nkvcomp HF path {runs['hf'][name]}"


def test_duo_think_ring_is_the_streaming_heads_and_blocks_stay_small(runs):
    """One ring head (the streaming one) of sink + recent + 2 x (window + 1) slots rounded to whole
    pages; the retrieval pages' block 256 tokens (was 768, and refused at 64 MiB)."""
    r = runs["duo+think"]
    assert r["block_size"] == 256 and r["log_kv_tokens"] >= 1024
    for t in r["trace"]:
        (blocks, heads, slots, content), _ = t["ring_view"]
        assert heads == 1 and content == 128 and 64 + 256 + 2 * 33 <= slots <= 448, t
        assert t["kv_cache_shape"][1:] == [2, 256, 48 + 64], t
