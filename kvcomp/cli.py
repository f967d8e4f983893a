"""``kvcomp`` command line: demo, eval, calibrate, vllm-config, bench, info."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from . import cli_args as T
from . import defaults as DEF

DEFAULT_METHODS = "full,duo,think,vq,all"


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registry name or local HF folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights and KV cache (bfloat16: what vLLM serves; ~10x faster prefill on CPUs with AMX)")
    p.add_argument("--methods", type=T.method_list, default=DEFAULT_METHODS,
                   help="comma-separated: full, all, or '+'-joined subsets of duo, think, vq")
    p.add_argument("--sparsity", type=T.fraction, default=DEF.DUO_SPARSITY, help="DuoAttention: fraction of streaming KV heads")
    p.add_argument("--sink", type=T.nonneg_int, default=DEF.DUO_SINK, help="DuoAttention sink tokens")
    p.add_argument("--recent", type=T.positive_int, default=DEF.DUO_RECENT, help="DuoAttention recent window")
    p.add_argument("--prune-ratio", type=T.prune_ratio, default=DEF.THINK_PRUNE_RATIO, help="ThinK: fraction of key channels pruned")
    p.add_argument("--think-window", type=T.positive_int, default=DEF.THINK_WINDOW,
                   help="ThinK: observation window (last prompt queries scoring the channels) and full-width recent keys")
    p.add_argument("--think-channel-multiple", type=T.positive_int, default=DEF.THINK_CHANNEL_MULTIPLE,
                   help="ThinK: kept channels rounded up to a multiple of this with the next-best channels "
                        "(16: 80 of 128 at λ=0.4; 1: exactly D - floor(λ·D))")
    p.add_argument("--topk", type=T.topk, default=DEF.VQ_TOPK,
                   help="VQ: top-K per query head (fraction < 1, or count); A²ATS uses 0.03 on 8B models")
    p.add_argument("--n-codes", type=T.positive_int, default=DEF.VQ_CODES, help="VQ codebook size (256: shipped for SmolLM2)")
    p.add_argument("--vq-dense-layers", type=T.nonneg_int, default=DEF.VQ_DENSE_LAYERS, help="VQ: first layers keep exact attention")
    p.add_argument("--vq-select", choices=DEF.VQ_SELECTS, default=DEF.VQ_SELECT,
                   help="VQ token ranking: codes (A²ATS) or oracle (exact q.k top-K under the same sink/local/GQA-union "
                        "rules: an analysis baseline that keeps the full KV and saves nothing; HF path only)")
    p.add_argument("--duo-pattern", default=None, help="duo-attention full_attention_heads.tsv (or its folder)")
    p.add_argument("--codebooks", default=None, help="VQ codebooks .safetensors (default: calibrate on first use)")


def _options(a):
    from .methods import MethodOptions

    return MethodOptions(sparsity=a.sparsity, sink=a.sink, recent=a.recent, prune_ratio=a.prune_ratio, think_window=a.think_window,
                         think_channel_multiple=a.think_channel_multiple,
                         topk=a.topk, n_codes=a.n_codes, vq_dense_layers=a.vq_dense_layers,
                         vq_select=a.vq_select, duo_pattern=a.duo_pattern, codebooks=a.codebooks)


def _setup(a):
    import torch

    from .methods import build_method
    from .models import load_model

    methods = a.methods  # names checked while parsing, before anything loads
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model, tok = load_model(a.model, device=device, dtype=getattr(torch, a.dtype))
    print(f"[kvcomp] loaded {a.model} ({a.dtype}) on {device} in {time.perf_counter() - t0:.1f} s")
    opts = _options(a)
    ch = getattr(a, "think_channels", "query")
    configs = {m: build_method(m, model, tok, a.model, opts, think_channels=ch) for m in methods}
    return model, tok, configs


def cmd_demo(a) -> int:
    from .eval.score import string_match_all
    from .eval.tasks import make_sample
    from .hf.generate import generate, sample_input_ids

    model, tok, configs = _setup(a)
    s = make_sample("niah_single", tok, a.context, haystack="prose", seed=a.seed, chat=True)
    ids = sample_input_ids(tok, s)
    print(f"[kvcomp] prompt: {ids.shape[1]} tokens of Python-docs prose hiding one fact "
          f"(needle at {s.depth:.0f}% depth): {s.needles[0]!r}")
    print(f"[kvcomp] question: {s.query!r}  expected: {s.answers}")
    full_bpt = None
    rows = []
    for name, cfg in configs.items():
        r = generate(model, tok, ids, cfg, max_new_tokens=s.max_new_tokens)
        bpt = r.device_bytes_per_token
        full_bpt = bpt if name == "full" else full_bpt
        rel = f"{100 * bpt / full_bpt:5.1f}%" if full_bpt else "  n/a"
        ok = "OK " if string_match_all(r.text, s.answers) == 1.0 else "MISS"
        desc = cfg.describe() if cfg is not None else "stock cache"
        print(f"{name:>12} | {ok} | answer {r.text.strip()[:40]!r:44} | KV {bpt:8.0f} B/token on device ({rel} of full)"
              f", {r.host_bytes_per_token:7.0f} B/token offloaded | {r.seconds:5.1f} s | {desc}")
        rows.append({"method": name, "answer": r.text, **r.stats()})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def cmd_eval(a) -> int:
    from .eval.checkpoint import Checkpoint
    from .eval.runner import _jsonable, build_samples, compare_to_full, evaluate_samples, summarize
    from .hf.generate import make_converse, make_generate
    from .utils.machine import git_commit, machine_info

    commit, machine = git_commit(), machine_info()  # of the code that runs, read before the long run
    model, tok, configs = _setup(a)
    if a.mode == "single":
        samples = build_samples(tok, tasks=a.tasks, context_lens=a.context_lens, n_trials=a.trials,
                                haystacks=a.haystacks, seed=a.seed, chat=True)
    else:
        from .eval.multiquery import build_multiquery_samples, evaluate_multiquery

        samples = build_multiquery_samples(tok, context_lens=a.context_lens, n_trials=a.trials, n_queries=a.queries,
                                           haystacks=a.haystacks, seed=a.seed, chat=True)
    # finished samples go to <out>.partial.jsonl as they finish: a killed run resumes there
    identity = {k: getattr(a, k) for k in ("model", "dtype", "mode", "tasks", "haystacks", "context_lens", "trials",
                                           "seed", "queries", "tag", "batch_size")}
    if a.mode != "single":
        identity["history"] = a.history
    identity["configs"] = {n: (c.to_dict() if c is not None else "stock") for n, c in configs.items()}
    ckpt = Checkpoint(f"{a.out}.partial.jsonl", identity, commit)
    if ckpt.resumed:
        print(f"[kvcomp] resuming: {ckpt.resumed} finished samples in {ckpt.path}")
    print(f"[kvcomp] {len(samples)} {a.mode} samples x {len(configs)} methods")
    t_start = time.perf_counter()
    records, method_seconds = [], {}
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        if a.mode == "single":
            gen = make_generate(model, tok, cfg, batched=a.batch_size > 1)
            records += evaluate_samples(gen, samples, method_name=name + a.tag, batch_size=a.batch_size,
                                        checkpoint=ckpt)
        else:
            records += evaluate_multiquery(make_converse(model, tok, cfg, history=a.history), samples, method_name=name + a.tag,
                                           checkpoint=ckpt)
        method_seconds[name + a.tag] = round(time.perf_counter() - t0, 1)
    summary = compare_to_full(summarize(records), records, full_method="full" + a.tag)
    for r in summary:
        cfg = configs.get(r["method"][: len(r["method"]) - len(a.tag)] if a.tag else r["method"])
        r["config"] = cfg.to_dict() if cfg is not None else {"policy": "stock"}
        r["tasks"] = ",".join(a.tasks) if a.mode == "single" else f"niah_shared x{a.queries}, {a.history} history"
        print(json.dumps({k: r.get(k) for k in ("method", "context_len", "mode", "turn", "n_prompts", "accuracy",
                                                 "ci95", "accuracy_retained", "paired", "bytes_fraction", "wall_s")}))
    meta = {"model": a.model, "mode": a.mode, "tasks": a.tasks if a.mode == "single" else ["niah_shared"],
            "queries": a.queries if a.mode != "single" else None,
            "history": a.history if a.mode != "single" else None, "haystacks": ",".join(a.haystacks),
            "trials": a.trials, "seed": a.seed, "dtype": a.dtype, "batch_size": a.batch_size, "command": " ".join(sys.argv),
            "method_seconds": method_seconds, "seconds": round(time.perf_counter() - t_start, 1),
            "resumed_samples": ckpt.resumed, "commits": ckpt.commits}
    obj = {"machine": machine, "commit": commit, "meta": meta, "records": summary}
    if a.keep_samples:
        obj["samples"] = records
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
    ckpt.remove()
    print(f"[kvcomp] wrote {a.out} ({meta['seconds']} s)")
    if a.plot:
        from .eval.plot import plot_accuracy_vs_kv

        plot_accuracy_vs_kv([r for r in summary if r["turn"] in ("all", "later")], a.plot,
                            title=f"{a.model}: accuracy vs allocated KV bytes/token")
        print(f"[kvcomp] wrote {a.plot}")
    return 0


def cmd_calibrate(a) -> int:
    if a.what == "duo":
        from .calibrate.duo import run_duo

        run_duo(a)
    else:
        from .calibrate.vq import run_vq

        run_vq(a)
    return 0


def cmd_info(a) -> int:
    import torch

    from . import __version__
    from ._ext import cpu_isa, has_ext

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    print(json.dumps({"kvcomp": __version__, "torch": torch.__version__, "triton": tv,
                      "cuda": torch.cuda.is_available(), "native_extension": has_ext(),
                      "native_cpu_isa": cpu_isa()}, indent=2))
    return 0


def cmd_vllm_config(a) -> int:
    from .methods import build_vllm_method, parse_method
    from .methods.named import check_duo_threshold, check_vllm_vq_select
    from .models import load_model, model_folder

    check_duo_threshold(a.method, a.duo_threshold)  # before loading the model
    check_vllm_vq_select(a.method, a.vq_select)
    model, tok = load_model(a.model, device="cpu")
    opts = _options(a)
    opts.think_channels = a.think_channels
    opts.duo_threshold = a.duo_threshold
    cfg = build_vllm_method(a.method, model, tok, a.model, opts)
    if cfg is None:
        print("[kvcomp] method 'full': no config needed (serve without KVCOMP_CONFIG)")
        return 0
    cfg.save(a.out)
    folder = model_folder(a.model)
    parts = parse_method(a.method)
    rings = "think" in parts or ("duo" in parts and "vq" not in parts)  # per-request rings: no prefix caching
    print(f"[kvcomp] wrote {a.method} config for {a.model} to {a.out}\n"
          f"serve on GPU:  KVCOMP_CONFIG={a.out} vllm serve {folder} --attention-backend CUSTOM"
          f"{' --no-enable-prefix-caching' if rings else ''}\n"
          f"serve on CPU:  KVCOMP_VLLM_OVERRIDE_CPU=1 KVCOMP_CONFIG={a.out} python -m "
          f"vllm.entrypoints.openai.api_server --model {folder} --dtype float32"
          f"{' --no-enable-prefix-caching' if rings else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .eval.haystack import HAYSTACKS
    from .eval.tasks import TASKS

    # --debug is accepted before or after the subcommand (SUPPRESS: a subparser's default
    # does not overwrite a top-level --debug)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of an error (also: KVCOMP_DEBUG=1)")
    p = argparse.ArgumentParser(prog="kvcomp", description="KV-cache compression with real memory savings")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (also: KVCOMP_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", parents=[debug], help="answer a hidden-fact question over long prose with each method")
    _add_method_args(d)
    d.add_argument("--context", type=T.positive_int, default=2048, help="prompt length in tokens")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--json", default=None, help="also write the rows as JSON")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", parents=[debug], help="RULER-style offline quality harness")
    _add_method_args(e)
    e.add_argument("--tasks", type=T.names(TASKS),
                   default="passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery",
                   help="also: vt (SmolLM2-135M scores ~0%% on it even uncompressed)")
    e.add_argument("--haystacks", type=T.names(HAYSTACKS), default="prose", help="comma-separated: noise, prose")
    e.add_argument("--context-lens", type=T.positive_int_list, default="2048,4096",
                   help="comma-separated prompt lengths in tokens")
    e.add_argument("--trials", type=T.positive_int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="quality.json")
    e.add_argument("--plot", default=None, help="PNG of accuracy vs KV bytes/token")
    e.add_argument("--keep-samples", action="store_true", help="store every sample's prediction in the JSON")
    e.add_argument("--tag", default="", help="suffix for method names in the results (e.g. a budget sweep: vq@topk0.05)")
    e.add_argument("--mode", choices=("single", "multi-query"), default="single",
                   help="multi-query: one shared context, --queries questions asked in turn on the same cache")
    e.add_argument("--queries", type=T.positive_int, default=4, help="multi-query: facts hidden and questions asked")
    e.add_argument("--think-channels", choices=DEF.THINK_CHANNELS, default="query",
                   help="ThinK's kept key channels: chosen per request from the prompt's last queries (as published) "
                        "or static (calibrated once: what kvcomp vllm-config serves by default)")
    e.add_argument("--history", choices=DEF.MQ_HISTORIES, default=DEF.MQ_HISTORIES[0],
                   help="multi-query: a later turn follows the gold answers (SCBench's protocol; every method sees the "
                        "same conversation) or the model's own answers (an earlier miss is carried forward)")
    e.add_argument("--batch-size", type=T.positive_int, default=1,
                   help="single mode: run up to this many prompts of equal token length together")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("calibrate", parents=[debug], help="calibrate DuoAttention gates or VQ codebooks")
    csub = c.add_subparsers(dest="what", required=True)
    from .calibrate.duo import add_duo_args
    from .calibrate.vq import add_vq_args

    add_duo_args(csub.add_parser("duo", parents=[debug], help="optimise one gate per KV head on multi-passkey data"))
    add_vq_args(csub.add_parser("vq", parents=[debug], help="fit windowed-RoPE query-aware VQ codebooks"))
    c.set_defaults(fn=cmd_calibrate)

    v = sub.add_parser("vllm-config", parents=[debug], help="write a config for kvcomp's vLLM backend (KVCOMP_CONFIG)")
    _add_method_args(v)
    v.add_argument("--method", type=T.method, required=True,
                   help="duo, think, vq, or any '+'-joined combination (all = duo+think+vq)")
    v.add_argument("--think-channels", choices=DEF.THINK_CHANNELS, default="static",
                   help="ThinK's kept key channels: static (calibrated once, cached) or query (chosen per "
                        "request from its own prompt's last queries, as published)")
    v.add_argument("--duo-threshold", choices=("layer", "global"), default="layer",
                   help="DuoAttention's gates thresholded per layer (the same number of streaming heads in "
                        "every layer) or globally, as published (counts differ per layer: each layer gets "
                        "its own page; DuoAttention alone, tensor parallel size 1)")
    v.add_argument("--out", required=True, help="directory to write (CompressionConfig.save)")
    v.set_defaults(fn=cmd_vllm_config)

    from .bench.runner import add_bench_parser

    add_bench_parser(sub, parents=[debug])

    i = sub.add_parser("info", parents=[debug], help="versions and build features")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. An error prints one line ``kvcomp: error: ...`` and returns 2; with
    ``--debug`` or ``KVCOMP_DEBUG=1`` it prints the traceback instead. Bad arguments exit 2 from
    argparse while parsing, before anything loads."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("KVCOMP_DEBUG", "") not in ("", "0")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 -- the command line's one error exit
        if debug:
            traceback.print_exc()
        else:
            kind = "" if isinstance(e, (ValueError, OSError, RuntimeError, ImportError)) else f"{type(e).__name__}: "
            msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
            print(f"kvcomp: error: {kind}{msg} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
