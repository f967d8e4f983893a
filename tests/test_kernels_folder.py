"""The repository's ``kernels/`` folder (installed as ``kvcomp.kernels``) must not break Hugging Face's own
``kernels`` package when the repository root is on ``sys.path`` (``python -m pytest``, bench scripts)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from transformers import LlamaConfig  # transformers >= 5.25 imports the kernels package at start-up
import kernels
import kvcomp.kernels.duo_decode
print(getattr(kernels, "__file__", None))
"""


def test_repo_root_on_path_keeps_transformers_importable():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = r.stdout.strip().splitlines()[-1]
    try:
        installed = importlib.metadata.distribution("kernels") is not None
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:  # Hugging Face's package: the import reaches it, not the repo folder
        assert not got.startswith(str(ROOT / "kernels")), got
    else:  # none installed: the repo folder's empty top-level module, which transformers reads as absent
        assert got == str(ROOT / "kernels" / "__init__.py"), got
