import json
import os
import re
import subprocess

import pytest

from kvcomp.eval import build_samples, plot_accuracy_vs_kv, run_eval, summarize, write_results
from kvcomp.utils import git_commit, machine_info

TASKS3 = ["niah_single", "niah_multivalue", "vt"]


def fake_generate(kv_bytes):
    """Answers niah_single fully, niah_multivalue half (first 2 of 4 values), vt never."""

    def generate(sample):
        if sample.task == "niah_single":
            text = f" {sample.answers[0]}."
        elif sample.task == "niah_multivalue":
            text = ", ".join(sample.answers[:2])
        else:
            text = " none of them"
        return text, {"kv_bytes_per_token": kv_bytes, "seconds": 0.5, "note": "text is ignored"}

    return generate


def test_run_eval_and_summarize(ws_tok):
    kw = dict(tasks=TASKS3, context_lens=[400, 800], n_trials=3, haystacks=["noise", "prose"], seed=3,
              progress=False)
    rec_a = run_eval(fake_generate(1000.0), ws_tok, method_name="full", **kw)
    rec_b = run_eval(fake_generate(250.0), ws_tok, method_name="duo", **kw)
    assert len(rec_a) == 2 * 3 * 2 * 3
    # both methods see identical samples
    assert [(r["seed"], r["answers"]) for r in rec_a] == [(r["seed"], r["answers"]) for r in rec_b]
    assert len({r["seed"] for r in rec_a}) == len(rec_a)
    for r in rec_a:
        assert r["score"] == {"niah_single": 1.0, "niah_multivalue": 0.5, "vt": 0.0}[r["task"]]
        assert 0 <= r["depth"] <= 100 and r["n_prompt_tokens"] + r["max_new_tokens"] <= r["context_len"]
        assert r["stats"]["kv_bytes_per_token"] == 1000.0

    rows = summarize(rec_a + rec_b)
    assert [(r["method"], r["context_len"]) for r in rows] == [("full", 400), ("full", 800), ("duo", 400),
                                                               ("duo", 800)]
    for r in rows:
        assert r["accuracy"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
        assert r["n_samples"] == 18 and r["n_trials"] == 3
        assert r["per_task"] == {"niah_single": 1.0, "niah_multivalue": 0.5, "vt": 0.0}
        assert r["per_haystack"] == {"noise": pytest.approx(0.5), "prose": pytest.approx(0.5)}
        assert r["per_task_haystack"]["vt/prose"] == 0.0
        assert r["kv_bytes_per_token"] == (1000.0 if r["method"] == "full" else 250.0)
        assert r["stats"]["seconds"] == 0.5 and "note" not in r["stats"]


def test_summarize_mixed_scores():
    recs = [{"method": "m", "task": t, "haystack": "noise", "context_len": 64, "score": s,
             "stats": {"kv_bytes_per_token": b, "device_bytes_per_token": b / 2}}
            for t, s, b in (("vt", 1.0, 10), ("vt", 0.2, 30), ("passkey", 0.0, 20))]
    (row,) = summarize(recs)
    assert row["accuracy"] == pytest.approx(0.4)
    assert row["per_task"] == {"vt": pytest.approx(0.6), "passkey": 0.0}
    assert row["kv_bytes_per_token"] == pytest.approx(20.0)
    assert row["device_bytes_per_token"] == pytest.approx(10.0) and "host_bytes_per_token" not in row
    assert row["n_trials"] == 1 and row["n_samples"] == 3
    with pytest.raises(ValueError, match="records"):
        summarize([])
    with pytest.raises(ValueError, match="score"):
        summarize([{"method": "m", "task": "vt", "haystack": "noise", "context_len": 1, "stats": {}}])


def test_build_samples_grid_and_options(ws_tok):
    s = build_samples(ws_tok, tasks=["niah_multikey", "passkey"], context_lens=[300], n_trials=2,
                      max_new_tokens={"passkey": 7}, task_options={"niah_multikey": {"num_distractors": 1}})
    assert [x.task for x in s] == ["niah_multikey"] * 2 + ["passkey"] * 2
    assert all(len(x.needles) == 2 for x in s[:2]) and all(x.max_new_tokens == 7 for x in s[2:])
    assert [x.meta["trial"] for x in s] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="tasks"):
        build_samples(ws_tok, tasks=["cwe"], context_lens=[300], n_trials=1)
    with pytest.raises(ValueError, match="n_trials"):
        build_samples(ws_tok, tasks=["vt"], context_lens=[300], n_trials=0)
    with pytest.raises(ValueError, match="context_lens"):
        build_samples(ws_tok, tasks=["vt"], context_lens=[], n_trials=1)
    with pytest.raises(ValueError, match="task_options"):
        build_samples(ws_tok, tasks=["vt"], context_lens=[300], n_trials=1, task_options={"x": {}})


def test_generate_contract(ws_tok):
    kw = dict(tasks=["passkey"], context_lens=[200], n_trials=1, progress=False)
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        run_eval(lambda s: ("x", {}), ws_tok, **kw)
    with pytest.raises(ValueError, match="generate must return"):
        run_eval(lambda s: "x", ws_tok, **kw)
    with pytest.raises(ValueError, match="method_name"):
        run_eval(fake_generate(1.0), ws_tok, method_name="", **kw)


def test_write_results_and_plot(ws_tok, tmp_path):
    kw = dict(tasks=["niah_single", "vt"], context_lens=[300, 600], n_trials=2, progress=False)
    recs = run_eval(fake_generate(4608.0), ws_tok, method_name="full", **kw)
    recs += run_eval(fake_generate(1200.0), ws_tok, method_name="duo+think", **kw)
    path = tmp_path / "sub" / "res.json"
    write_results(str(path), recs, meta={"model": "stub"})
    obj = json.loads(path.read_text())
    assert set(obj) >= {"machine", "commit", "created", "meta", "summary", "records"}
    for k in ("device", "torch", "triton", "transformers", "python", "platform", "cpu_count", "line"):
        assert k in obj["machine"]
    assert obj["meta"] == {"model": "stub"} and len(obj["records"]) == 16 and len(obj["summary"]) == 4
    assert obj["summary"][0]["accuracy"] == pytest.approx(0.5)
    assert obj["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", obj["commit"])

    png = plot_accuracy_vs_kv(obj["summary"], str(tmp_path / "acc.png"), title="stub")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    plot_accuracy_vs_kv(recs, str(tmp_path / "from_records.png"))  # raw records are summarized
    assert os.path.getsize(tmp_path / "from_records.png") > 5000
    with pytest.raises(ValueError, match="png"):
        plot_accuracy_vs_kv(obj["summary"], str(tmp_path / "acc.jpg"))


def test_machine_and_commit():
    info = machine_info()
    assert info["python"].count(".") == 2 and info["cpu_count"] >= 1 and info["torch"] in info["line"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode == 0:
        assert git_commit() == head.stdout.strip()
    assert git_commit("/") == "unknown" or re.fullmatch(r"[0-9a-f]{40}", git_commit("/"))
