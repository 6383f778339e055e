#!/usr/bin/env python3
"""Several models, side by side: llamapool's router against llama-server's router mode.

Both servers get the same folder of models (default: SmolLM2-135M and Gemma 3 270M from
the setup cache, linked into a temporary folder) with `--models-dir DIR --models-max 1`, and
are measured one after the other, never at the same time:

    llama-server   LD_LIBRARY_PATH=ANCHOR ANCHOR/llama-server --models-dir DIR
                   --models-max 1 --host 127.0.0.1 --port X -t 2 -np 4 -c 4096
                   (router mode: one child llama-server per loaded model, with these
                   settings)
    llamapool      ROUTER --models-dir DIR --models-max 1 --listen 127.0.0.1:Y
                   (the default layout for each model: one adaptive worker per core)

Measured, through POST /v1/chat/completions (streamed, greedy, `max_tokens` 8):

  cold        for each model, a fresh server and its first request: time to the first
              content token, which includes starting the model (R runs, median);
  swap        on one server, requests alternating between the two models (--swaps, 8),
              each one swapping the loaded model: time to first token and whole request
              time, median over the swaps of each model;
  warm        the same request to the loaded model again (no swap), for scale;
  idle-twin   llamapool only: throughput of SmolLM2 served alone (`-m SMOL`) and as one of
              two models (`--models-dir`, `--models-max 2`), the other configured but never
              loaded, or loaded and then idle,
              C (--concurrency, 8) clients sending N (--requests, 32) requests of 64
              tokens: generated tokens/s, R runs, median; the ratio says whether
              configuring a second model costs the first anything.

Usage (Python 3 standard library only):

    python3 bench/models_vs_llama_server.py [--anchor DIR] [--router PATH]
        [--models GGUF,GGUF] [--swaps N] [--repeat R] [--requests N]
        [--concurrency C] [--only llama-server|llamapool] [--skip-idle-twin]
        [--idle-twin-only] [--json OUT]

Exit status: 0 when every request succeeded, 1 otherwise (what was measured is printed).
"""

import argparse
import atexit
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from servers import Server, anchor_env, free_port, on_sigterm, stop_all

LS, LP = "llama-server", "llamapool"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLAMAPOOL_MODELS", Path.home() / ".cache/llamapool/models"))
DEFAULT_MODELS = [CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf",
                  CACHE / "gemma-3-270m-q4_k_m.gguf"]
PROMPT = "Write one sentence about the sea."


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchor", type=Path,
                   default=Path(os.environ.get("LP_ANCHOR", Path.home() / ".cache/lp-anchor")))
    p.add_argument("--router", type=Path, default=ROOT / "target/release/llamapool-router")
    p.add_argument("--models", default=",".join(str(m) for m in DEFAULT_MODELS))
    p.add_argument("--swaps", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--only", choices=[LS, LP])
    p.add_argument("--skip-idle-twin", action="store_true")
    p.add_argument("--idle-twin-only", action="store_true",
                   help="measure only llamapool's throughput alone and beside an idle model")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def argv_for(args, label, models_dir, port, models_max=1):
    if label == LS:
        return ([str(args.anchor / "llama-server"), "--models-dir", str(models_dir),
                 "--models-max", str(models_max), "--host", "127.0.0.1", "--port", str(port),
                 "-t", "2", "-np", "4", "-c", "4096"], anchor_env(args.anchor))
    return ([str(args.router), "--models-dir", str(models_dir), "--models-max",
             str(models_max), "--listen", f"127.0.0.1:{port}"], None)


def start(label, argv, env, port):
    server = Server(label, argv, port, env=env, stop_grace=30)
    why = server.wait_healthy(120)
    if why:
        tail = "\n".join(server.tail(30))
        server.stop()
        raise RuntimeError(f"{label} did not start: {why}\n{tail}")
    return server


def timed_chat(port, model, max_tokens=8, timeout=300):
    """(seconds to the first content token, seconds in all) of one streamed chat."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    first = None
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{model}: HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            try:
                delta = json.loads(line[6:])["choices"][0]["delta"]
            except (ValueError, KeyError, IndexError):
                continue
            if first is None and delta.get("content"):
                first = time.perf_counter() - t0
    finally:
        conn.close()
    total = time.perf_counter() - t0
    return (first if first is not None else total), total


def model_ids(models):
    return [Path(m).name.removesuffix(".gguf") for m in models]


def measure_cold(args, label, models_dir, ids):
    out = {}
    for model in ids:
        runs = []
        for _ in range(args.repeat):
            port = free_port()
            argv, env = argv_for(args, label, models_dir, port)
            server = start(label, argv, env, port)
            try:
                runs.append(timed_chat(port, model)[0])
            finally:
                server.stop()
        out[model] = {"runs": runs, "median_ttft_s": statistics.median(runs)}
    return out


def measure_swaps(args, label, models_dir, ids):
    port = free_port()
    argv, env = argv_for(args, label, models_dir, port)
    server = start(label, argv, env, port)
    try:
        timed_chat(port, ids[-1])  # the last model loaded first, so the first swap loads ids[0]
        swaps = {m: [] for m in ids}
        warm = {m: [] for m in ids}
        for i in range(args.swaps):
            model = ids[i % len(ids)]
            swaps[model].append(timed_chat(port, model))
            warm[model].append(timed_chat(port, model))
    finally:
        server.stop()
    summary = lambda runs: {  # noqa: E731
        "runs": runs,
        "median_ttft_s": statistics.median(r[0] for r in runs),
        "median_total_s": statistics.median(r[1] for r in runs),
    }
    return {"swap": {m: summary(r) for m, r in swaps.items()},
            "warm": {m: summary(r) for m, r in warm.items()}}


def throughput(port, model, requests, concurrency):
    """Generated tokens per second of `requests` 64-token chats from `concurrency` threads."""
    body = json.dumps({"model": model, "max_tokens": 64, "temperature": 0,
                       "ignore_eos": True,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()
    lock = threading.Lock()
    state = {"left": requests, "tokens": 0, "errors": 0}

    def client():
        while True:
            with lock:
                if state["left"] == 0:
                    return
                state["left"] -= 1
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                conn.request("POST", "/v1/chat/completions", body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                doc = json.loads(resp.read())
                with lock:
                    if resp.status == 200:
                        state["tokens"] += doc["usage"]["completion_tokens"]
                    else:
                        state["errors"] += 1
            finally:
                conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["errors"]:
        raise RuntimeError(f"{state['errors']} requests failed")
    return state["tokens"] / (time.perf_counter() - t0)


def wait_workers_ready(port, model, timeout=60):
    """Waits until every worker of `model` is ready (a model loaded on demand answers its
    first request once its first worker is; the others follow within a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", f"/workers?model={model}")
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            if resp.status == 200 and all(w["state"] == "ready" for w in doc["workers"]):
                return
        except (OSError, ValueError, KeyError):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"the workers of {model} were not all ready within {timeout} s")


def measure_idle_twin(args, models, models_dir, ids):
    """SmolLM2's throughput alone, beside a second model configured but never loaded, and
    beside a second model loaded and then idle (shapes alternate within each repeat)."""
    shapes = ("alone", "twin_configured", "twin_loaded_idle")
    runs = {shape: [] for shape in shapes}
    for _ in range(args.repeat):
        for shape in shapes:
            port = free_port()
            if shape == "alone":
                argv = [str(args.router), "-m", str(models[0]), "--alias", ids[0],
                        "--listen", f"127.0.0.1:{port}"]
            else:
                argv = argv_for(args, LP, models_dir, port, models_max=2)[0]
            server = start(LP, argv, None, port)
            try:
                if shape == "twin_loaded_idle":
                    timed_chat(port, ids[1])  # the twin is loaded, then left idle
                    wait_workers_ready(port, ids[1])
                timed_chat(port, ids[0])  # load and warm up
                # Measured with every worker up, as the single-model server is once healthy.
                wait_workers_ready(port, ids[0])
                runs[shape].append(throughput(port, ids[0], args.requests, args.concurrency))
            finally:
                server.stop()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"runs": runs, "median_tokens_per_s": med,
            "ratio_configured": med["twin_configured"] / med["alone"],
            "ratio_loaded_idle": med["twin_loaded_idle"] / med["alone"]}


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(stop_all)
    models = [Path(m) for m in args.models.split(",")]
    ids = model_ids(models)
    result = {"models": ids, "repeat": args.repeat, "swaps": args.swaps, "servers": {}}
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        models_dir = Path(tmp)
        for m in models:
            (models_dir / m.name).symlink_to(m.resolve())
        labels = [args.only] if args.only else [LS, LP]
        for label in ([] if args.idle_twin_only else labels):
            try:
                result["servers"][label] = {
                    "cold": measure_cold(args, label, models_dir, ids),
                    **measure_swaps(args, label, models_dir, ids),
                }
            except (RuntimeError, OSError) as e:
                print(f"{label}: {e}", file=sys.stderr)
                ok = False
        if not args.skip_idle_twin and args.only != LS:
            try:
                result["idle_twin"] = measure_idle_twin(args, models, models_dir, ids)
            except (RuntimeError, OSError) as e:
                print(f"idle twin: {e}", file=sys.stderr)
                ok = False
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


def report(result):
    servers = result["servers"]
    print(f"models: {', '.join(result['models'])}; medians of {result['repeat']} cold "
          f"starts and {result['swaps']} swaps")
    print(f"{'model':32} {'measure':24} " + " ".join(f"{s:>13}" for s in servers)
          + ("   ratio" if len(servers) == 2 else ""))
    rows = []
    for model in (result["models"] if servers else []):
        rows.append((model, "cold: first token s",
                     [servers[s]["cold"][model]["median_ttft_s"] for s in servers]))
        rows.append((model, "swap: first token s",
                     [servers[s]["swap"][model]["median_ttft_s"] for s in servers]))
        rows.append((model, "swap: whole request s",
                     [servers[s]["swap"][model]["median_total_s"] for s in servers]))
        rows.append((model, "warm: first token s",
                     [servers[s]["warm"][model]["median_ttft_s"] for s in servers]))
    for model, what, values in rows:
        line = f"{model:32} {what:24} " + " ".join(f"{v:13.3f}" for v in values)
        if len(values) == 2 and values[0] > 0:
            line += f"   {values[1] / values[0]:.2f}"
        print(line)
    twin = result.get("idle_twin")
    if twin:
        med = twin["median_tokens_per_s"]
        print(f"llamapool {result['models'][0]}: alone {med['alone']:.1f} tokens/s; beside a "
              f"second model configured, not loaded {med['twin_configured']:.1f} "
              f"({twin['ratio_configured']:.2f}); beside it loaded and idle "
              f"{med['twin_loaded_idle']:.1f} ({twin['ratio_loaded_idle']:.2f})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
