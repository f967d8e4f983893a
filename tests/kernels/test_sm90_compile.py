"""Every Triton kernel compiles for sm_90 (H100/H200) with the GPU machine's Triton 3.6, without a GPU.

The GPU machine has torch 2.11 + Triton 3.6; this test runs the compile in a separate venv with
``triton==3.6.0`` (``scripts/setup_triton36.sh``; CI's ``scripts/test.sh`` creates it). Run as a
script inside that venv, this file calls the real launchers (``kvcomp.kernels.*``) on ``meta``
tensors with ``JITFunction.run`` replaced by an ahead-of-time compile for ``GPUTarget("cuda", 90, 32)``:
the signature, constexprs, tile sizes, ``num_warps`` and integer / alignment specialisations are
exactly the ones the runtime binder derives from the launch arguments (``meta`` stands in for a CUDA
device: the launchers take their GPU branches and 132 SMs). Each distinct compile prints one JSON line
with the grid of every launch, the shared memory (``metadata.shared``) and ``cuobjdump -res-usage``
of the cubin (``REG``, ``STACK``). The test checks, for every kernel in fp16/bf16/fp32 KV and head
dims 64/128/256:

- shared memory <= 227 KB (232448 bytes, the sm_90 opt-in limit per block);
- ``STACK:0``: no local-memory frame, i.e. no register spills (Triton's ``n_spills`` is only set when
  a driver loads the binary; ptxas puts spilled registers on the stack, so a zero stack means none);
- launch grids within CUDA's limits (axis 0 < 2^31, axes 1 and 2 <= 65535), including a prefill
  with ``B * Hq > 65535`` rows.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128, 256)
SHARED_LIMIT = 232448


def _venv_python() -> Path:
    return ROOT / os.environ.get("KVCOMP_TRITON36_VENV", ".venv-triton36") / "bin" / "python"


# ----------------------------------------------------------------------------------------------- driver
def _import_kernels():
    """``kvcomp.kernels`` from the checkout (the Triton 3.6 venv has no kvcomp installed)."""
    import importlib.util

    sys.path.insert(0, str(ROOT))
    import kvcomp  # noqa: F401  (the repository's package: only its __init__ runs)

    spec = importlib.util.spec_from_file_location("kvcomp.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvcomp.kernels"] = mod
    spec.loader.exec_module(mod)


def _install_aot(records: dict, launches: list):
    """Replace ``JITFunction.run`` by an sm_90 AOT compile of the launch's specialisation."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from kvcomp.kernels import _common as C

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tag = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, sig, cx, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        key = repr((self.fn.__qualname__, sig, cx, attrs, sorted(options.__dict__.items(), key=str)))
        grid = tuple(grid(bound) if callable(grid) else grid)
        launches.append({"kernel": self.fn.__name__, "grid": list(grid), **tag})
        if key in records:
            return None
        t0 = time.time()
        k = triton.compile(ASTSource(self, sig, cx, attrs), target=target, options=options.__dict__)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvcomp_sm90_{os.getpid()}.cubin"
        path.write_bytes(k.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
        path.unlink()
        usage = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), "")
        consts = {self.arg_names[p[0]]: v for p, v in cx.items() if isinstance(v, (int, bool))}
        records[key] = {"kernel": self.fn.__name__, "autotuned": "tuned" in tag, "tuned": [], **tag,
                        "shared": k.metadata.shared, "usage": usage,
                        "num_warps": options.num_warps, "num_stages": options.num_stages,
                        "constexprs": consts, "seconds": round(time.time() - t0, 2)}
        print(f"[sm90] {records[key]['kernel']} {tag} {records[key]['seconds']} s", file=sys.stderr, flush=True)
        return None

    JITFunction.run = run

    def tune_run(self, *args, **kwargs):  # an autotuned kernel: compile every config that fits the launch
        self.nargs = dict(zip(self.arg_names, args))
        tag["tuned"] = sorted({k for c in self.configs for k in c.kwargs})
        for cfg in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        del tag["tuned"]
        self.nargs = None

    Autotuner.run = tune_run

    # meta tensors stand in for a CUDA device: GPU tile choices, dots in the input dtype, an H100's SMs
    def dot_f32(device, dtype):
        return dtype == torch.float32

    def num_sms(device):
        return 132

    import kvcomp.kernels as K
    for name in ("cache_write", "duo_decode", "streaming_prefill", "think_decode", "splitk", "vq_encode", "vq_lut",
                 "vq_sparse_decode", "vq_topk"):
        __import__(f"kvcomp.kernels.{name}")
        mod = getattr(K, name)
        for attr, fn in (("dot_f32", dot_f32), ("num_sms", num_sms)):
            if hasattr(mod, attr):
                setattr(mod, attr, fn)
    C.dot_f32, C.num_sms = dot_f32, num_sms
    return tag


def _launch_all(dtype: str, d: int, tag: dict):
    """Every launcher once at a Llama-3.1-8B-like geometry (32 q / 8 KV heads, 16-token pages)."""
    import torch

    from kvcomp.kernels import cache_write as CW
    from kvcomp.kernels import duo_decode as DD
    from kvcomp.kernels import streaming_prefill as SP
    from kvcomp.kernels import think_decode as TD
    from kvcomp.ref.think import think_kept_dim
    from kvcomp.kernels import vq_encode as VE
    from kvcomp.kernels import vq_lut as VL
    from kvcomp.kernels import vq_sparse_decode as VS
    from kvcomp.kernels import vq_topk as VT

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tag.update(dtype=dtype, d=d)

    def f(*shape, dtype=dt):
        return torch.empty(*shape, device="meta", dtype=dtype)

    def i32(*shape):
        return f(*shape, dtype=torch.int32)

    b, hq, hkv, bs, mb, nc = 4, 32, 8, 16, 512, 4096
    nb = b * mb
    bt, sl, qsl = i32(b, mb), i32(b), i32(b + 1)
    k_new = f(b, hkv, d)
    CW.write_paged_kv(k_new, k_new, f(nb, bs, hkv, d), f(nb, bs, hkv, d), f(b, dtype=torch.int64))
    hm = i32(hkv, 2)
    ring = f(b + 3, 4, 64 + 1024 + 8, 2 * d)  # vLLM's ring pages: K/V side by side, read through the ring ids
    DD.duo_decode_attention(f(b, hq, d), f(nb, bs, 4, d), f(nb, bs, 4, d), bt, sl, ring[..., :d], ring[..., d:],
                            hm, sink=64, window=1024, ring_block=i32(b))
    DD.duo_decode_attention(f(1, hq, d), f(mb, bs, 4, d), f(mb, bs, 4, d), i32(1, mb), i32(1),
                            f(1, 4, 64 + 1024, d), f(1, 4, 64 + 1024, d), hm, sink=64, window=1024)
    q, kv = f(1, hq, 4096, d), f(1, hkv, 4096, d)
    SP.streaming_prefill(q, kv, kv, sink=64, window=1024)
    SP.streaming_prefill(q, kv, kv, sink=64, window=1024, q_pos=i32(4096), k_pos=i32(4096))
    # B * Hq > 65535 query rows (checks the grid; the same integer specialisations: compiles nothing new)
    SP.streaming_prefill(f(4096, hq, 16, d), f(4096, hkv, 16, d), f(4096, hkv, 16, d), sink=64, window=1024)
    dk = think_kept_dim(d, 0.4)  # as ThinK stores them: 48 / 80 / 160 of 64 / 128 / 256
    TD.triton_think_decode(f(b, hq, d), f(nb, bs, hkv, dk), i32(1, hkv, dk), f(b, hkv, 32, d),
                           f(nb, bs, hkv, d), bt, sl)
    # another batch size: the same compiled kernels (the test counts one variant per kernel)
    TD.triton_think_decode(f(13, hq, d), f(nb, bs, hkv, dk), i32(1, hkv, dk), f(13, hkv, 32, d),
                           f(nb, bs, hkv, d), i32(13, mb), i32(13))
    cb, wh = f(hkv, nc, d, dtype=torch.float32), f(hkv, d, d, dtype=torch.float32)
    VE.triton_vq_encode(f(1, hkv, 4096, d), cb, wh)
    codes = f(nb, bs, hkv, dtype=torch.int16)
    VE.triton_vq_encode_paged(k_new, cb, wh, codes, bt, sl, qsl)
    VE.triton_vq_encode_paged(f(13, hkv, d), cb, wh, codes, i32(13, mb), i32(13), i32(14))
    # a prefill of paged keys (enough token tiles: one codebook split, the first kernel writes the codes) and
    # a few dense keys (codebook splits + the merge / re-rank kernel): all four encode variants compile
    VE.triton_vq_encode_paged(f(4096, hkv, d), cb, wh, codes, bt, sl, qsl)
    VE.triton_vq_encode(f(1, hkv, 16, d), cb, wh)
    VL.triton_vq_lut(f(b, hq, d), cb)
    VL.triton_vq_lut(f(13, hq, d), cb)  # the LUT kernel loops over the batch's rows: same variant
    kmax = 4 * 256 + 8 + 64
    VS.triton_paged_sparse_attention(f(b, hq, d), f(nb, bs, hkv, d), f(nb, bs, hkv, d), bt, i32(b, hkv, kmax),
                                     i32(b, hkv))
    if dtype == "fp32" and d == 128:  # the top-K kernels read int16 codes and the fp32 lut only
        VT.triton_vq_topk(f(b, hq, nc, dtype=torch.float32).contiguous(), codes, bt, sl, topk=256, sink=8, local=64)


def main(argv):
    _import_kernels()
    records, launches = {}, []
    tag = _install_aot(records, launches)
    for item in argv:
        dtype, d = item.split(":")
        _launch_all(dtype, int(d), tag)
    for r in records.values():
        print("REC " + json.dumps(r))
    for ln in launches:
        print("LAUNCH " + json.dumps(ln))
    import resource

    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    print(f"CPU {cpu:.1f}")


# ------------------------------------------------------------------------------------------------- test
def test_every_kernel_compiles_for_sm90_with_triton36():
    """The full matrix with every autotune config the launchers' pruning keeps (two workers)."""
    import pytest  # not in the Triton 3.6 venv, where this file runs as the compile driver

    matrix = [(dt, d) for dt in DTYPES for d in HEAD_DIMS]
    py = _venv_python()
    if not py.exists():
        pytest.skip(f"no Triton 3.6 venv at {py.parent.parent}: run scripts/setup_triton36.sh (scripts/test.sh does)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    items = [f"{dt}:{d}" for dt, d in matrix]
    # two workers (CI has two cores); each compiles its half of the matrix
    halves = [items[0::2], items[1::2]]
    procs = [subprocess.Popen([str(py), __file__, *h], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for h in halves]
    outs = [p.communicate(timeout=1800) for p in procs]  # a shared, loaded machine; idle: see the docstring
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    recs = [json.loads(ln[4:]) for out, _ in outs for ln in out.splitlines() if ln.startswith("REC ")]
    launches = [json.loads(ln[7:]) for out, _ in outs for ln in out.splitlines() if ln.startswith("LAUNCH ")]
    names = {r["kernel"] for r in recs}
    assert names >= {"_paged_write_kernel", "_duo_split_kernel", "_duo_reduce_kernel",
                     "_streaming_prefill_kernel", "_think_decode_kernel", "_combine_kernel",
                     "_vq_encode_kernel", "_vq_rerank_kernel", "_vq_lut_kernel", "_sparse_decode_kernel",
                     "_radix_kernel", "_threshold_kernel", "_select_kernel", "_pad_kernel"}, names
    assert {(r["dtype"], r["d"]) for r in recs} == set(matrix)
    cpu = sum(float(ln[4:]) for out, _ in outs for ln in out.splitlines() if ln.startswith("CPU "))
    print(f"sm_90 compile: {len(recs)} kernels, {cpu:.0f} s CPU in two workers")
    # batch-size independence: the launches at batch 1 / 4 / 13 compiled one variant, apart from the
    # autotuned parameters (vq_encode: dense and paged, each with one codebook split or several; its re-rank
    # kernel: dense and paged)
    per, tuned, counts = {}, {}, {}
    for r in recs:
        fixed = {k: v for k, v in r["constexprs"].items() if k not in r["tuned"]}
        per.setdefault((r["kernel"], r["dtype"], r["d"]), set()).add(json.dumps(fixed, sort_keys=True))
        tuned.setdefault(r["kernel"], set()).add(r["autotuned"])
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
    print("sm_90 variants per kernel:", json.dumps(counts, sort_keys=True))
    for name, n in (("_duo_split_kernel", 1), ("_duo_reduce_kernel", 1), ("_paged_write_kernel", 1),
                    ("_combine_kernel", 1), ("_vq_encode_kernel", 4),
                    ("_vq_rerank_kernel", 2), ("_vq_lut_kernel", 1)):
        for dt, d in matrix:
            assert len(per[(name, dt, d)]) == n, f"{name} {dt} d={d}: {per[(name, dt, d)]}"
    # compiled through their autotuner: every config the launcher's pruning keeps
    for name in ("_paged_write_kernel", "_duo_split_kernel", "_duo_reduce_kernel", "_streaming_prefill_kernel",
                 "_combine_kernel", "_vq_encode_kernel", "_vq_lut_kernel", "_sparse_decode_kernel",
                 "_radix_kernel", "_select_kernel"):
        assert tuned[name] == {True}, name
    # autotuned kernels: one variant per config, whatever the batch size (a batch-dependent specialisation
    # would compile a config twice)
    for dt, d in matrix:
        cfgs = [(json.dumps(r["constexprs"], sort_keys=True), r["num_warps"], r["num_stages"]) for r in recs
                if r["kernel"] == "_think_decode_kernel" and (r["dtype"], r["d"]) == (dt, d)]
        assert cfgs and len(cfgs) == len(set(cfgs)), f"_think_decode_kernel {dt} d={d}: {cfgs}"
    bad = []
    for r in recs:
        what = f"{r['kernel']} {r['dtype']} d={r['d']} {r['constexprs']} warps={r['num_warps']}"
        if r["shared"] > SHARED_LIMIT:
            bad.append(f"{what}: {r['shared']} bytes of shared memory > {SHARED_LIMIT}")
        if "STACK:0 " not in r["usage"] + " ":
            bad.append(f"{what}: spills registers ({r['usage']})")
    for ln in launches:
        g = ln["grid"] + [1] * (3 - len(ln["grid"]))
        if not (g[0] < 2**31 and g[1] <= 65535 and g[2] <= 65535):
            bad.append(f"{ln['kernel']} {ln['dtype']} d={ln['d']}: grid {ln['grid']} exceeds CUDA's limits")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    main(sys.argv[1:])
