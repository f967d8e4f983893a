"""Kernel benchmark registry: what to run, on which inputs, how many bytes it must move, what to compare.

One :class:`Bench` per public kernel. ``bench/run.py`` is the single runner (timing on CUDA, ``--smoke``
correctness on the CPU interpreter). Adding a kernel = writing one ``make`` / ``run`` / ``nbytes`` trio and
calling :func:`register` (see bench/README.md). Nothing here imports triton or ``kernels`` at import time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

LLAMA31_8B = dict(hq=32, hkv=8, d=128)  # Llama-3.1-8B attention shape


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
    """A registered kernel.

    make(problem) -> inputs (any object, usually a dict of tensors on ``problem.device``)
    run(inputs) -> result: the kernel call that is timed
    nbytes(problem) -> bytes the kernel must read + write (for GB/s and % of HBM bandwidth)
    ref(inputs) -> tensor, output(inputs, result) -> tensor: reference and comparable kernel output
        (for in-place kernels ``output`` returns the written buffer); used by --smoke / --check
    baselines: name -> Baseline (full-attention comparisons; speedup = baseline median / kernel median)
    contexts, batches: default sweep; smoke: the tiny CPU-interpreter problem
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
    defaults: dict = dataclasses.field(default_factory=dict)  # merged into Problem.extra
    ratio: float = 2e-2  # relative-RMS tolerance of --smoke / --check for 16-bit dtypes (1e-5 for fp32)


REGISTRY: dict[str, Bench] = {}


def register(bench: Bench) -> Bench:
    """Add ``bench`` to the registry (names are unique)."""
    if bench.name in REGISTRY:
        raise ValueError(f"bench {bench.name!r} is already registered")
    REGISTRY[bench.name] = bench
    return bench


# --------------------------------------------------------------------------------------------------
# Peak HBM bandwidth (GB/s, vendor figures) by device-name substring, most specific first.

PEAK_GBPS = [
    ("H200", 4800.0),
    ("GH200", 4000.0),
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
# Shared full-attention baselines (dense KV [B, Hkv, T, D]); reusable by other kernels' entries.


def _dense(p: Problem, q_len: int):
    g = torch.Generator(device=p.device).manual_seed(0)
    q = torch.randn(p.batch, p.hq, q_len, p.d, device=p.device, dtype=p.dtype, generator=g)
    k = torch.randn(p.batch, p.hkv, p.context, p.d, device=p.device, dtype=p.dtype, generator=g)
    v = torch.randn(p.batch, p.hkv, p.context, p.d, device=p.device, dtype=p.dtype, generator=g)
    return q, k, v


def sdpa_flash_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """torch SDPA restricted to the flash backend, GQA via ``enable_gqa``, causal when q_len > 1."""

    def run(x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = x
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1,
                                                                    enable_gqa=True)

    def make(p):
        x = _dense(p, q_len(p))
        run(x)  # raises here (recorded as unavailable) if the backend rejects the shape
        return x

    return Baseline(make, run)


def flex_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """``torch.compile``d FlexAttention (causal block mask for prefill, none for decode)."""

    def make(p):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = _dense(p, q_len(p))
        fn = torch.compile(flex_attention, dynamic=False)
        mask = None
        if q.shape[2] > 1:
            off = k.shape[2] - q.shape[2]
            mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, q.shape[2], k.shape[2],
                                     device=p.device)
        x = (fn, q, k, v, mask)
        _flex_run(x)
        return x

    return Baseline(make, _flex_run)


def _flex_run(x):
    fn, q, k, v, mask = x
    return fn(q, k, v, block_mask=mask, enable_gqa=True)


def flash_attn_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """``flash_attn`` (``flash_attn_with_kvcache`` for decode, ``flash_attn_func`` causal for prefill)."""

    def make(p):
        import flash_attn  # noqa: F401  (ImportError -> unavailable)

        q, k, v = _dense(p, q_len(p))
        x = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        _fa_run(x)
        return x

    return Baseline(make, _fa_run)


def _fa_run(x):
    import flash_attn

    q, k, v = x
    if q.shape[1] == 1:
        return flash_attn.flash_attn_with_kvcache(q, k, v)
    return flash_attn.flash_attn_func(q, k, v, causal=True)


def full_attention_baselines(q_len: Callable[[Problem], int]) -> dict[str, Baseline]:
    """The standard comparison set: SDPA flash backend, FlexAttention, flash_attn (when installed)."""
    return {"sdpa_flash": sdpa_flash_baseline(q_len), "flex": flex_baseline(q_len),
            "flash_attn": flash_attn_baseline(q_len)}


def _decode_len(p: Problem) -> int:
    return 1


def _prefill_len(p: Problem) -> int:
    return p.get("q_len") or p.context


# --------------------------------------------------------------------------------------------------
# DuoAttention entries (kernels/duo_decode.py, kernels/streaming_prefill.py, kernels/cache_write.py)


def _split_heads(p: Problem) -> tuple[int, int]:
    n_str = int(round(p.hkv * p.get("streaming_frac", 0.5)))
    return p.hkv - n_str, n_str


def make_duo_decode(p: Problem) -> dict:
    """Head-split cache at ``p.context`` tokens per sequence: retrieval heads paged (permuted blocks),
    streaming heads in full rings; the first ``n_ret`` KV heads are retrieval heads."""
    from kvcomp.ref.duo import duo_head_map

    bs, sink, window = p.get("block_size"), p.get("sink"), p.get("window")
    n_ret, n_str = _split_heads(p)
    g = torch.Generator(device=p.device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=p.device, dtype=p.dtype, generator=g)  # noqa: E731
    per_seq = math.ceil(p.context / bs)
    nb = p.batch * per_seq
    perm = torch.randperm(nb, device=p.device, generator=g).to(torch.int32)
    streaming = torch.tensor([False] * n_ret + [True] * n_str)
    return dict(q=rnd(p.batch, p.hq, p.d), k_cache=rnd(nb, bs, n_ret, p.d), v_cache=rnd(nb, bs, n_ret, p.d),
                block_table=perm.view(p.batch, per_seq),
                seq_lens=torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device),
                k_stream=rnd(p.batch, n_str, sink + window, p.d), v_stream=rnd(p.batch, n_str, sink + window, p.d),
                head_map=duo_head_map(streaming).to(p.device), sink=sink, window=window)


def _duo_args(x):
    return (x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"], x["k_stream"], x["v_stream"],
            x["head_map"])


def run_duo_decode(x):
    from kvcomp.ops.duo import triton_duo_decode_attention

    return triton_duo_decode_attention(*_duo_args(x), sink=x["sink"], window=x["window"])


def ref_duo_decode(x):
    from kvcomp.ref.duo import duo_decode_attention

    return duo_decode_attention(*_duo_args(x), sink=x["sink"], window=x["window"])


def bytes_duo_decode(p: Problem) -> int:
    n_ret, n_str = _split_heads(p)
    kv_tokens = n_ret * p.context + n_str * min(p.context, p.get("sink") + p.get("window"))
    return p.batch * (2 * kv_tokens * p.d + 2 * p.hq * p.d) * p.elt


def _paged_full(p: Problem) -> dict:
    return make_duo_decode(dataclasses.replace(p, extra={**p.extra, "streaming_frac": 0.0}))


register(Bench(
    name="duo_decode",
    description="DuoAttention head-split paged decode (split-K), half the KV heads streaming",
    make=make_duo_decode, run=run_duo_decode, nbytes=bytes_duo_decode, ref=ref_duo_decode,
    baselines={**full_attention_baselines(_decode_len),
               "triton_paged_full": Baseline(_paged_full, run_duo_decode)},
    defaults=dict(block_size=16, sink=64, window=256, streaming_frac=0.5),
    smoke=Problem(2, 37, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, sink=4, window=8)),
))


def make_streaming_prefill(p: Problem) -> dict:
    q, k, v = _dense(p, _prefill_len(p))
    return dict(q=q, k=k, v=v, sink=p.get("sink"), window=p.get("window"))


def run_streaming_prefill(x):
    from kvcomp.ops.prefill import triton_streaming_attention

    return triton_streaming_attention(x["q"], x["k"], x["v"], sink=x["sink"], window=x["window"])


def ref_streaming_prefill(x):
    from kvcomp.ref import streaming_attention

    return streaming_attention(x["q"], x["k"], x["v"], sink=x["sink"], window=x["window"])


def bytes_streaming_prefill(p: Problem) -> int:
    tq = _prefill_len(p)
    visible = min(p.context, p.get("sink") + p.get("window"))  # keys a query tile must read (no reuse)
    return p.batch * p.elt * p.d * (2 * p.hq * tq + 2 * p.hkv * min(p.context, tq + visible))


register(Bench(
    name="streaming_prefill",
    description="sink+window block-sparse causal prefill (all heads streaming) vs dense causal prefill",
    make=make_streaming_prefill, run=run_streaming_prefill, nbytes=bytes_streaming_prefill,
    ref=ref_streaming_prefill, baselines=full_attention_baselines(_prefill_len),
    contexts=(4096, 16384, 65536, 131072), batches=(1,),
    defaults=dict(sink=64, window=256),
    smoke=Problem(1, 45, 4, 2, 16, torch.float32, "cpu", dict(sink=4, window=8)),
))


def make_write_paged(p: Problem) -> dict:
    """Decode-style write: one new token per sequence into a cache sized for ``p.context`` tokens each."""
    bs = p.get("block_size")
    g = torch.Generator(device=p.device).manual_seed(0)
    per_seq = math.ceil(p.context / bs)
    nb = p.batch * per_seq
    k_cache = torch.zeros(nb, bs, p.hkv, p.d, device=p.device, dtype=p.dtype)
    blocks = torch.randperm(nb, device=p.device, generator=g)[: p.batch]
    slots = blocks * bs + (p.context - 1) % bs
    key = torch.randn(p.batch, p.hkv, p.d, device=p.device, dtype=p.dtype, generator=g)
    return dict(key=key, value=key.clone(), k_cache=k_cache, v_cache=k_cache.clone(), slot_mapping=slots)


def run_write_paged(x):
    from kvcomp.ops.cache_write import triton_write_paged_kv

    triton_write_paged_kv(x["key"], x["value"], x["k_cache"], x["v_cache"], x["slot_mapping"])


def ref_write_paged(x):
    from kvcomp.ref.cache_write import write_paged_kv

    kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
    write_paged_kv(x["key"], x["value"], kc, vc, x["slot_mapping"])
    return torch.stack([kc, vc])


register(Bench(
    name="write_paged_kv",
    description="paged KV write by slot mapping (one decode token per sequence)",
    make=make_write_paged, run=run_write_paged, ref=ref_write_paged,
    output=lambda x, _: torch.stack([x["k_cache"], x["v_cache"]]),
    nbytes=lambda p: 4 * p.batch * p.hkv * p.d * p.elt + 8 * p.batch,
    contexts=(4096,), batches=(1, 8, 64),
    defaults=dict(block_size=16),
    smoke=Problem(3, 20, 4, 2, 16, torch.float32, "cpu", dict(block_size=8)),
))


def make_write_streaming(p: Problem) -> dict:
    """Streaming-ring write of ``q_len`` (default 1) new tokens per sequence ending at ``p.context``."""
    sink, window = p.get("sink"), p.get("window")
    n = p.get("q_len") or 1
    g = torch.Generator(device=p.device).manual_seed(0)
    key = torch.randn(p.batch * n, p.hkv, p.d, device=p.device, dtype=p.dtype, generator=g)
    buf = torch.zeros(p.batch, p.hkv, sink + window, p.d, device=p.device, dtype=p.dtype)
    qsl = torch.arange(0, p.batch * n + 1, n, dtype=torch.int32, device=p.device)
    return dict(key=key, value=key.clone(), k_buf=buf, v_buf=buf.clone(), query_start_loc=qsl,
                seq_lens=torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device), sink=sink)


def _ws_args(x):
    return x["key"], x["value"], x["k_buf"], x["v_buf"], x["query_start_loc"], x["seq_lens"]


def run_write_streaming(x):
    from kvcomp.ops.cache_write import triton_write_streaming_kv

    triton_write_streaming_kv(*_ws_args(x), sink=x["sink"])


def ref_write_streaming(x):
    from kvcomp.ref.cache_write import write_streaming_kv

    kb, vb = x["k_buf"].clone(), x["v_buf"].clone()
    a = _ws_args(x)
    write_streaming_kv(a[0], a[1], kb, vb, a[4], a[5], sink=x["sink"])
    return torch.stack([kb, vb])


def bytes_write_streaming(p: Problem) -> int:
    landed = min(p.get("q_len") or 1, p.get("window")) + 0
    return 4 * p.batch * landed * p.hkv * p.d * p.elt


register(Bench(
    name="write_streaming_kv",
    description="streaming ring write (one decode token per sequence, all KV heads streaming)",
    make=make_write_streaming, run=run_write_streaming, ref=ref_write_streaming,
    output=lambda x, _: torch.stack([x["k_buf"], x["v_buf"]]),
    nbytes=bytes_write_streaming, contexts=(4096,), batches=(1, 8, 64),
    defaults=dict(sink=64, window=256),
    smoke=Problem(2, 30, 4, 2, 16, torch.float32, "cpu", dict(sink=4, window=8, q_len=12)),
))


# --------------------------------------------------------------------------------------------------
# ThinK and A²ATS entries (kernels/think_*.py, kernels/vq_*.py; ops in kvcomp/ops/think.py, vq.py)


def _pages(p: Problem, g: torch.Generator) -> tuple[int, torch.Tensor]:
    bs = p.get("block_size")
    per_seq = math.ceil(p.context / bs)
    nb = p.batch * per_seq
    perm = torch.randperm(nb, device=p.device, generator=g).to(torch.int32)
    return nb, perm.view(p.batch, per_seq)


def _think_dk(p: Problem) -> int:
    return p.d - math.floor(p.get("prune_ratio") * p.d)


def make_think_decode(p: Problem) -> dict:
    """ThinK cache at ``p.context`` tokens per sequence: pruned key pages (``D_keep`` channels, one static
    channel set per layer), full-width ring of ``window`` tokens, value pages; permuted blocks."""
    g = torch.Generator(device=p.device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=p.device, dtype=p.dtype, generator=g)  # noqa: E731
    nb, bt = _pages(p, g)
    bs, w, dk = p.get("block_size"), p.get("window"), _think_dk(p)
    chan = torch.stack([torch.randperm(p.d, device=p.device, generator=g)[:dk].sort().values
                        for _ in range(p.hkv)]).view(1, p.hkv, dk)
    return dict(q=rnd(p.batch, p.hq, p.d), kp_cache=rnd(nb, bs, p.hkv, dk), chan_idx=chan,
                k_recent=rnd(p.batch, p.hkv, w, p.d), v_cache=rnd(nb, bs, p.hkv, p.d), block_table=bt,
                seq_lens=torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device))


_THINK_KEYS = ("q", "kp_cache", "chan_idx", "k_recent", "v_cache", "block_table", "seq_lens")


def run_think_decode(x):
    from kvcomp.ops.think import think_decode

    return think_decode(*(x[k] for k in _THINK_KEYS))


def ref_think_decode(x):
    from kvcomp.ref.think_paged import paged_pruned_key_attention

    return paged_pruned_key_attention(*(x[k] for k in _THINK_KEYS))


def bytes_think_decode(p: Problem) -> int:
    w = min(p.context, p.get("window"))
    tp = p.context - w
    return p.batch * p.elt * (p.hkv * (tp * _think_dk(p) + w * p.d + p.context * p.d) + 2 * p.hq * p.d)


register(Bench(
    name="think_decode",
    description="ThinK pruned-key paged decode (split-K): keys with D_keep channels + full-width recent ring",
    make=make_think_decode, run=run_think_decode, nbytes=bytes_think_decode, ref=ref_think_decode,
    baselines={**full_attention_baselines(_decode_len),
               "think_unpruned": Baseline(
                   lambda p: make_think_decode(dataclasses.replace(p, extra={**p.extra, "prune_ratio": 0.0})),
                   run_think_decode)},
    defaults=dict(block_size=16, prune_ratio=0.4, window=32),
    smoke=Problem(2, 41, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, window=6)),
))


def make_think_write(p: Problem) -> dict:
    """Decode-style ThinK key write: one new token per sequence at position ``p.context - 1``."""
    g = torch.Generator(device=p.device).manual_seed(0)
    nb, bt = _pages(p, g)
    bs, w, dk = p.get("block_size"), p.get("window"), _think_dk(p)
    chan = torch.stack([torch.randperm(p.d, device=p.device, generator=g)[:dk].sort().values
                        for _ in range(p.hkv)]).view(1, p.hkv, dk)
    return dict(k_new=torch.randn(p.batch, p.hkv, p.d, device=p.device, dtype=p.dtype, generator=g), chan_idx=chan,
                kp_cache=torch.zeros(nb, bs, p.hkv, dk, device=p.device, dtype=p.dtype),
                k_recent=torch.zeros(p.batch, p.hkv, w, p.d, device=p.device, dtype=p.dtype), block_table=bt,
                seq_lens=torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device),
                query_start_loc=torch.arange(p.batch + 1, dtype=torch.int32, device=p.device))


_THINK_W_KEYS = ("k_new", "chan_idx", "kp_cache", "k_recent", "block_table", "seq_lens", "query_start_loc")


def run_think_write(x):
    from kvcomp.ops.think import pack_pruned_keys_paged

    pack_pruned_keys_paged(*(x[k] for k in _THINK_W_KEYS))


def ref_think_write(x):
    from kvcomp.ref.compressed_write import pack_pruned_keys_paged

    a = [x[k] for k in _THINK_W_KEYS]
    kp, kr = pack_pruned_keys_paged(a[0], a[1], a[2].clone(), a[3].clone(), *a[4:])
    return torch.cat([kp.flatten(), kr.flatten()])


register(Bench(
    name="think_write",
    description="ThinK cache write: kept channels into the narrow pages + full-width ring (one decode token)",
    make=make_think_write, run=run_think_write, ref=ref_think_write,
    output=lambda x, _: torch.cat([x["kp_cache"].flatten(), x["k_recent"].flatten()]),
    nbytes=lambda p: p.batch * p.hkv * p.elt * (2 * p.d + _think_dk(p)),
    contexts=(4096,), batches=(1, 8, 64),
    defaults=dict(block_size=16, prune_ratio=0.4, window=32),
    smoke=Problem(3, 20, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, window=4)),
))


def _vq_topk_int(p: Problem) -> int:
    t = p.get("topk")
    return max(1, int(t * p.context)) if isinstance(t, float) else int(t)


def make_vq_decode(p: Problem) -> dict:
    """A²ATS decode state: paged K/V and int16 codes (permuted blocks), a ``n_codes`` codebook per KV head."""
    g = torch.Generator(device=p.device).manual_seed(0)
    rnd = lambda *s, dt=p.dtype: torch.randn(*s, device=p.device, dtype=dt, generator=g)  # noqa: E731
    nb, bt = _pages(p, g)
    bs, nc = p.get("block_size"), p.get("n_codes")
    return dict(q=rnd(p.batch, p.hq, p.d), q_wrope=rnd(p.batch, p.hq, p.d),
                codebook=rnd(p.hkv, nc, p.d, dt=torch.float32),
                code_cache=torch.randint(0, nc, (nb, bs, p.hkv), device=p.device, dtype=torch.int16, generator=g),
                k_cache=rnd(nb, bs, p.hkv, p.d), v_cache=rnd(nb, bs, p.hkv, p.d), block_table=bt,
                seq_lens=torch.full((p.batch,), p.context, dtype=torch.int32, device=p.device),
                topk=_vq_topk_int(p), sink=p.get("sink"), local=p.get("local"))


def run_vq_decode(x):
    from kvcomp.ops.vq import sparse_decode, vq_lut, vq_topk

    lut = vq_lut(x["q_wrope"], x["codebook"])
    idx, count = vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                         local=x["local"])
    return sparse_decode(x["q"], x["k_cache"], x["v_cache"], x["block_table"], idx, count)


def ref_vq_decode(x):
    from kvcomp.ref import paged_sparse_attention, vq_lut
    from kvcomp.ref.think_paged import paged_vq_topk

    lut = vq_lut(x["q_wrope"], x["codebook"])
    idx, count = paged_vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"],
                               sink=x["sink"], local=x["local"])
    return paged_sparse_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], idx, count)


def bytes_vq_decode(p: Problem) -> int:
    """Codes read by the 4 selection passes + LUT + the selected tokens' K and V (upper bound)."""
    sel = min(p.context, (p.hq // p.hkv) * _vq_topk_int(p) + p.get("sink") + p.get("local"))
    lut = p.batch * p.hq * p.get("n_codes") * 4 * 2 + p.hkv * p.get("n_codes") * p.d * 4
    return (p.batch * p.hkv * (4 * 2 * p.context + 2 * sel * p.d * p.elt) + lut
            + 2 * p.batch * p.hq * p.d * p.elt)


register(Bench(
    name="vq_decode",
    description="A2ATS decode: LUT + exact per-KV-head top-K over int16 codes + sparse paged attention",
    make=make_vq_decode, run=run_vq_decode, nbytes=bytes_vq_decode, ref=ref_vq_decode,
    baselines=full_attention_baselines(_decode_len),
    defaults=dict(block_size=16, n_codes=4096, topk=0.03, sink=8, local=64),
    smoke=Problem(2, 45, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, n_codes=24, topk=5, sink=2, local=4)),
))


def run_vq_topk_only(x):
    from kvcomp.ops.vq import vq_topk

    return vq_topk(x["lut"], x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                   local=x["local"])[1]


def _make_vq_topk(p: Problem) -> dict:
    x = make_vq_decode(p)
    g = torch.Generator(device=p.device).manual_seed(1)
    x["lut"] = torch.randn(p.batch, p.hq, p.get("n_codes"), device=p.device, generator=g)
    return x


def _ref_vq_topk_count(x):
    from kvcomp.ref.think_paged import paged_vq_topk

    return paged_vq_topk(x["lut"], x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"],
                         sink=x["sink"], local=x["local"])[1].float()


register(Bench(
    name="vq_topk",
    description="A2ATS exact top-K selection alone (histogram threshold + 3 chunked passes), output = counts",
    make=_make_vq_topk, run=run_vq_topk_only, ref=_ref_vq_topk_count,
    output=lambda x, count: count.float(),
    nbytes=lambda p: p.batch * p.hkv * 4 * 2 * p.context + p.batch * p.hq * p.get("n_codes") * 4 * 2,
    defaults=dict(block_size=16, n_codes=4096, topk=0.03, sink=8, local=64),
    smoke=Problem(2, 45, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, n_codes=24, topk=5, sink=2, local=4)),
))
