"""kvcomp's Triton kernels, installed as ``kvcomp.kernels`` (setup.py's ``package_dir``).

With the repository root on ``sys.path`` (``python -m pytest`` or a script run from the root), this folder
would shadow Hugging Face's ``kernels`` package, which transformers >= 5.25 imports at start-up. Imported
under that top-level name, this module hands the import over to the installed package (where there is one);
as ``kvcomp.kernels`` it is kvcomp's kernels and nothing else.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _paths)
    if _spec is not None and _spec.has_location:  # a real package (not a namespace folder such as tests/kernels)
        _mod = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _mod  # importlib returns what sys.modules holds once this module has run
        _spec.loader.exec_module(_mod)
    # else: no such package installed; this empty module (no __version__) is what transformers < 5.25
    # probes and reads as "kernels not available"
