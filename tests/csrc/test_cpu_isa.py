"""The extension-wide CPU ISA switch (csrc/cpu_isa.h): kvcomp._C.cpu_isa / cpu_isas / set_cpu_isa, the
KVCOMP_CPU_ISA override, and its report through kvcomp._ext.cpu_isa and `kvcomp info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcomp._ext import has_ext

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def _best() -> str:
    from kvcomp import _C

    return _C.cpu_isas()[-1]


def test_default_is_the_best_the_cpu_has():
    from kvcomp import _C, _ext

    isas = _C.cpu_isas()
    assert isas[0] == "generic" and isas == ["generic", "avx2", "avx512"][: len(isas)]
    if os.environ.get("KVCOMP_CPU_ISA") is None:
        assert _C.cpu_isa() == isas[-1] == _ext.cpu_isa()


def test_set_cpu_isa_and_back():
    from kvcomp import _C

    default = _C.cpu_isa()
    try:
        _C.set_cpu_isa("generic")
        assert _C.cpu_isa() == "generic"
    finally:
        _C.set_cpu_isa("auto")
    assert _C.cpu_isa() == default


def test_set_cpu_isa_rejects_unknown_and_unsupported():
    from kvcomp import _C

    with pytest.raises(ValueError, match="must be one of generic, avx2, avx512, auto; got 'sse4'"):
        _C.set_cpu_isa("sse4")
    missing = [i for i in ("avx2", "avx512") if i not in _C.cpu_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match=f"'{isa}' is not supported by this CPU"):
            _C.set_cpu_isa(isa)
    assert _C.cpu_isa() == _best() or "KVCOMP_CPU_ISA" in os.environ  # a failed set changes nothing


def test_env_lowers_the_isa():
    res = _py("from kvcomp import _ext; print(_ext.cpu_isa())", KVCOMP_CPU_ISA="generic")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "generic"


def test_env_unknown_name_is_a_value_error_at_use():
    code = ("import torch, kvcomp._C as C\n"
            "try:\n    C.cpu_isa()\nexcept ValueError as e:\n    print('ValueError:', e)\n"
            "q = torch.randn(1, 1, 8)\n"
            "try:\n"
            "    torch.ops.kvcomp_C.duo_decode(q, torch.randn(1, 16, 1, 8), torch.randn(1, 16, 1, 8),\n"
            "        torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.randn(1, 0, 1, 8),\n"
            "        torch.randn(1, 0, 1, 8), torch.tensor([[0, 0]]), 0, 1, 1.0, 0)\n"
            "except ValueError as e:\n    print('op ValueError:', str(e).splitlines()[0])\n")
    res = _py(code, KVCOMP_CPU_ISA="avx3")
    assert res.returncode == 0, res.stderr
    assert "ValueError: KVCOMP_CPU_ISA=avx3 is not one of generic, avx2, avx512" in res.stdout
    assert "op ValueError: KVCOMP_CPU_ISA=avx3 is not one of generic, avx2, avx512" in res.stdout


def test_env_above_the_cpu_falls_back_with_a_warning():
    res = _py("import kvcomp._C as C; print(C.cpu_isa(), C.cpu_isas()[-1])", KVCOMP_CPU_ISA="avx512")
    assert res.returncode == 0, res.stderr
    got, best = res.stdout.split()
    assert got == best
    warned = f"KVCOMP_CPU_ISA=avx512 but this CPU supports at most {best}: running {best} kernels" in res.stderr
    assert warned == (best != "avx512")  # the AVX2-only CI machine: warned (c10 warning on stderr) and clamped


def test_kvcomp_info_reports_the_isa():
    res = _py("from kvcomp.cli import main; main(['info'])", KVCOMP_CPU_ISA="generic")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["native_cpu_isa"] == "generic"
