"""The command line: bad arguments fail while parsing (before a model loads); every error is one
line ``kvcomp: error: ...`` with exit status 2, or the traceback under --debug / KVCOMP_DEBUG=1."""

import os
import subprocess
import sys
import types

import pytest

from kvcomp import cli, models


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", boom)


@pytest.mark.parametrize("argv,arg", [
    (["eval", "--context-lens", "abc"], "--context-lens"),
    (["eval", "--context-lens", "2048,-1"], "--context-lens"),
    (["eval", "--context-lens", ","], "--context-lens"),
    (["eval", "--tasks", "passkey,nope"], "--tasks"),
    (["eval", "--haystacks", "noise,hay"], "--haystacks"),
    (["eval", "--trials", "0"], "--trials"),
    (["eval", "--methods", "full,duo+xx"], "--methods"),
    (["eval", "--mode", "multi"], "--mode"),
    (["eval", "--queries", "0"], "--queries"),
    (["eval", "--history", "none"], "--history"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["demo", "--methods", "duo+duo"], "--methods"),
    (["demo", "--sink", "2.5"], "--sink"),
    (["demo", "--sink", "-1"], "--sink"),
    (["demo", "--recent", "16.7"], "--recent"),
    (["demo", "--recent", "0"], "--recent"),
    (["demo", "--sparsity", "1.5"], "--sparsity"),
    (["demo", "--prune-ratio", "1"], "--prune-ratio"),
    (["demo", "--prune-ratio", "nan"], "--prune-ratio"),
    (["demo", "--think-window", "0"], "--think-window"),
    (["demo", "--topk", "12.5"], "--topk"),
    (["demo", "--topk", "0"], "--topk"),
    (["demo", "--n-codes", "0"], "--n-codes"),
    (["demo", "--vq-dense-layers", "-2"], "--vq-dense-layers"),
    (["eval", "--vq-select", "exact"], "--vq-select"),
    (["demo", "--context", "abc"], "--context"),
    (["vllm-config", "--method", "bogus", "--out", "x"], "--method"),
    (["calibrate", "duo", "--steps", "0"], "--steps"),
    (["calibrate", "duo", "--lr", "-1"], "--lr"),
    (["calibrate", "duo", "--min-len", "x"], "--min-len"),
    (["calibrate", "vq", "--n-codes", "40000"], "--n-codes"),
    (["calibrate", "vq", "--uuid-fraction", "2"], "--uuid-fraction"),
    (["calibrate", "vq", "--eval-tokens", "-5"], "--eval-tokens"),
])
def test_bad_arguments_fail_while_parsing(argv, arg, capsys, no_model_load):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {arg}" in err and "Traceback" not in err


def test_list_arguments_parse_to_lists():
    a = cli.build_parser().parse_args(["eval", "--context-lens", "1024, 2048", "--tasks", "passkey",
                                       "--methods", "full,duo+vq", "--topk", "64"])
    assert a.context_lens == [1024, 2048] and a.tasks == ["passkey"] and a.methods == ["full", "duo+vq"]
    assert a.topk == 64 and a.haystacks == ["prose"]
    a = cli.build_parser().parse_args(["eval", "--mode", "multi-query", "--queries", "5", "--batch-size", "4"])
    assert (a.mode, a.queries, a.batch_size, a.history) == ("multi-query", 5, 4, "gold")
    assert cli.build_parser().parse_args(["eval", "--history", "model"]).history == "model"


def test_think_window_reaches_the_method_options():
    a = cli.build_parser().parse_args(["eval", "--think-window", "128"])
    assert cli._options(a).think_window == 128
    assert cli._options(cli.build_parser().parse_args(["eval"])).think_window == cli.DEF.THINK_WINDOW


def _fail_loading(monkeypatch):
    def fail(*a, **k):
        raise models.ModelLoadError("unknown model 'x':\n  not a registered name")

    monkeypatch.setattr(models, "load_model", fail)


def test_runtime_error_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("KVCOMP_DEBUG", raising=False)
    _fail_loading(monkeypatch)
    assert cli.main(["demo", "--methods", "full"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("kvcomp: error: unknown model 'x': not a registered name")


@pytest.mark.parametrize("argv,env", [
    (["--debug", "demo", "--methods", "full"], None),
    (["demo", "--methods", "full", "--debug"], None),
    (["demo", "--methods", "full"], "1"),
])
def test_debug_shows_the_traceback(argv, env, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv("KVCOMP_DEBUG", raising=False)
    else:
        monkeypatch.setenv("KVCOMP_DEBUG", env)
    _fail_loading(monkeypatch)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ModelLoadError" in err


def test_unexpected_exception_names_its_type(monkeypatch, capsys):
    monkeypatch.delenv("KVCOMP_DEBUG", raising=False)

    def bug(*a, **k):
        raise KeyError("layers")

    monkeypatch.setattr(models, "load_model", bug)
    assert cli.main(["demo", "--methods", "full"]) == 2
    assert capsys.readouterr().err.startswith("kvcomp: error: KeyError: 'layers'")


def test_command_line_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVCOMP_DEBUG"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "kvcomp.cli", *args], capture_output=True,  # noqa: E731
                                       text=True, env=env, timeout=120)
    r = run("eval", "--context-lens", "abc")
    assert r.returncode == 2 and "argument --context-lens" in r.stderr and "Traceback" not in r.stderr
    r = run("demo", "--methods", "full", "--model", str(tmp_path / "no-such-model"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kvcomp: error: unknown model")


def test_global_duo_threshold_with_another_method_refused_before_loading(monkeypatch, capsys):
    monkeypatch.delenv("KVCOMP_DEBUG", raising=False)
    _fail_loading(monkeypatch)  # reaching the model load would print "unknown model"
    assert cli.main(["vllm-config", "--method", "duo+think", "--duo-threshold", "global", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "--duo-threshold global is served for DuoAttention alone" in err and "--duo-threshold layer" in err
    assert cli.main(["vllm-config", "--method", "duo", "--duo-threshold", "global", "--out", "x"]) == 2
    assert "unknown model" in capsys.readouterr().err  # accepted: went on to load the model


def test_oracle_selection_refused_by_vllm_config_before_loading(monkeypatch, capsys):
    monkeypatch.delenv("KVCOMP_DEBUG", raising=False)
    _fail_loading(monkeypatch)
    assert cli.main(["vllm-config", "--method", "vq", "--vq-select", "oracle", "--out", "x"]) == 2
    assert "analysis baseline" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["eval", "--vq-select", "oracle"]).vq_select == "oracle"


def test_eval_think_channels_static_reaches_build_method(monkeypatch):
    """kvcomp eval --think-channels static builds ThinK with the static channels vLLM serves; query (the default)
    leaves them to each request; a bad value is refused by build_method before any calibration."""
    import torch

    import kvcomp.methods.named as named
    from kvcomp.methods import MethodOptions, build_method

    assert cli.build_parser().parse_args(["eval"]).think_channels == "query"
    assert cli.build_parser().parse_args(["eval", "--think-channels", "static"]).think_channels == "static"
    ch = torch.arange(48).expand(2, 3, 48).clone()
    monkeypatch.setattr(named, "static_think_channels", lambda *a, **k: ch)

    class M:
        config = types.SimpleNamespace(num_hidden_layers=2, num_key_value_heads=3, num_attention_heads=9,
                                       hidden_size=576, head_dim=64)

    static = build_method("think", M(), None, "smollm2-135m", MethodOptions(), think_channels="static")
    assert static.think.channels is ch
    assert build_method("think", M(), None, "smollm2-135m", MethodOptions()).think.channels is None
    with pytest.raises(ValueError, match="think_channels"):
        build_method("think", M(), None, "smollm2-135m", MethodOptions(), think_channels="calibrated")
