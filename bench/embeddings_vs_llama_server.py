#!/usr/bin/env python3
"""Embeddings, side by side: llamapool against llama-server (agreement and throughput).

For each pooling type (default `mean,last`) and each of R repeats, this starts the real
llama-server, measures it, stops it, then starts llamapool-router with the same model and
pooling, measures it the same way, and stops it. The two servers never run at the same
time. Each server is started on a free loopback port, in its own process group, with its
output in a log file in a temporary directory; the script waits for GET /health to answer
200 (a server that exits or never becomes healthy is reported with the last 30 lines of
its log, and the run goes on with the other server). Servers are stopped with SIGTERM to
their whole process tree, then SIGKILL after 30 s, also on errors, Ctrl-C and SIGTERM.

    llama-server     LD_LIBRARY_PATH=ANCHOR ANCHOR/llama-server -m MODEL --embedding
                     --pooling P --host 127.0.0.1 --port X -t 2 -np 4 -c 4096 -ub 512 -b 512
    llamapool        ROUTER -m MODEL --embedding --pooling P --listen 127.0.0.1:Y
                     (the router takes llama-server's flags; its default pool is one
                     pinned worker per core)

Measurements, all through POST /v1/embeddings (OpenAI shape: {"data": [{"embedding": [...],
"index": i, "object": "embedding"}], "usage": {"prompt_tokens": n, ...}, ...}):

  agreement    a fixed list of ~20 varied texts (short, ~200 words, unicode, code), sent
               once as one batch ({"input": [texts]}) and once one by one ({"input":
               text}); on the first run of each server per pooling. Reported: per text the
               cosine similarity of llama-server's and llamapool's vectors (min and mean,
               batch and single), the largest absolute element difference, whether every
               vector is L2-normalised (|norm - 1| <= 1e-3), whether batch and single
               vectors of the same server agree, and whether usage.prompt_tokens matches
               (for the batch and per text). llama-server's single vectors are the
               reference: its batch vectors can differ from them under mean pooling
               (several sequences decoded together), which the "batch vs single" row of
               the vectors table shows, so llamapool's batch vectors are also compared
               with llama-server's single ones.
  single       N (--requests, 200) single-string requests, texts of ~30-60 tokens built
               deterministically (each one different), C (--concurrency, 8) client threads,
               each with its own keep-alive connection. Reported: requests/s, input
               tokens/s (from usage.prompt_tokens), latency p50/p95.
  batch        --batch-requests (20) requests of --batch-size (32) strings each, with
               --batch-concurrency (2) threads. Reported: embeddings/s, input tokens/s.

A few warm-up requests (--warmup) go to each server before the timed parts. With
--repeat R > 1 every run is listed and the tables show the median per server; the ratio
column is llamapool / llama-server (above 1 is better for llamapool in rates, worse in
latencies).

Usage (from anywhere; Python 3 standard library only):

    python3 bench/embeddings_vs_llama_server.py [--anchor DIR] [--router PATH]
        [--model GGUF] [--pooling mean,last] [--only llama-server|llamapool]
        [--requests N] [--concurrency C] [--batch-requests N] [--batch-size K]
        [--batch-concurrency C] [--warmup N] [--repeat R] [--json OUT]

    --anchor DIR     the llama.cpp build with llama-server and its shared libraries
                     (default $LP_ANCHOR or ~/.cache/lp-anchor)
    --router PATH    llamapool-router (default target/release/llamapool-router under the
                     repository root)
    --model GGUF     default ~/.cache/llamapool/models/SmolLM2-135M-Instruct.Q4_1.gguf
    --only SERVER    measure one server alone (no agreement or ratio then)
    --ls-arg A / --lp-arg A   extra arguments for llama-server / llamapool (repeatable;
                     write --ls-arg=-fa to pass one that starts with a dash)
    --json OUT       also write everything (configuration, every run, medians, the
                     per-text agreement figures) as JSON

Exit status: 0 when every server started and answered; 1 when a server failed to start or
some requests failed (the figures that could be measured are still printed); 2 on bad
arguments.
"""

import argparse
import atexit
import http.client
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from servers import Server, anchor_env, free_port, on_sigterm, stop_all

REPO_ROOT = Path(__file__).resolve().parent.parent

LS = "llama-server"
LP = "llamapool"
SERVERS = (LS, LP)

HEALTH_TIMEOUT_S = 180.0
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 30
NORM_TOLERANCE = 1e-3

# ---------------------------------------------------------------------------------------
# Texts.

LONG_TEXT = (
    "The history of computing is often told as a sequence of machines, each faster and "
    "smaller than the one before, but it is just as much a history of ideas about what "
    "a computation is and who gets to perform it. Early mechanical calculators could add "
    "and multiply, yet they had no notion of a stored program; the instructions lived in "
    "the operator's head. When Babbage sketched the Analytical Engine he separated the "
    "store from the mill, and Ada Lovelace saw that such a machine might manipulate "
    "symbols of any kind, not only numbers. A century later, Turing gave the idea a "
    "precise form, and the engineers of the nineteen forties turned it into hardware "
    "built from relays, vacuum tubes and, soon, transistors. Each step changed who could "
    "use a computer: first governments and universities, then banks and airlines, then "
    "offices, homes and finally pockets. Programming languages followed the same arc, "
    "moving from machine code to assemblers, compilers and interpreters that let people "
    "describe what they wanted rather than how the wires should switch. Today a single "
    "phone holds more memory than every computer of 1960 combined, and the questions "
    "have shifted again, towards networks, data, privacy and the models that learn from "
    "the text we write. The machines keep changing, but the old question remains: what "
    "should we ask them to do, and how will we know they did it well?"
)

AGREEMENT_TEXTS = [
    "Hello",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I love this product, it works perfectly and arrived on time!",
    "This was the worst purchase I have ever made. Never again.",
    LONG_TEXT,
    "Machine learning models map inputs to outputs by fitting parameters to data; "
    "embeddings are dense vectors that place similar items close together.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Ça va très bien, merci !",
    "Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München.",
    "敏捷的棕色狐狸跳过了懒狗。今天天气很好。",
    "素早い茶色の狐が怠け者の犬を飛び越える。",
    "Привет, как дела? Всё хорошо, спасибо.",
    "🙂🚀 emoji test ✨ — naïve café façade",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib(10))",
    "fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n"
    "    println!(\"{:?}\", v);\n}",
    "{\"name\": \"llamapool\", \"version\": \"0.1.0\", \"tags\": [\"llm\", \"server\"]}",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "   leading and trailing spaces\tand a tab   \n\nand blank lines\n",
    "3.14159 2.71828 1.41421 42 1e-9 0xFF",
]

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work "
    "week case point government company number group problem fact be have do say get make "
    "go know take see come think look want give use find tell ask seem feel try leave call "
    "good new first last long great little own other old right big high different small "
    "large next early young important few public bad same able river mountain city market "
    "music language history science garden kitchen window morning evening winter summer "
    "quickly slowly often never always together however because although while before after"
).split()


def load_texts(count, seed, first_word):
    """`count` deterministic, pairwise different texts of 24-46 words (~30-60 tokens)."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        n = rng.randint(24, 46)
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        texts.append(f"{first_word} {i}: " + " ".join(words) + ".")
    return texts


# ---------------------------------------------------------------------------------------
# Processes.


def server_argv(args, label, pooling, port):
    """(argv, env) for one server."""
    if label == LS:
        argv = [str(args.anchor / "llama-server"), "-m", str(args.model), "--embedding",
                "--pooling", pooling, "--host", "127.0.0.1", "--port", str(port),
                "-t", str(args.ls_threads), "-np", str(args.ls_parallel),
                "-c", str(args.ls_context), "-ub", "512", "-b", "512"] + args.ls_arg
        return argv, anchor_env(args.anchor)
    argv = [str(args.router), "-m", str(args.model), "--embedding", "--pooling", pooling,
            "--listen", f"127.0.0.1:{port}"] + args.lp_arg
    return argv, None


# ---------------------------------------------------------------------------------------
# HTTP.


class RequestError(Exception):
    pass


class Client:
    """A keep-alive connection to one server's /v1/embeddings (one per thread)."""

    def __init__(self, port, timeout, model_name=None):
        self.port = port
        self.timeout = timeout
        self.model_name = model_name
        self.conn = None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def embed(self, inp):
        """(vectors in input order, usage.prompt_tokens or None); raises RequestError."""
        body = {"input": inp}
        if self.model_name:
            body["model"] = self.model_name
        data = json.dumps(body).encode()
        n_inputs = len(inp) if isinstance(inp, list) else 1
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                   timeout=self.timeout)
        try:
            self.conn.request("POST", "/v1/embeddings", body=data,
                              headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise RequestError(f"{type(e).__name__}: {e}") from None
        if resp.status != 200:
            raise RequestError(f"HTTP {resp.status}: {text[:300]}")
        try:
            doc = json.loads(text)
            items = sorted(doc["data"], key=lambda d: d["index"])
            vectors = [item["embedding"] for item in items]
        except (ValueError, KeyError, TypeError) as e:
            raise RequestError(f"malformed response ({e!r}): {text[:300]}") from None
        if len(vectors) != n_inputs or [d["index"] for d in items] != list(range(n_inputs)):
            raise RequestError(f"{len(vectors)} embeddings for {n_inputs} inputs")
        if not vectors or not isinstance(vectors[0], list) or not vectors[0]:
            raise RequestError(f"empty or non-list embedding: {text[:300]}")
        usage = doc.get("usage") or {}
        tokens = usage.get("prompt_tokens")
        return vectors, (tokens if isinstance(tokens, int) else None)


# ---------------------------------------------------------------------------------------
# Measurements.


def measure_agreement_vectors(port, timeout, model_name):
    """The agreement texts' vectors, as one batch and one by one, with token counts."""
    client = Client(port, timeout, model_name)
    try:
        batch, batch_tokens = client.embed(AGREEMENT_TEXTS)
        single, single_tokens = [], []
        for text in AGREEMENT_TEXTS:
            vecs, tokens = client.embed(text)
            single.append(vecs[0])
            single_tokens.append(tokens)
    finally:
        client.close()
    return {"batch": batch, "batch_tokens": batch_tokens,
            "single": single, "single_tokens": single_tokens}


def run_load(port, inputs, concurrency, timeout, model_name):
    """Sends every element of `inputs` (a string or a list of strings) once, from
    `concurrency` threads with a keep-alive connection each; returns the figures."""
    lock = threading.Lock()
    next_index = [0]
    latencies, errors = [], []
    totals = {"ok": 0, "embeddings": 0, "tokens": 0, "tokens_missing": 0}

    def worker():
        client = Client(port, timeout, model_name)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= len(inputs):
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    vectors, tokens = client.embed(inputs[i])
                except RequestError as e:
                    with lock:
                        errors.append(str(e))
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    totals["ok"] += 1
                    totals["embeddings"] += len(vectors)
                    if tokens is None:
                        totals["tokens_missing"] += 1
                    else:
                        totals["tokens"] += tokens
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True)
               for _ in range(min(concurrency, len(inputs)))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(inputs), "ok": totals["ok"], "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": wall,
        "requests_per_s": totals["ok"] / wall if wall > 0 else None,
        "embeddings_per_s": totals["embeddings"] / wall if wall > 0 else None,
        "tokens": totals["tokens"],
        "tokens_per_s": (totals["tokens"] / wall
                         if wall > 0 and not totals["tokens_missing"] else None),
        "latency_p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
        "latency_p95_ms": percentile(latencies, 95) * 1e3 if latencies else None,
    }


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def norm(v):
    return math.sqrt(math.fsum(x * x for x in v))


def cosine(a, b):
    if len(a) != len(b):
        return None
    na, nb = norm(a), norm(b)
    if na == 0 or nb == 0:
        return None
    return math.fsum(x * y for x, y in zip(a, b)) / (na * nb)


def max_abs_diff(a, b):
    if len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def vector_summary(vectors):
    """Whether one server's agreement vectors are L2-normalised, and their dimension."""
    norms = [norm(v) for v in vectors["batch"] + vectors["single"]]
    dims = sorted({len(v) for v in vectors["batch"] + vectors["single"]})
    self_cos = [cosine(a, b) for a, b in zip(vectors["batch"], vectors["single"])]
    return {
        "dims": dims,
        "normalised": all(abs(n - 1) <= NORM_TOLERANCE for n in norms),
        "norm_min": min(norms), "norm_max": max(norms),
        "batch_vs_single_min_cosine": min_or_none(self_cos),
        "batch_vs_single_cosine": self_cos,
        "batch_tokens": vectors["batch_tokens"],
        "single_tokens_sum": (sum(vectors["single_tokens"])
                              if None not in vectors["single_tokens"] else None),
    }


def min_or_none(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def compare_vectors(ls, lp):
    """Cross-server agreement of the agreement texts' vectors."""
    out = {"per_text": []}
    for mode in ("batch", "single"):
        cos = [cosine(a, b) for a, b in zip(ls[mode], lp[mode])]
        diff = [max_abs_diff(a, b) for a, b in zip(ls[mode], lp[mode])]
        out[f"{mode}_cosine_min"] = min_or_none(cos)
        out[f"{mode}_cosine_mean"] = mean_or_none(cos)
        out[f"{mode}_max_abs_diff"] = max((d for d in diff if d is not None), default=None)
        out[f"{mode}_dimension_mismatches"] = sum(1 for c in cos if c is None)
        for i, (c, d) in enumerate(zip(cos, diff)):
            if mode == "batch":
                out["per_text"].append({"text": AGREEMENT_TEXTS[i][:60]})
            out["per_text"][i][f"{mode}_cosine"] = c
            out["per_text"][i][f"{mode}_max_abs_diff"] = d
    # llama-server's own batch vectors can differ from its single ones (mean pooling of
    # several sequences decoded together), so llamapool's batch vectors are also held
    # against llama-server's single ones, the reference.
    cos = [cosine(a, b) for a, b in zip(ls["single"], lp["batch"])]
    out["lp_batch_vs_ls_single_cosine_min"] = min_or_none(cos)
    out["lp_batch_vs_ls_single_cosine_mean"] = mean_or_none(cos)
    for i, c in enumerate(cos):
        out["per_text"][i]["lp_batch_vs_ls_single_cosine"] = c
    for i, (a, b) in enumerate(zip(ls["single_tokens"], lp["single_tokens"])):
        out["per_text"][i]["prompt_tokens"] = {LS: a, LP: b}
    out["prompt_tokens_per_text_equal"] = sum(
        1 for a, b in zip(ls["single_tokens"], lp["single_tokens"]) if a == b)
    out["prompt_tokens_batch"] = {LS: ls["batch_tokens"], LP: lp["batch_tokens"]}
    out["worst_text"] = None
    worst = [(c["single_cosine"], i) for i, c in enumerate(out["per_text"])
             if c["single_cosine"] is not None]
    if worst:
        c, i = min(worst)
        out["worst_text"] = {"index": i, "text": AGREEMENT_TEXTS[i][:60], "cosine": c}
    return out


# ---------------------------------------------------------------------------------------
# One run of one server.


def measure_server(args, label, pooling, run, log_dir, want_vectors):
    """Starts one server, measures it, stops it; returns the run's record."""
    port = free_port()
    argv, env = server_argv(args, label, pooling, port)
    log_path = log_dir / f"{label}-{pooling}-run{run}.log"
    record = {"server": label, "pooling": pooling, "run": run, "argv": argv,
              "log": str(log_path), "error": None}
    print(f"[{pooling} run {run}] starting {label} on port {port}", flush=True)
    t0 = time.monotonic()
    try:
        server = Server(label, argv, port, log_path, env, stop_grace=STOP_GRACE_S)
    except OSError as e:
        record["error"] = f"could not start: {e}"
        print(f"  {label} could not start: {e}", file=sys.stderr, flush=True)
        return record, None
    try:
        why = server.wait_healthy(args.health_timeout)
        if why:
            record["error"] = f"not healthy: {why}"
            record["log_tail"] = server.tail(LOG_TAIL_LINES)
            print(f"  {label} failed to start ({why}); last {LOG_TAIL_LINES} lines of "
                  f"{log_path}:", file=sys.stderr)
            for line in record["log_tail"]:
                print(f"    | {line}", file=sys.stderr)
            sys.stderr.flush()
            return record, None
        record["startup_s"] = time.monotonic() - t0
        timeout = args.timeout
        name = args.request_model

        # Warm-up: a few single requests and one small batch, not timed.
        warm = run_load(port, load_texts(args.warmup, 7, "Warm-up"), min(2, args.warmup),
                        timeout, name) if args.warmup else None
        if args.warmup:
            run_load(port, [load_texts(8, 8, "Warm-up batch")], 1, timeout, name)
        if warm and warm["ok"] == 0:
            record["error"] = f"warm-up failed: {warm['first_error']}"
            print(f"  {label}: warm-up failed: {warm['first_error']}", file=sys.stderr)
            record["log_tail"] = server.tail(LOG_TAIL_LINES)
            return record, None

        vectors = None
        if want_vectors:
            try:
                vectors = measure_agreement_vectors(port, timeout, name)
                record["vectors"] = vector_summary(vectors)
            except RequestError as e:
                record["agreement_error"] = str(e)
                print(f"  {label}: agreement requests failed: {e}", file=sys.stderr)

        singles = load_texts(args.requests, 1, "Request")
        record["single"] = run_load(port, singles, args.concurrency, timeout, name)
        batches = [load_texts(args.batch_size, 1000 + i, f"Batch {i}")
                   for i in range(args.batch_requests)]
        record["batch"] = run_load(port, batches, args.batch_concurrency, timeout, name)
        for part in ("single", "batch"):
            r = record[part]
            if r["errors"]:
                print(f"  {label} {part}: {r['errors']} of {r['requests']} requests "
                      f"failed; first: {r['first_error']}", file=sys.stderr)
        s, b = record["single"], record["batch"]
        print(f"  {label}: single {fmt(s['requests_per_s'])} req/s, "
              f"{fmt(s['tokens_per_s'])} tok/s, p50 {fmt(s['latency_p50_ms'])} ms; "
              f"batch {fmt(b['embeddings_per_s'])} emb/s", flush=True)
        return record, vectors
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# Report.

# (label, part, key, higher is better)
METRICS = [
    ("single: requests/s", "single", "requests_per_s", True),
    ("single: input tokens/s", "single", "tokens_per_s", True),
    ("single: latency p50 (ms)", "single", "latency_p50_ms", False),
    ("single: latency p95 (ms)", "single", "latency_p95_ms", False),
    ("batch: embeddings/s", "batch", "embeddings_per_s", True),
    ("batch: input tokens/s", "batch", "tokens_per_s", True),
    ("batch: latency p50 (ms)", "batch", "latency_p50_ms", False),
    ("failed requests (all runs)", None, "errors", False),
]


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def metric_value(record, part, key):
    if record.get("error"):
        return None
    if part is None:
        return sum(record[p][key] for p in ("single", "batch") if p in record)
    return record.get(part, {}).get(key)


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(records, servers):
    """{metric label: {server: median over the runs}}; failed requests are summed."""
    out = {}
    for label, part, key, _ in METRICS:
        combine = median_or_none if part else sum_or_none
        out[label] = {s: combine([metric_value(r, part, key)
                                  for r in records if r["server"] == s])
                      for s in servers}
    return out


def sum_or_none(values):
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def print_report(pooling, records, medians, agreement, servers, repeat):
    print()
    print(f"## pooling = {pooling}" + (f" (median of {repeat} runs)" if repeat > 1 else ""))
    print()
    if repeat > 1:
        for s in servers:
            runs = [r for r in records if r["server"] == s]
            line = "; ".join(
                f"run {r['run']}: " + ("failed" if r.get("error") else
                                       f"{fmt(metric_value(r, 'single', 'requests_per_s'))} "
                                       f"req/s, {fmt(metric_value(r, 'batch', 'embeddings_per_s'))}"
                                       " emb/s")
                for r in runs)
            print(f"- {s}: {line}")
        print()
    for r in records:
        if r.get("error"):
            print(f"- {r['server']} run {r['run']} failed: {r['error']} (log: {r['log']})")
    if any(r.get("error") for r in records):
        print()
    both = len(servers) == 2
    print("| metric | " + " | ".join(servers) + (" | ratio (llamapool / llama-server) |"
                                                 if both else " |"))
    print("|---|" + "---:|" * (len(servers) + (1 if both else 0)))
    for label, part, _, _ in METRICS:
        vals = medians[label]
        row = [fmt(vals[s]) for s in servers]
        if both:
            a, b = vals[LS], vals[LP]
            row.append(f"{b / a:.2f}" if part and a and b is not None else "-")
        print(f"| {label} | " + " | ".join(row) + " |")

    first = {s: next((r for r in records if r["server"] == s and "vectors" in r), None)
             for s in servers}
    if any(first.values()):
        print()
        print("| vectors | " + " | ".join(servers) + " |")
        print("|---|" + "---:|" * len(servers))
        rows = [("dimension", lambda v: ",".join(map(str, v["dims"]))),
                ("L2-normalised", lambda v: fmt(v["normalised"])),
                ("norm min / max", lambda v: f"{v['norm_min']:.5f} / {v['norm_max']:.5f}"),
                ("batch vs single, min cosine",
                 lambda v: fmt(v["batch_vs_single_min_cosine"], 6)),
                ("prompt_tokens, batch", lambda v: fmt(v["batch_tokens"])),
                ("prompt_tokens, sum of singles", lambda v: fmt(v["single_tokens_sum"]))]
        for name, get in rows:
            cells = [get(first[s]["vectors"]) if first[s] else "-" for s in servers]
            print(f"| {name} | " + " | ".join(cells) + " |")

    if agreement:
        n = len(AGREEMENT_TEXTS)
        print()
        print(f"| agreement over {n} texts (llama-server vs llamapool) | value |")
        print("|---|---:|")
        for mode in ("batch", "single"):
            print(f"| {mode}: cosine min | {fmt(agreement[f'{mode}_cosine_min'], 6)} |")
            print(f"| {mode}: cosine mean | {fmt(agreement[f'{mode}_cosine_mean'], 6)} |")
            print(f"| {mode}: max abs element difference | "
                  f"{fmt(agreement[f'{mode}_max_abs_diff'], 6)} |")
            if agreement[f"{mode}_dimension_mismatches"]:
                print(f"| {mode}: dimension mismatches | "
                      f"{agreement[f'{mode}_dimension_mismatches']} |")
        print(f"| llamapool batch vs llama-server single: cosine min / mean | "
              f"{fmt(agreement['lp_batch_vs_ls_single_cosine_min'], 6)} / "
              f"{fmt(agreement['lp_batch_vs_ls_single_cosine_mean'], 6)} |")
        pt = agreement["prompt_tokens_batch"]
        print(f"| prompt_tokens equal per text | "
              f"{agreement['prompt_tokens_per_text_equal']} / {n} |")
        print(f"| prompt_tokens, batch | {fmt(pt[LS])} vs {fmt(pt[LP])} |")
        if agreement["worst_text"] and agreement["worst_text"]["cosine"] < 1 - 1e-6:
            w = agreement["worst_text"]
            print(f"| worst text (single) | #{w['index']} {json.dumps(w['text'])[:40]} "
                  f"({fmt(w['cosine'], 6)}) |")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Main.


def positive_int(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def parse_args():
    home = Path.home()
    p = argparse.ArgumentParser(
        description="Embeddings agreement and throughput, llamapool vs llama-server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--anchor", type=Path,
                   default=Path(os.environ.get("LP_ANCHOR", home / ".cache/lp-anchor")),
                   help="llama.cpp build with llama-server and its shared libraries")
    p.add_argument("--router", type=Path,
                   default=REPO_ROOT / "target/release/llamapool-router",
                   help="llamapool-router binary")
    p.add_argument("--model", type=Path,
                   default=home / ".cache/llamapool/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="GGUF model both servers load")
    p.add_argument("--pooling", default="mean,last",
                   help="comma-separated pooling types (none is not supported here)")
    p.add_argument("--only", choices=SERVERS, help="measure this server alone")
    p.add_argument("--requests", type=positive_int, default=200,
                   help="single-string requests")
    p.add_argument("--concurrency", type=positive_int, default=8,
                   help="client threads for the single-string requests")
    p.add_argument("--batch-requests", type=positive_int, default=20,
                   help="batch requests")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="strings per batch request")
    p.add_argument("--batch-concurrency", type=positive_int, default=2,
                   help="client threads for the batch requests")
    p.add_argument("--warmup", type=int, default=4, help="warm-up single requests")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="runs per server (alternating), medians reported")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per request")
    p.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT_S,
                   help="seconds for a server to answer /health with 200")
    p.add_argument("--request-model", default=None,
                   help="send this as \"model\" in every request (default: none sent)")
    p.add_argument("--ls-threads", type=positive_int, default=2, help="llama-server -t")
    p.add_argument("--ls-parallel", type=positive_int, default=4, help="llama-server -np")
    p.add_argument("--ls-context", type=positive_int, default=4096, help="llama-server -c")
    p.add_argument("--ls-arg", action="append", default=[],
                   help="extra llama-server argument (repeatable)")
    p.add_argument("--lp-arg", action="append", default=[],
                   help="extra llamapool-router argument (repeatable)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the servers' logs (kept anyway when a server fails)")
    p.add_argument("--json", type=Path, default=None, help="also write a JSON report here")
    args = p.parse_args()
    args.poolings = [x.strip() for x in args.pooling.split(",") if x.strip()]
    if not args.poolings:
        p.error("--pooling: no pooling type given")
    if "none" in args.poolings or "rank" in args.poolings:
        p.error("--pooling: none and rank give no single vector per input")
    args.servers = [args.only] if args.only else list(SERVERS)
    if not args.model.is_file():
        p.error(f"model {args.model} not found (--model)")
    if LS in args.servers and not os.access(args.anchor / "llama-server", os.X_OK):
        p.error(f"{args.anchor / 'llama-server'} not found or not executable (--anchor)")
    if LP in args.servers and not os.access(args.router, os.X_OK):
        p.error(f"{args.router} not found or not executable (--router)")
    return args


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    atexit.register(stop_all)
    log_dir = Path(tempfile.mkdtemp(prefix="embeddings-bench-"))
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "agreement_texts": AGREEMENT_TEXTS,
        "poolings": {},
    }
    failed = False
    try:
        for pooling in args.poolings:
            records, vectors = [], {}
            for run in range(1, args.repeat + 1):
                for label in args.servers:
                    want = label not in vectors
                    record, vecs = measure_server(args, label, pooling, run, log_dir, want)
                    if vecs is not None:
                        vectors[label] = vecs
                    records.append(record)
                    if (record.get("error") or record.get("agreement_error")
                            or any(record.get(p, {}).get("errors") for p in
                                   ("single", "batch"))):
                        failed = True
            agreement = (compare_vectors(vectors[LS], vectors[LP])
                         if LS in vectors and LP in vectors else None)
            medians = summarise(records, args.servers)
            print_report(pooling, records, medians, agreement, args.servers, args.repeat)
            report["poolings"][pooling] = {"runs": records, "medians": medians,
                                           "agreement": agreement}
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        failed = True
        raise SystemExit(130)
    finally:
        stop_all()
        if args.json and report["poolings"]:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"\nJSON report: {args.json}")
        if failed or args.keep_logs:
            print(f"server logs kept in {log_dir}", file=sys.stderr)
        else:
            for f in log_dir.iterdir():
                f.unlink()
            log_dir.rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
