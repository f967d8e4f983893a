"""Load generator and metrics of ``kvcomp bench serve``: N concurrent streaming completions against
vLLM's OpenAI server, every streamed chunk time-stamped; standard library only.

The server streams one chunk per engine step and request with the step's token ids
(``return_token_ids``), so each token gets the time its chunk arrived. From those:

- **TTFT** of a request: first token's arrival minus the time every request was sent (together);
- **decode window**: from the moment the last request got its first token until the first request
  got its last one — every request is decoding — and the **decode tokens/s** inside it;
- **end-to-end tokens/s**: all output tokens over the time from sending to the last token.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One request's timeline: send time and ``(arrival, n_tokens)`` per streamed chunk."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def first(self) -> float | None:
        return next((t for t, n in self.chunks if n), None)

    @property
    def last(self) -> float | None:
        return next((t for t, n in reversed(self.chunks) if n), None)


def _stream_one(host: str, port: int, body: dict, out: Stream, timeout: float) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            msg = json.loads(data)
            ids = [t for c in msg.get("choices", ()) for t in (c.get("token_ids") or ())]
            out.chunks.append((now, len(ids)))
            out.token_ids.extend(ids)
    except Exception as e:  # recorded per request; the run reports it
        out.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def run_load(host: str, port: int, model: str, prompts: list[list[int]], max_tokens: int,
             timeout: float = 3600.0) -> list[Stream]:
    """Send every prompt at once (greedy, ``max_tokens`` output tokens, EOS ignored) and wait for all."""
    t0 = time.perf_counter()
    streams = [Stream(sent=t0) for _ in prompts]
    threads = []
    for p, s in zip(prompts, streams):
        body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        th = threading.Thread(target=_stream_one, args=(host, port, body, s, timeout), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return streams


def metrics(streams: list[Stream]) -> dict:
    """TTFT, decode-window and end-to-end throughput of one load (see the module doc).

    ``decode_tokens_per_s`` is None when no window exists (a request finished before the last
    one started decoding: too few output tokens for the concurrency)."""
    bad = [s.error for s in streams if s.error]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(streams)} requests failed: {bad[0]}")
    if any(s.first is None for s in streams):
        raise RuntimeError("a request streamed no tokens")
    t0 = min(s.sent for s in streams)
    ttft = [s.first - s.sent for s in streams]
    start, end = max(s.first for s in streams), min(s.last for s in streams)
    n_out = sum(len(s.token_ids) for s in streams)
    window = None
    if end > start:
        n_win = sum(n for s in streams for t, n in s.chunks if start < t <= end)
        window = n_win / (end - start)
    total = max(s.last for s in streams) - t0
    return {"ttft_s": sum(ttft) / len(ttft), "ttft_max_s": max(ttft), "decode_window_s": max(end - start, 0.0),
            "decode_tokens_per_s": window, "e2e_tokens_per_s": n_out / total if total > 0 else None,
            "wall_s": total, "output_tokens": n_out}


def wait_ready(host: str, port: int, alive, timeout: float) -> None:
    """Poll ``/health`` until the server answers 200; ``alive()`` False (the process died) or the
    timeout raises."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive():
            raise RuntimeError("the vLLM server exited before it was ready")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server was not ready after {timeout:.0f} s")
