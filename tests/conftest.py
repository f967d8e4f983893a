import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    slow = os.environ.get("KVCOMP_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA; runs on the lent GPU machine"))
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow; set KVCOMP_SLOW=1 to run"))


@pytest.fixture
def nan_empty(monkeypatch):
    """NaN-fill fresh floating allocations so a kernel that reads uninitialised memory fails."""
    orig_empty, orig_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(orig_empty_like(*a, **k)))
    yield
