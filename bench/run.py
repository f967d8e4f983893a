"""The kernel benchmark runner of the CUDA registry (``kvcomp.bench.methods``), as a script.

    python bench/run.py --list                        # registered kernels
    python bench/run.py --smoke                       # CPU: tiny shapes, Triton interpreter, vs reference
    python bench/run.py --kernels duo_decode --contexts 4K,64K --batch 1,8 --check   # CUDA timing

Timing runs ``kvcomp bench kernels --device cuda`` with the other arguments (see ``kvcomp bench kernels
--help``); without CUDA it is skipped with its reason (exit 0). The CPU timing sweep is
``kvcomp bench kernels`` itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def smoke(names, out_path=None) -> int:
    """Each named kernel once on its tiny problem, checked against its reference (see kvcomp.bench.cuda)."""
    from kvcomp.bench.cuda import smoke as run_smoke

    return run_smoke(names, out_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", help="comma-separated registry names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreter on CPU, check vs reference")
    ap.add_argument("--list", action="store_true", help="list the registered kernels and exit")
    ap.add_argument("--out", help="JSON path")
    args, rest = ap.parse_known_args(argv)

    import torch

    if args.smoke and not torch.cuda.is_available():
        # before any kvcomp.kernels module is imported (the benches import them lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from kvcomp.bench.methods import REGISTRY

    names = list(REGISTRY) if not args.kernels else args.kernels.split(",")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown kernels {unknown}; registered: {list(REGISTRY)}")
    if args.list:
        for n in names:
            print(f"{n:24s} {REGISTRY[n].description}")
        return 0
    if args.smoke:
        return smoke(names, args.out)
    if not torch.cuda.is_available():
        print("skipped: timing needs a CUDA device (CPU timing: kvcomp bench kernels; --smoke checks correctness)")
        return 0
    from kvcomp.cli import main as cli_main

    extra = ["--kernels", ",".join(names)] + (["--out", args.out] if args.out else [])
    return cli_main(["bench", "kernels", "--device", "cuda", *extra, *rest])


if __name__ == "__main__":
    sys.exit(main())
