"""Shared-context multi-query samples: length control, turn texts, scoring per question."""

import pytest

from kvcomp.eval.multiquery import (MODE, build_multiquery_samples, evaluate_multiquery, make_multiquery_sample,
                                    turn_text)
from kvcomp.eval.runner import compare_to_full, summarize
from kvcomp.eval.tasks import count_tokens


@pytest.mark.parametrize("ctx,nq,hay", [(400, 1, "noise"), (777, 3, "prose"), (1500, 6, "noise")])
def test_sample_fits_budget_and_hides_every_fact(ws_tok, ctx, nq, hay):
    s = make_multiquery_sample(ws_tok, ctx, n_queries=nq, haystack=hay, seed=11, max_new_tokens=10)
    assert len(s.turns) == len(s.questions) == len(s.answers) == nq and len(s.n_turn_tokens) == nq - 1
    total = s.n_prompt_tokens + sum(s.n_turn_tokens) + nq * s.max_new_tokens
    assert total <= ctx
    assert s.n_prompt_tokens == count_tokens(ws_tok, s.prompt, s.add_special_tokens)
    assert all(f"for {k} is: {a[0]}." in s.prompt for k, a in zip(s.keys, s.answers))  # every fact in the context
    assert all(a[0] not in t for t in s.turns[1:] for a in s.answers)  # later turns never leak an answer
    assert s.keys[0] in s.questions[0] and s.questions[0] + "<|end|>\n<|assistant|>\n" in s.prompt  # ends the user turn
    for q, t in zip(s.questions[1:], s.turns[1:]):
        assert t.startswith("<|end|>\n<|user|>\n" + q) and t.endswith("provided text is")
    # one more sentence would not fit
    bigger = make_multiquery_sample(ws_tok, ctx + 40, n_queries=nq, haystack=hay, seed=11, max_new_tokens=10)
    assert bigger.n_sentences > s.n_sentences


def test_seeded_and_distinct(ws_tok):
    a = build_multiquery_samples(ws_tok, context_lens=[600], n_trials=3, n_queries=2, haystacks=["noise"], seed=5)
    b = build_multiquery_samples(ws_tok, context_lens=[600], n_trials=3, n_queries=2, haystacks=["noise"], seed=5)
    assert [s.turns for s in a] == [s.turns for s in b]
    assert len({s.seed for s in a}) == 3 and len({s.prompt for s in a}) == 3


def test_turn_text_raw_and_real_template(smol_tok, ws_tok):
    assert turn_text(ws_tok, "Q?", "A is", chat=False) == "\nQ? A is"
    t = turn_text(smol_tok, "Q?", "A is", chat=True)
    assert t == "<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA is"
    s = make_multiquery_sample(smol_tok, 1024, n_queries=3, seed=1)
    assert s.n_prompt_tokens + sum(s.n_turn_tokens) + 3 * s.max_new_tokens <= 1024


@pytest.mark.parametrize("kw,match", [
    (dict(context_len=0), "context_len"), (dict(n_queries=0), "n_queries"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(haystack="hay"), "haystack"), (dict(seed="1"), "seed"), (dict(context_len=60, n_queries=4), "too small"),
])
def test_bad_arguments(ws_tok, kw, match):
    args = dict(context_len=600, n_queries=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        make_multiquery_sample(ws_tok, args.pop("context_len"), **args)


def test_evaluate_scores_each_question_and_splits_turns(ws_tok):
    samples = build_multiquery_samples(ws_tok, context_lens=[600], n_trials=4, n_queries=3, haystacks=["noise"])

    def converse(right_after_first):
        def run(s):
            return [(f" {a[0]}." if (i == 0 or right_after_first) else " 42.", {"kv_bytes_per_token": 2.0, "seconds": 0.1})
                    for i, a in enumerate(s.answers)]
        return run

    recs = (evaluate_multiquery(converse(True), samples, method_name="full", progress=False)
            + evaluate_multiquery(converse(False), samples, method_name="m", progress=False))
    assert len(recs) == 2 * 4 * 3 and all(r["mode"] == MODE for r in recs)
    rows = {(r["method"], r["turn"]): r for r in compare_to_full(summarize(recs), recs)}
    assert rows[("m", "first")]["accuracy_retained"] == 1.0 and rows[("m", "first")]["n_prompts"] == 4
    assert rows[("m", "later")]["accuracy"] == 0.0 and rows[("m", "later")]["paired"]["right_to_wrong"] == 8
    with pytest.raises(ValueError, match="one \\(text, stats\\) per question"):
        evaluate_multiquery(lambda s: [], samples, method_name="x", progress=False)


def test_gold_turn_appends_the_previous_gold_answer(ws_tok):
    from kvcomp.eval.multiquery import gold_turn

    s = make_multiquery_sample(ws_tok, 900, n_queries=3, seed=4)
    for i in (1, 2):
        t = gold_turn(s, i)
        assert t == f" {s.answers[i - 1][0]}." + s.turns[i] and s.answers[i][0] not in t
    for bad in (0, 3):
        with pytest.raises(ValueError, match="later turn"):
            gold_turn(s, bad)
