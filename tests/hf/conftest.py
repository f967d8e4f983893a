"""The HF path's model-level tests run kvcomp's ops as a user's CPU process does (the native kernels,
or the references without the extension), not the Triton interpreter that the suite enables for the
kernel tests; ``test_ops_route.py`` runs the same path through the Triton kernels."""

import pytest


@pytest.fixture(autouse=True)
def _cpu_ops(monkeypatch, request):
    if "triton_route" not in request.keywords:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
