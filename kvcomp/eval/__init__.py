"""Offline RULER-style quality harness: haystacks, task generators, exact scorer, runner, plot.

No downloads: haystacks are RULER's noise filler and the stdlib ``pydoc_data.topics`` prose.
``plot_accuracy_vs_kv`` imports matplotlib only when called.
"""

from .haystack import FILLER, HAYSTACKS, build_context, haystack_sentences, prose_sentences, split_sentences
from .plot import plot_accuracy_vs_kv
from .multiquery import MultiQuerySample, build_multiquery_samples, evaluate_multiquery, make_multiquery_sample
from .runner import build_samples, compare_to_full, evaluate_samples, run_eval, summarize, write_results
from .score import postprocess, string_match_all, string_match_part
from .stats import paired, wilson
from .tasks import DEPTHS, TASKS, Sample, count_tokens, derive_seed, make_sample

__all__ = [
    "DEPTHS",
    "FILLER",
    "HAYSTACKS",
    "MultiQuerySample",
    "Sample",
    "TASKS",
    "build_context",
    "build_multiquery_samples",
    "build_samples",
    "compare_to_full",
    "count_tokens",
    "derive_seed",
    "evaluate_multiquery",
    "evaluate_samples",
    "haystack_sentences",
    "make_multiquery_sample",
    "make_sample",
    "paired",
    "plot_accuracy_vs_kv",
    "postprocess",
    "prose_sentences",
    "run_eval",
    "split_sentences",
    "string_match_all",
    "string_match_part",
    "summarize",
    "wilson",
    "write_results",
]
