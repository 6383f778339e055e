#!/usr/bin/env python3
"""The external client of `llamapool-bench --vs-llama-server` (bench/src/external.rs).

A separate process that drives a server the way users do: Python 3, standard library only
(threads and http.client). It sends the same streamed /v1/completions requests as the
bench's built-in Rust client (`completion_body` in bench/src/main.rs, byte for byte: token-id
prompt, `max_tokens`, `temperature` 0, `ignore_eos`, `stream` with a final usage chunk) and
measures them the same way (`http_request` in bench/src/stages.rs).

    python3 stream_client.py HOST:PORT MODEL CONCURRENCY MAX_TOKENS [PROMPTS.json | -]

PROMPTS is a JSON list of prompts, each a list of token ids (default `-`: read from stdin).
CONCURRENCY threads each take the next prompt and send it on a fresh HTTPConnection
(`Connection: close`), one request at a time.

Prints one JSON object on stdout; every time is in seconds (float):
    {"unit": "s", "wall_s": W, "records": [{"ok", "tokens", "ttft_s", "e2e_s", "itls_s",
     "error"}, ...]}
one record per prompt, in prompt order. `wall_s` runs from just before the first request to
the end of the last one: the interpreter's start and the reading of the prompts are outside
it (they happen before the load, as with a real client next to a server). A record is `ok`
when the stream ended with [DONE] after exactly MAX_TOKENS tokens (the usage chunk's
completion_tokens when sent, else the count of content chunks); TTFT is to the first chunk
with text, the ITLs the gaps between successive chunks with text. A failed request has
`ok` false, zero times and its `error`, and is reported on stderr.
"""

import argparse
import http.client
import json
import sys
import threading
import time


def completion_body(model, prompt, max_tokens):
    """The Rust client's body: serde_json sorts keys and writes no spaces."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def failed(error):
    return {"ok": False, "tokens": 0, "ttft_s": 0.0, "e2e_s": 0.0, "itls_s": [], "error": error}


def request(host, port, model, prompt, max_tokens):
    """One streamed request; its record, or raises on a protocol or HTTP error."""
    body = completion_body(model, prompt, max_tokens)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request(
            "POST",
            "/v1/completions",
            body=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(2000)!r}")
        ttft = 0.0
        itls = []
        last = None
        chunks = 0
        usage_tokens = None
        while True:
            line = resp.readline()
            if not line:
                raise RuntimeError("the stream ended without [DONE]")
            line = line.rstrip(b"\r\n")
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                tokens = usage_tokens if usage_tokens is not None else chunks
                return {
                    "ok": tokens == max_tokens,
                    "tokens": tokens,
                    "ttft_s": ttft,
                    "e2e_s": now - start,
                    "itls_s": itls,
                }
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            usage = chunk.get("usage") or {}
            if isinstance(usage.get("completion_tokens"), int):
                usage_tokens = usage["completion_tokens"]
            choices = chunk.get("choices") or [{}]
            if choices[0].get("text"):
                if last is None:
                    ttft = now - start
                else:
                    itls.append(now - last)
                last = now
                chunks += 1
    finally:
        conn.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addr", help="HOST:PORT")
    parser.add_argument("model")
    parser.add_argument("concurrency", type=int)
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("prompts", nargs="?", default="-", help="JSON file, or - for stdin")
    args = parser.parse_args()
    host, _, port = args.addr.rpartition(":")
    if args.prompts == "-":
        prompts = json.load(sys.stdin)
    else:
        with open(args.prompts) as f:
            prompts = json.load(f)

    records = [None] * len(prompts)
    lock = threading.Lock()
    next_index = [0]

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(prompts):
                return
            try:
                record = request(host, int(port), args.model, prompts[i], args.max_tokens)
            except Exception as e:  # noqa: BLE001 -- every failure is a failed request
                print(f"request {i} failed: {e!r}", file=sys.stderr)
                record = failed(repr(e))
            records[i] = record

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    json.dump({"unit": "s", "wall_s": wall, "records": records}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
