# SPDX-License-Identifier: Apache-2.0
"""Build of kvcomp: pure Python by default, the native extension ``kvcomp._C`` only on request.

    pip install -e .                                              # CPU-only, builds nothing
    KVCOMP_BUILD_EXT=1 pip install --no-build-isolation -e .      # + kvcomp._C through CMake

``--no-build-isolation`` is required with ``KVCOMP_BUILD_EXT=1``: the extension is compiled against
the torch already installed (torch is deliberately not a build requirement, so pip never pulls a
CUDA torch into an isolated build environment). Needs cmake >= 3.21, a C++20 compiler and the
``pybind11`` package (``pip install pybind11``, part of the ``dev`` extra).

Environment:
    KVCOMP_BUILD_EXT=1     build the extension (anything else: build nothing).
    KVCOMP_CUDA=auto|1|0   CUDA operators: auto (default) = when torch is a CUDA build and
                           ``torch.utils.cpp_extension.CUDA_HOME`` is found; 1 = required (error
                           otherwise); 0 = C++ CPU operators only.
    TORCH_CUDA_ARCH_LIST   e.g. "8.0;9.0" (default: CMake's 80;90).
    MAX_JOBS               parallel compile jobs (default: CPU count).
    KVCOMP_CMAKE_ARGS      extra arguments for the CMake configure step.

Packages: ``kvcomp*``; the top-level Triton folder ``kernels/`` installs as ``kvcomp.kernels``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def build_ext_requested() -> bool:
    """True when KVCOMP_BUILD_EXT asks for the native extension."""
    value = _env("KVCOMP_BUILD_EXT", "0")
    if value not in _TRUE | _FALSE | {""}:
        raise SystemExit(f"KVCOMP_BUILD_EXT must be 0 or 1, got {os.environ['KVCOMP_BUILD_EXT']!r}")
    return value in _TRUE


def _cuda_wanted(torch_mod) -> bool:
    from torch.utils.cpp_extension import CUDA_HOME  # None unless torch is a CUDA build and nvcc is found

    mode = _env("KVCOMP_CUDA", "auto")
    if mode not in _TRUE | _FALSE | {"auto", ""}:
        raise SystemExit(f"KVCOMP_CUDA must be auto, 0 or 1, got {os.environ['KVCOMP_CUDA']!r}")
    available = CUDA_HOME is not None and torch_mod.version.cuda is not None
    if mode in _TRUE and not available:
        raise SystemExit(
            "KVCOMP_CUDA=1 but CUDA is not available to the build: torch "
            f"{torch_mod.__version__} (CUDA {torch_mod.version.cuda}), CUDA_HOME={CUDA_HOME}"
        )
    return available and mode not in _FALSE


class CMakeExtension(Extension):
    """An extension whose sources CMake knows (CMakeLists.txt at the repository root)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, writing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError as exc:
            raise SystemExit(
                "KVCOMP_BUILD_EXT=1 needs torch importable by the build: install torch first and run "
                "`KVCOMP_BUILD_EXT=1 pip install --no-build-isolation -e .`"
            ) from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("KVCOMP_BUILD_EXT=1 needs cmake >= 3.21 on PATH (apt install cmake / pip install cmake)")
        with_cuda = _cuda_wanted(torch)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DKVCOMP_OUTPUT_DIR={out_dir}",
            f"-DKVCOMP_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        if with_cuda:
            from torch.utils.cpp_extension import CUDA_HOME

            args.append(f"-DCMAKE_CUDA_COMPILER={Path(CUDA_HOME) / 'bin' / 'nvcc'}")
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").replace("+PTX", "")
            archs = [a.replace(".", "") for a in arch.split(";") if a]
            if archs:
                args.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
        args += shlex.split(os.environ.get("KVCOMP_CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        start = time.perf_counter()
        print(f"kvcomp: building kvcomp._C (CUDA {'on' if with_cuda else 'off'}) into {out_dir}", flush=True)
        subprocess.check_call(args)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])
        print(f"kvcomp: native build took {time.perf_counter() - start:.0f} s", flush=True)


setup(
    packages=find_packages(include=["kvcomp", "kvcomp.*"]) + ["kvcomp.kernels"],
    package_dir={"kvcomp.kernels": "kernels"},
    # calibrated artifacts shipped for the bundled model (DuoAttention pattern, VQ codebooks)
    package_data={"kvcomp": ["patterns_data/*/*"]},
    ext_modules=[CMakeExtension("kvcomp._C")] if build_ext_requested() else [],
    cmdclass={"build_ext": CMakeBuild},
)
