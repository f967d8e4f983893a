"""``kvcomp bench serve``: vLLM-CPU end to end — kvcomp's methods against stock vLLM, one run.

    kvcomp bench serve                                      # 4x4K, 8x7.5K and 8x1K prompts, every method
    kvcomp bench serve --loads 4x4K --methods stock,off,duo --output-tokens 128 --budget-s 1800

For each method one vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server`` in the
vllm-cpu venv, scripts/setup_vllm_cpu.sh) serves the bundled SmolLM2; for each load, N passkey
prompts of P tokens are sent at once as streaming completions with ``--output-tokens`` greedy
tokens (EOS ignored). Stock is vLLM's own CPU_ATTN backend; the others are kvcomp's backend
(``KVCOMP_VLLM_OVERRIDE_CPU=1``) with ``kvcomp vllm-config``'s config of the method. Every server
gets the same device KV budget, the same scheduler limits and prefix caching off (the prompts share
their haystack prefix: with it on, stock would skip prefill work that DuoAttention and ThinK cannot).
A²ATS keeps the full K/V in host memory: its runs get the number of blocks the loads need
(``--num-gpu-blocks-override``) instead of the budget's (their device pages hold only codes).

Per (method, load) one row: TTFT, decode tokens/s over the window where every request decodes,
end-to-end tokens/s, passkey accuracy, KV capacity (vLLM's "KV cache size" log line), peak RSS of
the server's process tree, and the stock row's values beside them. ``--hf-check`` adds each
method's accuracy through kvcomp's transformers path on the same prompts.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .serve_client import metrics, run_load, wait_ready

SERVE_OUT = Path("bench") / "results" / "serve-vllm-cpu.json"
SERVE_METHODS = "stock,off,duo,think,vq,duo+vq"
SERVE_LOADS = "4x4K,8x7.5K,8x1K"
LOG_RE = re.compile(r"KV cache size: ([\d,]+) tokens")
ANSWER_TOKENS = 32  # passkey answers fit; the prompt gets the rest of P + this


def parse_loads(s: str) -> tuple[tuple[int, int], ...]:
    """``"4x4K,8x7.5K"`` -> ``((4, 4096), (8, 7680))``: concurrency x prompt tokens."""
    out = []
    for tok in s.split(","):
        tok = tok.strip().upper()
        n, sep, p = tok.partition("X")
        try:
            mult = 1024 if p.endswith("K") else 1
            tokens = float(p[:-1] if mult > 1 else p) * mult
            if not sep or int(n) < 1 or tokens < 64 or tokens != int(tokens):
                raise ValueError
        except ValueError:
            raise ValueError(f"loads must look like 4x4K,8x7.5K,8x1024 (concurrency x prompt tokens >= 64), "
                             f"got {s!r}") from None
        out.append((int(n), int(tokens)))
    return tuple(out)


def add_serve_args(p) -> None:
    p.add_argument("--vllm-python", default=os.environ.get("KVCOMP_VLLM_PYTHON", ""),
                   help="interpreter of the vllm-cpu venv (default $KVCOMP_VLLM_PYTHON, else .venv-vllm/bin/python)")
    p.add_argument("--methods", default=SERVE_METHODS, help=f"comma-separated (default {SERVE_METHODS})")
    p.add_argument("--loads", default=SERVE_LOADS, help=f"concurrency x prompt tokens (default {SERVE_LOADS})")
    p.add_argument("--output-tokens", type=int, default=256, help="greedy tokens per request, EOS ignored")
    p.add_argument("--max-model-len", type=int, default=8192, help="SmolLM2's position limit")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM scheduler limit (default vLLM's)")
    p.add_argument("--kv-bytes", type=int, default=None,
                   help="device KV budget of every server (default: the largest load's tokens, at least one max-model-len request, in stock's layout x1.25)")
    p.add_argument("--host-gib", type=float, default=None,
                   help="A²ATS host-mirror budget ($KVCOMP_HOST_MIRROR_GIB; default: what the blocks need)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="every server without torch.compile (faster start; serving default is compiled)")
    p.add_argument("--hf-check", action="store_true", help="also score each method through the transformers path")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--work", default="/tmp/kvcomp-bench-serve", help="configs, prompts and server logs")
    p.add_argument("--append", action="store_true",
                   help="keep --out's rows of other (method, load) pairs (e.g. 8x7.5K after 4x4K; pass the same --kv-bytes)")
    p.add_argument("--out", default=str(SERVE_OUT))


def _vllm_python(a) -> str:
    py = a.vllm_python or (".venv-vllm/bin/python" if Path(".venv-vllm/bin/python").exists() else "")
    if not py or not Path(py).exists():
        raise ValueError("no vllm-cpu interpreter: run `bash scripts/setup_vllm_cpu.sh .venv-vllm` or pass "
                         "--vllm-python / $KVCOMP_VLLM_PYTHON")
    return py


class Server:
    """One vLLM OpenAI server process (its own process group) with its log file."""

    def __init__(self, py: str, model_dir: str, log: Path, port: int, env: dict, args: list[str]):
        self.log, self.port = log, port
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
               "--port", str(port), "--host", "127.0.0.1", "--seed", "0", "--no-enable-prefix-caching",
               "--disable-uvicorn-access-log", *args]
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._poll = threading.Thread(target=self._rss_loop, daemon=True)
        self._poll.start()

    def _rss_loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.proc.pid)
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                return
            self._stop.wait(0.5)

    def text(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.fh.close()


def _validate(a) -> tuple[str, tuple, list[str]]:
    """Every argument checked before anything loads: ``(vllm python, loads, methods)``."""
    from kvcomp.methods.named import parse_method

    loads = parse_loads(a.loads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods is empty")
    for m in methods:
        if m not in ("stock", "off"):
            parse_method(m)
    if a.output_tokens < 2:
        raise ValueError("--output-tokens must be >= 2 (a decode window needs two tokens)")
    for n, p in loads:
        if p + a.output_tokens > a.max_model_len:
            raise ValueError(f"load {n}x{p}: {p} prompt + {a.output_tokens} output tokens > --max-model-len "
                             f"{a.max_model_len}")
    if "stock" in methods:  # stock first: every later row gets its ratios
        methods = ["stock"] + [m for m in methods if m != "stock"]
    return _vllm_python(a), loads, methods


def _prompts(tok, loads, seed0: int = 0):
    """Passkey samples (prose haystack) per load, ``P`` prompt tokens at most; seeds differ per load."""
    from kvcomp.eval.tasks import make_sample
    from kvcomp.hf.generate import sample_input_ids

    out = {}
    for li, (n, p) in enumerate(loads):
        samples = [make_sample("passkey", tok, p + ANSWER_TOKENS, haystack="prose", seed=seed0 + 1000 * li + s,
                               max_new_tokens=ANSWER_TOKENS) for s in range(n)]
        out[(n, p)] = [(s, sample_input_ids(tok, s)[0].tolist()) for s in samples]
    return out


def _accuracy(tok, samples, token_lists) -> float:
    from kvcomp.eval.score import string_match_all

    # the answer is in the first tokens; 256 EOS-ignored tokens go on talking
    texts = [tok.decode(t[:ANSWER_TOKENS], skip_special_tokens=True) for t in token_lists]
    return sum(string_match_all(x, s.answers) for x, s in zip(texts, samples)) / len(samples)


def run_serve(a, budget, rec, bar) -> int:
    """The sweep: one server per method, every load on it; rows go to ``rec`` as they finish."""
    import torch

    from kvcomp.hf.generate import generate, sample_input_ids
    from kvcomp.methods import MethodOptions, build_vllm_method
    from kvcomp.models import load_model, model_folder
    from kvcomp.vllm_plugin.mirror import available_host_bytes

    py, loads, methods = _validate(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", device="cpu")
    model_dir = model_folder("smollm2-135m")
    c = model.config
    hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = c.num_hidden_layers * hkv * head_dim * 2 * 4  # stock's fp32 pages (bytes per token)
    need_tokens = max(max(n * (p + a.output_tokens) for n, p in loads), a.max_model_len)
    kv_bytes = a.kv_bytes or int(need_tokens * per_token * 1.25)
    block = 128  # vLLM-CPU's block size for stock and A²ATS code pages (bench/results/vllm-cpu.json)
    vq_blocks = kv_bytes // per_token // block  # A²ATS: as many tokens as stock's pages hold, K/V on the host
    prompts = _prompts(tok, loads)
    opts = MethodOptions()
    configs = {}
    for m in methods:
        if m not in ("stock", "off"):
            cfg = build_vllm_method(m, model, tok, "smollm2-135m", opts)
            configs[m] = work / f"config-{m.replace('+', '_')}"
            cfg.save(configs[m])
    rec.payload.update({"model": "smollm2-135m", "dtype": "float32", "kv_cache_memory_bytes": kv_bytes,
                        "output_tokens": a.output_tokens, "max_model_len": a.max_model_len,
                        "prefix_caching": False, "a2ats_num_blocks": vq_blocks,
                        "method_options": vars(opts)})
    rec.write()
    stock = {}
    for m in methods:
        if budget.spent():
            for n, p in loads:
                rec.add({"method": m, "prompt_tokens": p, "concurrency": n, "skipped": budget.reason()})
                bar.update(1)
            continue
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", "KVCOMP_VLLM_OVERRIDE_CPU": "0" if m == "stock" else "1"}
        env.pop("KVCOMP_CONFIG", None)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if m in configs:
            env["KVCOMP_CONFIG"] = str(configs[m])
        args = ["--max-model-len", str(a.max_model_len), "--max-num-seqs", str(max(n for n, _ in loads)),
                "--kv-cache-memory-bytes", str(kv_bytes)]
        if a.enforce_eager:
            args.append("--enforce-eager")
        if a.max_num_batched_tokens:
            args += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]
        if "vq" in m:
            args += ["--num-gpu-blocks-override", str(vq_blocks)]
            env["KVCOMP_HOST_MIRROR_GIB"] = str(a.host_gib or max(1.0, available_host_bytes() * 0.8 / 2**30))
        t_start = time.time()
        srv = Server(py, model_dir, work / f"server-{m.replace('+', '_')}.log", a.port, env, args)
        try:
            wait_ready("127.0.0.1", a.port, lambda: srv.proc.poll() is None, a.startup_timeout)
            startup = time.time() - t_start
            capm = LOG_RE.search(srv.text())
            run_load("127.0.0.1", a.port, model_dir, [prompts[loads[0]][0][1][:64]], 4)  # warm-up
            for n, p in loads:
                row = {"method": m, "prompt_tokens": p, "concurrency": n, "output_tokens": a.output_tokens}
                if budget.spent():
                    rec.add({**row, "skipped": budget.reason()})
                    bar.update(1)
                    continue
                try:
                    samples = prompts[(n, p)]
                    row["loadavg_1m_before"] = round(os.getloadavg()[0], 2)
                    streams = run_load("127.0.0.1", a.port, model_dir, [ids for _, ids in samples], a.output_tokens)
                    row["loadavg_1m_after"] = round(os.getloadavg()[0], 2)  # other work on the machine
                    row.update(metrics(streams))
                    row["accuracy"] = _accuracy(tok, [s for s, _ in samples], [s.token_ids for s in streams])
                    row["mean_prompt_tokens"] = sum(len(ids) for _, ids in samples) / n
                    row["kv_capacity_tokens"] = int(capm.group(1).replace(",", "")) if capm else None
                    row["peak_rss_bytes"] = srv.peak_rss
                    row["server_startup_s"] = round(startup, 1)
                    if a.hf_check and m != "stock":
                        cfg = None if m == "off" else build_vllm_method(m, model, tok, "smollm2-135m", opts)
                        hf = [generate(model, tok, sample_input_ids(tok, s), cfg, max_new_tokens=ANSWER_TOKENS).text
                              for s, _ in samples]
                        from kvcomp.eval.score import string_match_all

                        row["hf_accuracy"] = sum(string_match_all(x, s.answers)
                                                 for x, (s, _) in zip(hf, samples)) / n
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                if m == "stock" and "error" not in row:
                    stock[(n, p)] = row
                _with_stock(row, stock.get((n, p)))
                rec.add(row)
                print(_line(row), flush=True)
                bar.update(1)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).strip()[:300]}; log tail: {srv.text()[-600:]}"
            for n, p in loads:
                rec.add({"method": m, "prompt_tokens": p, "concurrency": n, "error": why})
                bar.update(1)
        finally:
            srv.stop()
    return 0


STOCK_FIELDS = ("ttft_s", "decode_tokens_per_s", "e2e_tokens_per_s", "accuracy", "kv_capacity_tokens",
                "peak_rss_bytes")


def _with_stock(row: dict, stock: dict | None) -> None:
    """Stock's values of the same load beside the method's, and the ratios."""
    if stock is None:
        return
    for f in STOCK_FIELDS:
        row[f"stock_{f}"] = stock.get(f)
    for f in ("decode_tokens_per_s", "e2e_tokens_per_s"):
        if row.get(f) and stock.get(f):
            row[f"{f.removesuffix('_tokens_per_s')}_vs_stock"] = round(row[f] / stock[f], 3)
    if row.get("ttft_s") and stock.get("ttft_s"):
        row["ttft_vs_stock"] = round(row["ttft_s"] / stock["ttft_s"], 3)


def _line(r: dict) -> str:
    if r.get("error"):
        return f"[serve] {r['method']} {r['concurrency']}x{r['prompt_tokens']}: error {r['error']}"
    dec = r.get("decode_tokens_per_s")
    return (f"[serve] {r['method']:>7} {r['concurrency']}x{r['prompt_tokens']}: TTFT {r['ttft_s']:.1f} s, decode "
            f"{'–' if dec is None else f'{dec:.1f}'} tok/s, e2e {r['e2e_tokens_per_s']:.1f} tok/s, "
            f"acc {r['accuracy']:.2f}, KV {r.get('kv_capacity_tokens')} tokens, RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
            + (f", x{r['decode_vs_stock']} decode vs stock" if r.get("decode_vs_stock") else ""))


def cmd_serve(a) -> int:
    from kvcomp.utils.machine import git_commit, machine_info

    from .runner import Budget, Recorder, progress

    _, loads, methods = _validate(a)
    if not a.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            a.port = sock.getsockname()[1]
    # a timeout's SIGTERM unwinds like Ctrl-C, so every started server is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    keep, runs = [], []
    if a.append and Path(a.out).exists():
        import json

        old = json.loads(Path(a.out).read_text())
        done = {(m, n, p) for m in methods for n, p in loads}
        keep = [r for r in old.get("results", []) if (r["method"], r["concurrency"], r["prompt_tokens"]) not in done]
        runs = old.get("runs", [])
    run = {"argv": sys.argv[1:], "commit": git_commit(), "loads": [f"{n}x{p}" for n, p in loads], "methods": methods}
    rec = Recorder(a.out, {"benchmark": "serve-vllm-cpu", "machine": machine_info(), "commit": git_commit(),
                           "argv": sys.argv[1:], "loads": sorted({*(f"{r['concurrency']}x{r['prompt_tokens']}"
                                                                    for r in keep), *run["loads"]}),
                           "runs": runs + [run]}, keep)
    with progress(len(methods) * len(loads), "bench serve") as bar:
        rc = run_serve(a, Budget(a.budget_s), rec, bar)
    print(f"[serve] wrote {a.out}")
    return rc
