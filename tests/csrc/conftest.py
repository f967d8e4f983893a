"""Fixtures of the native-kernel tests: `cpu_isa` runs a test once per CPU ISA the machine has."""

from __future__ import annotations

import pytest

from kvcomp._ext import has_ext

ISAS = ("generic", "avx2", "avx512")


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """The native CPU kernels switched to one ISA (kvcomp._C.set_cpu_isa) for the test, then back to
    the default; ISAs this CPU lacks are skipped (AVX-512 on the AVX2-only CI machine)."""
    if not has_ext():
        pytest.skip("native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")
    from kvcomp import _C

    if request.param not in _C.cpu_isas():
        pytest.skip(f"this CPU lacks {request.param} (has {_C.cpu_isas()})")
    _C.set_cpu_isa(request.param)
    assert _C.cpu_isa() == request.param
    yield request.param
    _C.set_cpu_isa("auto")
