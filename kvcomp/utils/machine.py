"""Machine line and commit id recorded with every evaluation / benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

__all__ = ["git_commit", "machine_info"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Describe this machine for result files.

    Returns a dict with ``device`` (GPU name, or ``"cpu: <model>"``), ``cuda`` (torch's CUDA version
    or None), ``torch``, ``triton`` (None when not installed; read from package metadata so triton
    is not imported), ``transformers``, ``python``, ``platform``, ``cpu_count``, ``cpu`` and ``line``
    (all of it on one human-readable line).
    """
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = "cpu: " + _cpu_name()
    info = {
        "device": device,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    info["line"] = (
        f"{info['device']} | torch {info['torch']} (cuda {info['cuda']}) | triton {info['triton']} | "
        f"transformers {info['transformers']} | python {info['python']} | {info['platform']} | "
        f"{info['cpu_count']} cpus")
    return info


def git_commit(path: str | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: the kvcomp sources);
    ``"unknown"`` when git or the repository is unavailable."""
    where = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(where):
        where = os.path.dirname(where) or "."
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip()
    return commit if head.returncode == 0 and commit else "unknown"

