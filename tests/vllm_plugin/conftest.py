"""One session fixture starts every vLLM engine the plugin tests need, all at once.

An engine start costs ~15-30 s of CPU per vLLM import (one in-process, three when the engine core
and worker are spawned), so the three runs overlap with each other and with the HF references:

* ``stock``: stock vLLM (CPU_ATTN), in-process engine;
* ``off``: kvcomp's backend without a config, in-process engine;
* ``think``: kvcomp's backend with a saved ThinK config (static channels, 32-token full-width
  window in a ring), in-process engine, prompts prefilled whole (256-token step budget);
* ``duo``: kvcomp's backend with a saved DuoAttention config (rings registered from the worker),
  default process topology (spawned engine core + worker), so the entry point and
  ``KVCOMP_CONFIG`` must reach the worker;
* ``vq``: kvcomp's backend with A²ATS codebooks calibrated on the tiny model, an 8 MiB device KV
  budget (the host mirror shadows every code page), in-process engine.
* ``smol-duo``, ``smol-think``, ``smol-vq``, ``smol-duo+vq``: the bundled SmolLM2 with each
  method's ``kvcomp vllm-config`` layout, answering the quality harness's passkey samples
  (``test_plugin_harness.py``);
* ``think-triton``, ``duo-triton``, ``vq-triton``: the same runs under ``TRITON_INTERPRET=1``, so
  the decode rows take the Triton kernels, the GPU route (``test_plugin_triton.py``).

The references are kvcomp's own HF path (``kvcomp.hf.compress``) with the same saved configs.
Alongside, ``stress-<method>`` runs (``_run_stress.py``, one per method) push 12 requests of mixed
lengths through a pool of 12-13 blocks of 16 tokens with 32-token chunked prefill, forcing
preemption, and abort two of them.
"""

from __future__ import annotations

import os

# Triton decides at import (vLLM imports it) whether its own jit helpers (tl.sum, ...) are
# interpreted, so the interpreter must be on before anything imports vLLM: the unit tests run the
# Triton decode kernels on CPU tensors with it (and the ops' references with TRITON_INTERPRET=0 at
# call time). The engines spawned below run without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
try:  # import it now, whatever a test later sets TRITON_INTERPRET to
    import triton.language  # noqa: F401,E402
except ImportError:
    pass

import json  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402

from _vllm_common import (DUO_PATTERN, cpu_ops, HARNESS_CONTEXT, HARNESS_METHODS, HARNESS_SAMPLES, HARNESS_TOKENS, RECENT, SINK, STRESS_LENGTHS, STRESS_TOKENS, VQ_KV_BYTES, D, HKV, KEEP,
                          MAX_TOKENS, L, build_tiny_llama, finish_engine, hf_greedy, kvcomp_hf_greedy, make_prompts,
                          start_engine, start_stress, think_channels, tiny_vq, use_duo_attention, vllm_python,
                          wait_engine)


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_engines")
    model_dir = work / "model"
    model = build_tiny_llama(model_dir)
    prompts = make_prompts()
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    ch = think_channels(L, HKV, D, KEEP)
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    cfgs = {"think": CompressionConfig(**geo, think=ThinK(prune_ratio=0.25, channels=ch)),
            "duo": CompressionConfig(**geo, duo=DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK,
                                                             recent=RECENT)),
            "vq": CompressionConfig(**geo, vq=tiny_vq(model))}
    cfgs["duo+vq"] = CompressionConfig(**geo, duo=cfgs["duo"].duo, vq=cfgs["vq"].vq)  # VQ on the retrieval heads
    for name, c in cfgs.items():
        c.save(work / f"{name}_config")
    triton_runs = ("think", "duo", "vq")  # rerun with the decode ops on their Triton kernels (interpreter)
    traces = {name: work / f"{name}.trace.jsonl"
              for name in ("off", "think", "duo", "vq", "duo+vq") + tuple(f"{m}-triton" for m in triton_runs)}
    whole = ("--max-num-batched-tokens", "256")  # prompts prefilled in one chunk: exact like the HF prefill
    specs = {
        "duo": dict(prefix_caching=False),
        "think": dict(inproc=True, prefix_caching=False, extra=whole + ("--max-model-len", "4096")),
        "vq": dict(inproc=True, extra=whole + ("--kv-cache-bytes", str(VQ_KV_BYTES))),
        "duo+vq": dict(inproc=True, extra=whole + ("--kv-cache-bytes", str(VQ_KV_BYTES))),
    }
    procs = {}
    for name in list(specs) + [f"{m}-triton" for m in triton_runs]:
        method = name.removesuffix("-triton")
        procs[name] = start_engine(py, work, name, model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                                   config=str(work / f"{method}_config"), trace=str(traces[name]),
                                   interpret=name != method, **specs[method])
    procs.update({
        "stock": start_engine(py, work, "stock", model_dir, prompts_file, MAX_TOKENS, "stock", inproc=True),
        "off": start_engine(py, work, "off", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                            trace=str(traces["off"]), inproc=True),
    })
    # the bundled SmolLM2 (converted HF folder): compression off through kvcomp = stock vLLM = HF
    from kvcomp.calibrate.data import haystack_token_ids
    from kvcomp.models import load_model, model_folder

    smol_dir = model_folder("smollm2-135m")
    smol, smol_tok = load_model("smollm2-135m", device="cpu")
    text = haystack_token_ids(smol_tok)
    smol_prompts = [text[o:o + n].tolist() for o, n in ((0, 7), (500, 61), (2000, 300))]
    smol_file = work / "smol_prompts.json"
    smol_file.write_text(json.dumps(smol_prompts))
    for mode in ("stock", "kvcomp"):
        name = f"smol-{'off' if mode == 'kvcomp' else 'stock'}"
        procs[name] = start_engine(py, work, name, Path(smol_dir), smol_file, MAX_TOKENS, mode, inproc=True,
                                   extra=("--kv-cache-bytes", str(64 << 20)))
    # the quality harness on SmolLM2: passkey samples answered through vLLM by every method, laid
    # out as `kvcomp vllm-config` writes it, and by kvcomp's HF path with the same config
    from kvcomp.eval.tasks import make_sample
    from kvcomp.hf.generate import generate, sample_input_ids
    from kvcomp.methods import build_vllm_method

    samples = [make_sample("passkey", smol_tok, HARNESS_CONTEXT, haystack="prose", seed=s,
                           max_new_tokens=HARNESS_TOKENS) for s in range(HARNESS_SAMPLES)]
    harness_file = work / "harness_prompts.json"
    harness_file.write_text(json.dumps([sample_input_ids(smol_tok, x)[0].tolist() for x in samples]))
    smol_cfgs = {}
    for m in HARNESS_METHODS:
        smol_cfgs[m] = build_vllm_method(m, smol, smol_tok, "smollm2-135m")
        smol_cfgs[m].save(work / f"smol_{m}_config")
        name = f"smol-{m}"
        rings = m in ("duo", "think")  # per-request rings: no prefix caching
        budget = (8 if "vq" in m else 192) << 20  # A²ATS: the host mirror shadows x128 the code pages
        procs[name] = start_engine(py, work, name, Path(smol_dir), harness_file, HARNESS_TOKENS, "kvcomp",
                                   config=str(work / f"smol_{m}_config"),
                                   trace=str(traces.setdefault(name, work / f"{name}.trace.jsonl")), inproc=True,
                                   prefix_caching=not rings,
                                   extra=("--kv-cache-bytes", str(budget), "--max-model-len", str(HARNESS_CONTEXT),
                                          "--max-num-batched-tokens", "512"))
    # KVCOMP_CONFIG set but kvcomp not selected (CPU without the override): must fail, not serve stock
    unselected = start_engine(py, work, "unselected", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                              config=str(work / "think_config"), inproc=True, extra=("--no-override",))
    stress_prompts = make_prompts(STRESS_LENGTHS, seed=5)
    stress_file = work / "stress_prompts.json"
    stress_file.write_text(json.dumps(stress_prompts))
    for name in ("off", "think", "duo", "vq", "duo+vq"):
        procs[f"stress-{name}"] = start_stress(py, work, name, model_dir, stress_file,
                                               "" if name == "off" else str(work / f"{name}_config"))
    hf_full = hf_greedy(model, prompts, MAX_TOKENS)
    hf_smol = hf_greedy(smol, smol_prompts, MAX_TOKENS)
    with cpu_ops():
        harness = {"samples": samples, "tokenizer": smol_tok,
                   "hf": {m: [generate(smol, smol_tok, sample_input_ids(smol_tok, x), c,
                                       max_new_tokens=HARNESS_TOKENS).text
                              for x in samples] for m, c in {**smol_cfgs, "full": None}.items()}}
    del smol
    stress_ref = {"off": hf_greedy(model, stress_prompts, STRESS_TOKENS),
                  "duo": kvcomp_hf_greedy(model, stress_prompts, STRESS_TOKENS, cfgs["duo"])}
    hf_kvcomp = {name: kvcomp_hf_greedy(model, prompts, MAX_TOKENS, c) for name, c in cfgs.items()}
    use_duo_attention(model, torch.tensor(DUO_PATTERN), SINK, RECENT)
    hf_duo_mask = hf_greedy(model, prompts, MAX_TOKENS)
    errors, res = [], {}
    rc, text = wait_engine(unselected[0], unselected[2])
    res["unselected"] = {"rc": rc, "log": text}
    for name, p in procs.items():  # wait for all before failing, so no engine outlives the session
        try:
            res[name] = finish_engine(*p)
        except AssertionError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    for name, path in traces.items():
        res[name]["trace"] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    res["hf_full"], res["hf_duo_mask"] = hf_full, hf_duo_mask
    res["hf_kvcomp"] = hf_kvcomp
    res["stress_ref"] = stress_ref
    res["hf_smol"] = hf_smol
    res["harness"] = harness
    return res
