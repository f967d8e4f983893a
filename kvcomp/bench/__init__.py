"""kvcomp's benchmarks (``kvcomp bench kernels``): problem definitions, per-method benches, runners.

- :mod:`kvcomp.bench.core`: problems, data factories, byte-model conventions, timing, machine line;
- :mod:`kvcomp.bench.methods`: one module per method (``dense``, ``duo``, ``think``, ``vq``) registering
  its CUDA benches (``REGISTRY``) and its CPU cases (``CPU_CASES``);
- :mod:`kvcomp.bench.cpu` / :mod:`kvcomp.bench.cuda`: the sweeps; :mod:`kvcomp.bench.runner`: the
  command line, the JSON rewritten after every case, the time budget and the progress bar.

``bench/report.py`` (in the repository) turns ``bench/results/kernels-cpu.json`` into the README table.
"""
