"""bench/vllm_cpu.py's row names (``<method>[@fp8]``) and the README table bench/readme_perf.py makes of them."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # readme_perf imports its sibling report modules
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_row_names():
    v = _load("vllm_cpu")
    assert v.split_row("think+vq@fp8") == ("think+vq", "fp8")
    assert v.split_row("all") == ("all", "")
    for bad in ("think+vq@fp16", "foo", "duo@"):
        with pytest.raises(SystemExit, match="unknown row"):
            v.split_row(bad)


def test_readme_table_rows():
    r = _load("readme_perf")
    rec = dict(kv_capacity_tokens=58197, capacity_ratio=None, max_concurrency=56.8, device_kv_bytes=2 << 20,
               host_mirror_bytes=1 << 30, tokens_per_s=1.5, vllm_accuracy=0.5, hf_accuracy=0.5, same_answers_as_hf=2)
    data = {"dtype": "float32", "kv_cache_memory_bytes": 64 << 20, "samples": 2, "context_len": 512, "max_tokens": 8,
            "machine": {"line": "cpu"}, "records": [{"method": "think+vq@fp8", **rec}, {"method": "stock", **rec}],
            "long_context_capacity": [{"method": "stock", "max_model_len": 8192, "kv_capacity_tokens": 11648,
                                       "capacity_ratio": 1.0}]}
    rows = [x for x in r.vllm_cpu_section(data) if x.startswith("| ") and "---" not in x][1:]
    assert rows[0] == ("| ThinK + A²ATS, fp8 KV | 58,197 | – | 56.8 | 2.0 | 1.0 | 1.5 | 0.500 | 0.500 | 2/2 | – | – |")
    assert rows[1].startswith("| stock vLLM (CPU_ATTN) | 58,197 |") and rows[1].endswith("| 11,648 | x1.0 |")
