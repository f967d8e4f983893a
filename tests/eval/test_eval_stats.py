"""Wilson intervals, paired flips against the full cache, per-cell summaries and batching."""

import math

import pytest

from kvcomp.eval.runner import compare_to_full, evaluate_samples, summarize
from kvcomp.eval.stats import paired, retention_interval, sign_test, wilson
from kvcomp.eval.tasks import make_sample


def test_wilson_known_values():
    lo, hi = wilson(0.5, 20)
    assert lo == pytest.approx(0.2993, abs=1e-4) and hi == pytest.approx(0.7007, abs=1e-4)
    lo, hi = wilson(1.0, 20)
    assert lo == pytest.approx(0.8389, abs=1e-4) and hi == 1.0
    lo, hi = wilson(0.0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0713, abs=1e-4)
    # narrower with more prompts, always inside [0, 1] and around p
    for p in (0.0, 0.1, 0.37, 0.9, 1.0):
        a, b = wilson(p, 10), wilson(p, 200)
        assert 0.0 <= b[0] <= p <= b[1] <= 1.0 and (b[1] - b[0]) < (a[1] - a[0])


@pytest.mark.parametrize("p,n", [(1.2, 10), (-0.1, 10), (0.5, 0), (0.5, 2.0), (float("nan"), 5)])
def test_wilson_rejects_bad_input(p, n):
    with pytest.raises(ValueError):
        wilson(p, n)


def _rec(method, seed, score, ctx=2048, task="passkey", **kw):
    return dict(method=method, task=task, haystack="prose", context_len=ctx, seed=seed, score=score,
                stats={"kv_bytes_per_token": 100.0 if method == "full" else 25.0}, wall_s=0.5, **kw)


def test_paired_counts_flips_on_shared_prompts_only():
    full = [_rec("full", s, v) for s, v in enumerate([1, 1, 0, 0, 1])]
    mine = [_rec("m", s, v) for s, v in enumerate([1, 0, 1, 0])] + [_rec("m", 99, 1.0)]  # seed 99: no full pair
    p = paired(mine, full)
    assert (p["n"], p["both_right"], p["right_to_wrong"], p["wrong_to_right"], p["both_wrong"]) == (4, 1, 1, 1, 1)
    assert p["accuracy"] == 0.5 and p["full_accuracy"] == 0.5 and p["retention"] == 1.0
    assert paired(mine, [_rec("full", 1, 1.0)])["retention"] == 0.0
    assert paired([_rec("m", 0, 1.0)], [_rec("full", 0, 0.0)])["retention"] is None  # full scored 0
    with pytest.raises(ValueError, match="twice"):
        paired(mine + mine[:1], full)


def test_summarize_and_compare_to_full_cells():
    recs = [_rec("full", s, 1.0) for s in range(10)] + [_rec("m", s, float(s % 2)) for s in range(10)]
    mq = [_rec(m, s, 1.0 if (m == "full" or q == 0) else 0.0, mode="multi-query", query_index=q)
          for m in ("full", "m") for s in range(5) for q in range(3)]
    rows = compare_to_full(summarize(recs + mq), recs + mq)
    cells = {(r["method"], r["mode"], r["turn"]): r for r in rows}
    assert set(cells) == {(m, md, t) for m in ("full", "m") for md, t in
                          (("single", "all"), ("multi-query", "first"), ("multi-query", "later"))}
    m = cells[("m", "single", "all")]
    assert m["n_prompts"] == 10 and m["accuracy"] == 0.5 and m["ci95"] == list(wilson(0.5, 10))
    assert m["paired"] == {"n": 10, "right_to_wrong": 5, "wrong_to_right": 0, "both_right": 5, "both_wrong": 0,
                           "sign_p": 0.0625}
    assert m["accuracy_retained"] == 0.5 and m["bytes_fraction"] == 0.25 and math.isclose(m["wall_s"], 5.0)
    assert cells[("m", "multi-query", "first")]["accuracy_retained"] == 1.0
    later = cells[("m", "multi-query", "later")]
    assert later["n_prompts"] == 10 and later["accuracy_retained"] == 0.0 and later["paired"]["right_to_wrong"] == 10


def test_batched_evaluation_groups_equal_lengths(ws_tok):
    samples = [make_sample("niah_single", ws_tok, 300, haystack="noise", seed=s) for s in range(7)]
    lens = [s.n_prompt_tokens for s in samples]
    seen = []

    def gen(batch):
        seen.append([s.n_prompt_tokens for s in batch])
        return [(s.answers[0], {"kv_bytes_per_token": 1.0}) for s in batch]

    gen.batched = True
    recs = evaluate_samples(gen, samples, method_name="x", progress=False, batch_size=3)
    assert sorted(sum(seen, [])) == sorted(lens) and all(len(set(b)) == 1 and len(b) <= 3 for b in seen)
    assert all(r["score"] == 1.0 for r in recs) and sorted(r["batch"] for r in recs) == sorted(len(b) for b in seen
                                                                                                for _ in b)
    assert sorted(r["seed"] for r in recs) == sorted(s.seed for s in samples)
    with pytest.raises(ValueError, match="batched generate"):
        evaluate_samples(lambda s: ("", {"kv_bytes_per_token": 1.0}), samples, method_name="x", progress=False,
                         batch_size=2)
    gen_short = lambda batch: [("", {"kv_bytes_per_token": 1.0})]  # noqa: E731 -- one answer for a batch
    gen_short.batched = True
    with pytest.raises(ValueError, match="one \\(text, stats\\) per sample"):
        evaluate_samples(gen_short, samples, method_name="x", progress=False, batch_size=4)


def test_sign_test_exact_two_sided():
    assert sign_test(0, 0) == 1.0 and sign_test(1, 1) == 1.0
    assert sign_test(4, 0) == 0.125 and sign_test(0, 4) == 0.125  # 2 * (1/2)^4
    assert math.isclose(sign_test(9, 1), 2 * 11 / 1024)
    with pytest.raises(ValueError):
        sign_test(-1, 2)


def test_retention_interval_is_paired_and_clustered():
    same = [((i,), float(i % 2), float(i % 2)) for i in range(40)]  # method == full on every prompt
    assert retention_interval(same) == [1.0, 1.0]  # paired: no spread even though scores vary
    lost = [((i,), 0.0 if i < 4 else float(i % 2), float(i % 2)) for i in range(40)]  # 2 of 20 right ones lost
    lo, hi = retention_interval(lost)
    assert lo < 0.9 < hi <= 1.0 and retention_interval(lost) == [lo, hi]  # deterministic
    # the questions of one context resampled together: 2 contexts with 10 questions each are 2 units
    two = [(("a",), 1.0, 1.0)] * 10 + [(("b",), 0.0, 1.0)] * 10
    lo2, hi2 = retention_interval(two)
    assert lo2 == 0.0 and hi2 == 1.0
    assert retention_interval([((0,), 1.0, 0.0), ((1,), 0.0, 0.0)]) is None  # full scored 0
    assert retention_interval([((0,), 1.0, 1.0)]) is None  # one unit: no interval
