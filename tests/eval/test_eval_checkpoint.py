"""A killed evaluation resumes from its checkpoint: finished samples are not run again, the result is the same."""

import json

import pytest

from kvcomp.eval import build_samples, evaluate_samples
from kvcomp.eval.checkpoint import Checkpoint, sample_key
from kvcomp.eval.multiquery import build_multiquery_samples, evaluate_multiquery

ID = {"model": "m", "dtype": "float32", "configs": {"full": "stock"}}


class Killed(Exception):
    pass


def generate_fn(calls, die_after=None):
    """Answers every sample right; raises after ``die_after`` calls (a killed run)."""

    def generate(batch):
        if die_after is not None and len(calls) >= die_after:
            raise Killed
        calls.extend(s.seed for s in batch)
        return [(" ".join(s.answers), {"kv_bytes_per_token": float(s.seed % 7)}) for s in batch]

    generate.batched = True
    return generate


def strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_resume_runs_only_unfinished_samples(ws_tok, tmp_path, batch_size):
    samples = build_samples(ws_tok, tasks=["niah_single", "niah_multivalue"], context_lens=[300, 451], n_trials=3,
                            haystacks=["noise"], seed=5)
    ref = evaluate_samples(generate_fn([]), samples, method_name="full", progress=False, batch_size=batch_size)
    path = tmp_path / "out.json.partial.jsonl"
    first = []
    with pytest.raises(Killed):
        evaluate_samples(generate_fn(first, die_after=5), samples, method_name="full", progress=False,
                         batch_size=batch_size, checkpoint=Checkpoint(path, ID, "c1"))
    assert 0 < len(first) < len(samples)
    with open(path, "a") as f:
        f.write('{"key": "full|cut')  # the line being written when the process died
    second = []
    ck = Checkpoint(path, ID, "c2")
    assert ck.resumed == len(first) and ck.commits == ["c1", "c2"]
    got = evaluate_samples(generate_fn(second), samples, method_name="full", progress=False,
                           batch_size=batch_size, checkpoint=ck)
    assert sorted(first + second) == sorted(s.seed for s in samples)  # every sample ran exactly once
    assert strip(got) == strip(ref)  # same records, same order as an uninterrupted run
    # a third run finds everything finished and generates nothing
    third = []
    again = evaluate_samples(generate_fn(third), samples, method_name="full", progress=False,
                             batch_size=batch_size, checkpoint=Checkpoint(path, ID, "c2"))
    assert third == [] and strip(again) == strip(ref)


def test_other_method_or_identity_is_not_reused(ws_tok, tmp_path):
    samples = build_samples(ws_tok, tasks=["niah_single"], context_lens=[300], n_trials=2, haystacks=["noise"])
    path = tmp_path / "p.jsonl"
    ck = Checkpoint(path, ID)
    evaluate_samples(generate_fn([]), samples, method_name="full", progress=False, checkpoint=ck)
    calls = []
    evaluate_samples(generate_fn(calls), samples, method_name="duo", progress=False, checkpoint=ck)
    assert len(calls) == 2  # another method's samples are its own
    with pytest.raises(ValueError, match=r"another run's samples \(differs in \['dtype'\]\)"):
        Checkpoint(path, {**ID, "dtype": "bfloat16"})
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"key": "k", "records": []}) + "\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        Checkpoint(path, ID)
    with pytest.raises(ValueError, match="identity"):
        Checkpoint(tmp_path / "q.jsonl", {})
    ck.remove()
    assert not path.exists()


def test_multiquery_resume(ws_tok, tmp_path):
    samples = build_multiquery_samples(ws_tok, context_lens=[400], n_trials=3, n_queries=2, haystacks=["noise"],
                                       chat=False)
    calls = []

    def converse(s):
        if len(calls) == 2 and not resumed:
            raise Killed
        calls.append(s.seed)
        return [(a[0], {"kv_bytes_per_token": 1.0, "seconds": 0.0}) for a in s.answers]

    resumed = False
    path = tmp_path / "mq.jsonl"
    with pytest.raises(Killed):
        evaluate_multiquery(converse, samples, method_name="full", progress=False, checkpoint=Checkpoint(path, ID))
    resumed = True
    recs = evaluate_multiquery(converse, samples, method_name="full", progress=False, checkpoint=Checkpoint(path, ID))
    assert sorted(calls) == sorted(s.seed for s in samples)
    assert [(r["seed"], r["query_index"]) for r in recs] == [(s.seed, i) for s in samples for i in range(2)]
    assert all(r["score"] == 1.0 for r in recs)
    assert sample_key("full", samples[0]).startswith("full|")
