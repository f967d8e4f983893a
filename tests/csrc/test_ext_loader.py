"""The optional native extension: lazy loading, clear errors when absent, CPU-only packaging."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import kvcomp._ext as ext

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=str(ROOT))


def test_import_kvcomp_does_not_load_native_or_triton():
    res = _py("import sys, kvcomp; a = ('kvcomp._C' in sys.modules, 'triton' in sys.modules)\n"
              "import kvcomp.ops.host_mirror; print(*a, 'kvcomp._C' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False"]


def test_load_ext_error_when_absent_is_clear():
    # sys.modules[name] = None makes `import kvcomp._C` raise ImportError, as when it was never built.
    res = _py("import os, sys; sys.modules['kvcomp._C'] = None\n"
              "import torch\n"
              "from kvcomp import _ext\n"
              "from kvcomp.ops import gather_tokens\n"
              "assert not _ext.has_ext()\n"
              "out = gather_tokens(torch.arange(6.).reshape(1, 6, 1), torch.tensor([[4, 1]]))\n"
              "assert out.flatten().tolist() == [4.0, 1.0], out\n"
              "try:\n"
              "    os.environ['KVCOMP_OPS'] = 'native'\n"
              "    gather_tokens(torch.zeros(1, 2, 1), torch.zeros(1, 1, dtype=torch.long))\n"
              "except RuntimeError as e:\n"
              "    print(e)\n"
              "_ext.load_ext()\n")
    assert res.returncode != 0
    assert "KVCOMP_OPS=native but kvcomp._C has no native 'gather_tokens' operator" in res.stdout
    assert "KVCOMP_BUILD_EXT=1 pip install --no-build-isolation -e ." in res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: kvcomp native extension not built: reinstall with KVCOMP_BUILD_EXT=1"), last
    assert "Import failed with: ModuleNotFoundError" in last  # the underlying reason is part of the message


def test_disable_env_forces_fallback():
    res = _py("from kvcomp import _ext; print(_ext.has_ext())", KVCOMP_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.skipif(not ext.has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")
def test_built_extension_matches_this_torch():
    mod = ext.load_ext()
    info = mod.build_info()
    assert torch.__version__.startswith(info["torch"]), (info, torch.__version__)
    assert mod.with_cuda() == info["cuda"]
    ops = ext.ext_ops()
    for name in ("gather_tokens", "scatter_tokens", "sparse_attention"):
        assert hasattr(ops, name)
    assert hasattr(ops, "gather_tokens_uva") == mod.with_cuda()


@pytest.mark.skipif(not ext.has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")
def test_native_ops_trace_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = ext.ext_ops()
    with FakeTensorMode():
        q = torch.empty(2, 8, 16, dtype=torch.bfloat16)
        k = torch.empty(2, 4, 50, 16, dtype=torch.bfloat16)
        v = torch.empty(2, 4, 50, 12, dtype=torch.bfloat16)
        idx = torch.empty(2, 4, 7, dtype=torch.int32)
        out = ops.sparse_attention(q, k, v, idx, torch.empty(2, 4, dtype=torch.int32), None, 0.25)
        assert out.shape == (2, 8, 12) and out.dtype == torch.bfloat16


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked sources")
def test_cpu_only_wheel_ships_kvcomp_and_its_kernels(tmp_path):
    """A wheel built without KVCOMP_BUILD_EXT is pure Python and contains both packages."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            "pyproject.toml", "setup.py", "README.md", "kvcomp", "kernels"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("kvcomp\n")
    env = {k: v for k, v in os.environ.items() if k != "KVCOMP_BUILD_EXT"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("kvcomp-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvcomp/_ext.py" in names and "kvcomp/ops/host_mirror.py" in names
    assert "kvcomp/kernels/__init__.py" in names and "kvcomp/kernels/duo_decode.py" in names
    assert not [n for n in names if n.startswith("kernels/")]  # no top-level package clashing with HF kernels
    assert "kvcomp/patterns_data/smollm2-135m/full_attention_heads.tsv" in names
    assert not [n for n in names if n.endswith((".so", ".pyd"))]


def test_dispatch_follows_the_environment(monkeypatch):
    """impl_for remembers its CPU choice per op and environment, and chooses again when either
    variable changes (tests and benchmarks switch them within one process)."""
    from kvcomp.ops._dispatch import has_native, impl_for

    t = torch.empty(1)
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    assert impl_for(t, "duo_decode") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KVCOMP_OPS")
    assert impl_for(t, "duo_decode") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert impl_for(t, "duo_decode") == ("native" if has_native("duo_decode") else "reference")
    monkeypatch.setenv("KVCOMP_OPS", "bogus")
    with pytest.raises(ValueError, match="KVCOMP_OPS must be one of"):
        impl_for(t, "duo_decode")
    monkeypatch.setenv("KVCOMP_OPS", "native")
    with pytest.raises(RuntimeError, match="no native 'no_such_op' operator"):
        impl_for(t, "no_such_op")
    with pytest.raises(RuntimeError, match="no native 'no_such_op' operator"):  # an error is never remembered
        impl_for(t, "no_such_op")
