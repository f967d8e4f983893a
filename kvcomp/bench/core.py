"""Benchmark core: problem definitions, data factories, timing helpers, the machine line.

Nothing here imports triton or ``kvcomp.kernels`` at import time (``--smoke`` sets ``TRITON_INTERPRET``
first). The per-method benches live in :mod:`kvcomp.bench.methods`; the runners in
:mod:`kvcomp.bench.cpu` (``kvcomp bench kernels`` on the CPU) and :mod:`kvcomp.bench.cuda` (CUDA sweep,
``bench/run.py --smoke``).

Byte model (all benches): ``nbytes`` counts the cache bytes the method must read at the floor — each
K/V row it attends read once per KV head for the whole GQA group, ThinK's narrow keys + full-width
values + the full-width ring, A²ATS's int16 codes once + the fp32 codebook once per sequence (the LUT
kernels score per sequence) + the K/V rows actually selected. Queries, outputs and block tables are
not counted (they are < 0.1% of the bytes at 8K).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import torch

LLAMA31_8B = dict(hq=32, hkv=8, d=128)  # Llama-3.1-8B attention shape

BYTE_MODEL = ("bytes = cache bytes the method must read at the floor, per layer and decode step: each K/V row "
              "attended once per KV head (shared by its GQA group); ThinK: narrow keys (as stored) of the older "
              "tokens + the full-width ring + all values; A2ATS: int16 codes once + the fp32 codebook once per "
              "sequence (the LUT is scored per sequence) + the K/V rows actually selected (union over the GQA "
              "group, from one run); DuoAttention: retrieval heads' full K/V + sink+recent rows per streaming "
              "head. Queries, outputs, LUTs and block tables are not counted.")


@dataclasses.dataclass
class Problem:
    """One benchmark problem. ``extra`` holds kernel-specific knobs (sink, window, block_size, ...)."""

    batch: int
    context: int
    hq: int = 32
    hkv: int = 8
    d: int = 128
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    extra: dict = dataclasses.field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.extra.get(key, default)

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"B{self.batch}-T{self.context}-H{self.hq}/{self.hkv}-D{self.d}-{dt}"


@dataclasses.dataclass
class Baseline:
    """A comparison implementation: ``make(problem) -> inputs`` then ``run(inputs)``; ``make`` raises
    (ImportError, RuntimeError, ...) when unavailable — the runner records the reason."""

    make: Callable[[Problem], Any]
    run: Callable[[Any], Any]


@dataclasses.dataclass
class Bench:
    """A registered kernel of the CUDA sweep (``bench/run.py``, ``kvcomp bench kernels`` on CUDA).

    make(problem) -> inputs; run(inputs) -> result (the timed call); nbytes(problem) -> bytes the
    kernel must move; ref(inputs) / output(inputs, result) -> comparable tensors for --smoke / --check;
    baselines: name -> Baseline (speedup = baseline median / kernel median); contexts, batches: default
    sweep; smoke: the tiny CPU-interpreter problem; defaults: merged into ``Problem.extra``.
    """

    name: str
    description: str
    make: Callable[[Problem], Any]
    run: Callable[[Any], Any]
    nbytes: Callable[[Problem], int]
    ref: Callable[[Any], torch.Tensor]
    output: Callable[[Any, Any], torch.Tensor] = lambda inputs, result: result
    baselines: dict[str, Baseline] = dataclasses.field(default_factory=dict)
    contexts: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
    batches: tuple[int, ...] = (1, 8, 64)
    smoke: Problem = dataclasses.field(default_factory=lambda: Problem(2, 40, 4, 2, 16, torch.float32, "cpu"))
    defaults: dict = dataclasses.field(default_factory=dict)
    ratio: float = 2e-2  # relative-RMS tolerance of --smoke / --check for 16-bit dtypes (1e-5 for fp32)


@dataclasses.dataclass
class CpuCase:
    """One row kind of the CPU sweep (``kvcomp bench kernels`` on the CPU), timed through ``kvcomp.ops``.

    make(problem) -> inputs; run(inputs) -> output (the timed decode step); nbytes(problem, inputs) ->
    bytes the method must read (module doc); ops: ``(stage label, native op name)`` of the kvcomp ops a
    step runs (which implementation each ran is observed, :func:`observed_impl`); label: the
    implementation of a case without kvcomp ops (e.g. ``torch.sdpa``); stages(inputs) -> name -> call:
    each stage of the step alone (timed as ``stage_ms``: where the time goes); kv_bytes(problem) ->
    rough size of the inputs (memory guard).
    """

    name: str
    description: str
    make: Callable[[Problem], Any]
    run: Callable[[Any], Any]
    nbytes: Callable[[Problem, Any], int]
    ops: tuple[tuple[str, str], ...] = ()
    label: str = ""
    stages: Callable[[Any], dict[str, Callable[[], Any]]] | None = None
    kv_bytes: Callable[[Problem], int] = lambda p: 2 * p.batch * p.hkv * p.context * p.d * p.elt


REGISTRY: dict[str, Bench] = {}
CPU_CASES: dict[str, CpuCase] = {}


def register(bench: Bench) -> Bench:
    """Add ``bench`` to the CUDA registry (names are unique)."""
    if bench.name in REGISTRY:
        raise ValueError(f"bench {bench.name!r} is already registered")
    REGISTRY[bench.name] = bench
    return bench


def register_cpu(case: CpuCase) -> CpuCase:
    """Add ``case`` to the CPU sweep (names are unique; sweep order = registration order)."""
    if case.name in CPU_CASES:
        raise ValueError(f"CPU case {case.name!r} is already registered")
    CPU_CASES[case.name] = case
    return case


# --------------------------------------------------------------------------------------------------
# Peak HBM bandwidth (GB/s, vendor figures) by device-name substring: the first match wins, so a name
# that contains another (GH200 contains H200) comes first.

PEAK_GBPS = [
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
]


def peak_gbps(device_name: str) -> float | None:
    """Peak HBM bandwidth of a GPU by name; ``None`` when unknown."""
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


# --------------------------------------------------------------------------------------------------
# Data factories (deterministic: one seeded generator per problem)


def generator(p: Problem, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=p.device).manual_seed(seed)


_PATTERN = (1 << 24) + 43  # elements of the random pattern large tensors repeat (not a power of two)


def randn(p: Problem, g: torch.Generator, *shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard-normal values; a tensor above 16M elements repeats one random pattern of ``_PATTERN``
    elements (filling GiBs with ``torch.randn`` would dominate a CPU sweep; timing does not depend on
    the values, and every byte is still a distinct memory location)."""
    dt = dtype or p.dtype
    n = math.prod(shape)
    if n <= _PATTERN:
        return torch.randn(*shape, device=p.device, dtype=dt, generator=g)
    src = torch.randn(_PATTERN, device=p.device, dtype=dt, generator=g)
    out = torch.empty(n, device=p.device, dtype=dt)
    for s in range(0, n, _PATTERN):
        out[s:s + _PATTERN].copy_(src[: min(_PATTERN, n - s)])
    return out.view(*shape)


def dense_qkv(p: Problem, q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``q [B, Hq, q_len, D]``, ``k, v [B, Hkv, T, D]``."""
    g = generator(p)
    return (randn(p, g, p.batch, p.hq, q_len, p.d), randn(p, g, p.batch, p.hkv, p.context, p.d),
            randn(p, g, p.batch, p.hkv, p.context, p.d))


def pages(p: Problem, g: torch.Generator) -> tuple[int, torch.Tensor]:
    """``(num_blocks, block_table [B, ceil(T / block_size)] int32)`` of randomly permuted blocks."""
    bs = p.get("block_size")
    per_seq = math.ceil(p.context / bs)
    nb = p.batch * per_seq
    perm = torch.randperm(nb, device=p.device, generator=g).to(torch.int32)
    return nb, perm.view(p.batch, per_seq)


def seq_lens(p: Problem) -> torch.Tensor:
    return torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device)


def topk_tokens(p: Problem) -> int:
    """Per-query-head top-K count of A²ATS (``VQRetrieval.topk_tokens``: a fraction < 1 or a count)."""
    t = p.get("topk")
    return int(t) if t >= 1 else max(1, int(round(t * p.context)))


# --------------------------------------------------------------------------------------------------
# Timing


def time_cpu(fn: Callable[[], Any], reps: int, warmup: int = 1, deadline: float | None = None) -> dict:
    """Median / p20 / p80 wall ms of ``reps`` calls (``time.perf_counter``) after ``warmup`` calls.

    With a ``deadline`` (a ``time.perf_counter`` value) timing stops after the first timed call past it;
    ``reps`` in the result is the number of calls timed.
    """
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        if deadline is not None and time.perf_counter() >= deadline:
            break
    q = torch.quantile(torch.tensor(ts, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2]), "reps": len(ts)}


def time_cuda(fn: Callable[[], Any], warmup: int, rep: int) -> dict:
    """``triton.testing.do_bench`` (cold L2) median / p20 / p80 ms of the whole Python call."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def time_cuda_graph(fn: Callable[[], Any], rep: int) -> dict:
    """Kernel time without Python / launch overhead: ``triton.testing.do_bench_cudagraph`` median /
    p20 / p80 ms of ``fn`` captured in a CUDA graph (raises when ``fn`` cannot be captured)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"graph_ms": med, "graph_p20_ms": p20, "graph_p80_ms": p80}


def observed_impl(fn: Callable[[], Any], ops: tuple[tuple[str, str], ...],
                  device: str = "cpu") -> tuple[str, str]:
    """``(ran, dispatch)``: which implementation each ``(label, native op)`` ran in one call of ``fn``
    (``native`` when the profiler saw ``kvcomp_C::<op>``; otherwise ``triton`` under the interpreter,
    else ``reference``), and what ``kvcomp.ops._dispatch.impl_for`` picks for it. They differ when an
    ops entry point does not dispatch to its native kernel yet."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no profiler_start/stop lines on stderr per call
    from torch.profiler import ProfilerActivity, profile

    from kvcomp.ops._dispatch import impl_for

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    seen = {e.name for e in prof.events()}
    t = torch.empty(0, device=device)
    try:
        fallback = "triton" if impl_for(t) == "triton" else "reference"
    except RuntimeError:  # KVCOMP_OPS=native: no op name here
        fallback = "reference"

    def dispatch(op):
        try:
            return impl_for(t, op)
        except RuntimeError as e:
            return f"error ({e})"

    def fmt(parts):
        return " ".join(f"{label}:{v}" if label else v for label, v in parts)

    return (fmt((label, "native" if f"kvcomp_C::{op}" in seen else fallback) for label, op in ops),
            fmt((label, dispatch(op)) for label, op in ops))


def read_bandwidth_gbps(gib: float = 1.0, reps: int = 5) -> float:
    """The machine's read bandwidth in GB/s: median of timed ``x.sum()`` over a ``gib`` GiB fp32 tensor
    (all intra-op threads). Measured in the same run as the kernels it normalises."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    t = time_cpu(lambda: x.sum(), reps=reps, warmup=1)
    nbytes = x.numel() * 4
    del x
    return nbytes / (t["ms"] * 1e-3) / 1e9


def machine(root: str | None = None) -> dict:
    """Machine line: device, CPU model, cores, torch, triton, commit, whether ``kvcomp._C`` is built,
    which native ops it registers and the ISA its CPU kernels run with, torch's intra-op threads and the
    1-minute load average."""
    from kvcomp._ext import cpu_isa, has_ext
    from kvcomp.utils.machine import git_commit, machine_info

    info = machine_info()
    info["commit"] = git_commit(root)
    info["kvcomp_C"] = has_ext()
    info["native_ops"] = sorted(n for n in ("duo_decode", "think_decode", "vq_lut", "vq_topk", "vq_encode",
                                            "sparse_attention") if has_ext() and hasattr(torch.ops.kvcomp_C, n))
    info["cpu_isa"] = cpu_isa()
    info["threads"] = torch.get_num_threads()
    info["loadavg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return info
