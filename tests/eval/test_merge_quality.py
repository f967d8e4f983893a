"""bench/merge_quality.py (one results source) and bench/peers_kvpress.py's argument parsing."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mq = _load("merge_quality")
peers = _load("peers_kvpress")


def _samples(method, scores, bpt, mode="single"):
    return [dict(method=method, mode=mode, task="passkey", haystack="prose", context_len=2048, seed=s, score=v,
                 stats={"kv_bytes_per_token": bpt}, wall_s=1.0, query_index=0) for s, v in enumerate(scores)]


def _run(path, samples, commit="abc1234", tasks=("passkey",)):
    obj = {"machine": {"line": "cpu: test"}, "commit": commit,
           "meta": {"tasks": list(tasks), "command": "kvcomp eval ...", "mode": "single"},
           "records": [], "samples": samples}
    path.write_text(json.dumps(obj))
    return str(path)


def test_pools_runs_pairs_across_files_and_writes_readme(tmp_path):
    a = _run(tmp_path / "full.json", _samples("full", [1, 1, 0, 1], 100.0))
    b = _run(tmp_path / "duo.json", _samples("duo", [1, 0, 1, 1], 50.0), commit="def5678")
    c = _run(tmp_path / "peer.json", _samples("kvpress:snapkv@0.5", [0, 0, 0, 1], 50.0))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- BEGIN quality-table -->\nold numbers\n<!-- END quality-table -->\ntail\n")
    out = tmp_path / "merged.json"
    assert mq.main([a, b, c, "--out", str(out), "--readme", str(readme), "--plot", str(tmp_path / "q.png")]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    duo = rows["duo"]
    assert duo["paired"] == {"n": 4, "right_to_wrong": 1, "wrong_to_right": 1, "both_right": 2, "both_wrong": 0,
                             "sign_p": 1.0}
    assert duo["n_prompts"] == 4 and duo["accuracy_retained"] == 1.0 and duo["bytes_fraction"] == 0.5
    assert duo["source"]["file"].endswith("duo.json") and duo["source"]["commit"] == "def5678"
    assert rows["kvpress:snapkv@0.5"]["simulated"] is True and "simulated" not in duo
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("<!-- END quality-table -->\ntail\n")
    assert "| duo | 2K | single | 4 | 75% [" in text and "`duo.json` @ def5678" in text
    assert "kvpress:snapkv@0.5 (simulated)" in text and (tmp_path / "q.png").stat().st_size > 0


def test_remeasured_rows_replace_older_ones(tmp_path):
    out = tmp_path / "merged.json"
    first = _run(tmp_path / "r1.json", _samples("full", [1, 0, 0, 0], 100.0))
    mq.main([first, "--out", str(out)])
    again = _run(tmp_path / "r2.json", _samples("full", [1, 1, 1, 0], 100.0), commit="fff0000")
    mq.main([again, "--out", str(out)])  # the merged file is read first, then replaced row by row
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["accuracy"] == 0.75 and rows[0]["source"]["commit"] == "fff0000"
    more = _run(tmp_path / "r3.json", _samples("full", [1] * 8, 100.0))
    mq.main([more, "--out", str(out)])  # another n is another row; the table shows the larger n
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["n_prompts"] for r in rows) == [4, 8]
    assert [r["n_prompts"] for r in mq.best_rows(rows)] == [8]


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one"):
        mq.write_readme(str(readme), "table\n")
    with pytest.raises(SystemExit, match="no rows"):
        mq.main(["--out", str(tmp_path / "empty.json")])


def test_peer_press_specs():
    assert peers.parse_presses("none, snapkv@0.42,think@0.4") == [("none", 0.0), ("snapkv", 0.42), ("think", 0.4)]
    assert peers.kept_fraction("think", 0.4) == pytest.approx(0.8) and peers.kept_fraction("snapkv", 0.9) == pytest.approx(0.1)
    for bad in ("snapkv", "snapkv@1.5", "nope@0.5", " , "):
        with pytest.raises(ValueError):
            peers.parse_presses(bad)


def test_input_order_decides_and_rows_name_their_own_context(tmp_path):
    s2 = _samples("full", [1, 0], 100.0)
    s4 = [dict(r, context_len=4096) for r in _samples("full", [1, 1], 100.0)]
    a = _run(tmp_path / "ctx2.json", s2 + _samples("all", [0, 0], 10.0))
    b = _run(tmp_path / "ctx4.json", s4, commit="4444444")
    newer = tmp_path / "all-newer.json"  # a summary-only run measured later: replaces the pooled 'all' row
    newer.write_text(json.dumps({"machine": {"line": "m"}, "commit": "5555555", "meta": {"tasks": ["passkey"]},
                                 "records": [{"method": "all", "context_len": 2048, "accuracy": 0.5, "n_samples": 2,
                                              "kv_bytes_per_token": 10.0, "stats": {}}]}))
    rows = {(r["method"], r["context_len"]): r for r in mq.merge([a, b, str(newer)])}
    assert rows[("full", 2048)]["source"]["file"].endswith("ctx2.json")
    assert rows[("full", 4096)]["source"]["commit"] == "4444444"
    assert rows[("all", 2048)]["accuracy"] == 0.5 and rows[("all", 2048)]["source"]["commit"] == "5555555"


def test_a_cell_pooled_from_two_seeds_names_both_runs(tmp_path):
    s1 = [dict(r, seed=r["seed"] + 10) for r in _samples("full", [1, 1], 100) + _samples("m", [1, 0], 50)]
    a = _run(tmp_path / "s0.json", _samples("full", [1, 1], 100) + _samples("m", [1, 1], 50))
    b = _run(tmp_path / "s1.json", s1)
    rows = mq.merge([a, b])
    m = next(r for r in rows if r["method"] == "m")
    assert m["n_prompts"] == 4 and m["paired"]["right_to_wrong"] == 1 and m["accuracy_retained"] == 0.75
    assert m["source"]["file"].endswith("s0.json") and m["source"]["also"][0]["file"].endswith("s1.json")
    text = mq.table(rows, "q.json")
    assert "`s0.json` @ abc1234 + `s1.json` @ abc1234" in text


def test_glance_block_is_generated_when_the_readme_has_one(tmp_path):
    a = _run(tmp_path / "a.json", _samples("full", [1, 1, 0, 1], 100) + _samples("duo", [1, 0, 0, 1], 50))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN quality-glance -->\nold\n<!-- END quality-glance -->\n"
                      "<!-- BEGIN quality-table -->\nold\n<!-- END quality-table -->\n")
    assert mq.main([a, "--out", str(tmp_path / "q.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text
    assert "| full cache | 100% | 75% acc. |" in text
    assert "| DuoAttention 50% | 50% | 67% [" in text  # 2 of the full cache's 3 right answers kept
    readme.write_text("<!-- BEGIN quality-glance -->\nonly one marker\n<!-- BEGIN quality-table -->\n<!-- END quality-table -->\n")
    with pytest.raises(SystemExit, match="quality-glance"):
        mq.main([a, "--out", str(tmp_path / "q.json"), "--readme", str(readme)])
