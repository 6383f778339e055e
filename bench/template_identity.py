#!/usr/bin/env python3
"""Chat-template identity with llama-server: is llamapool's rendered prompt byte-identical?

For each chat template in a directory (by default llama.cpp's own collection of real model
templates, models/templates/*.jinja, as kept next to an anchor llama-server build), this
starts the real llama-server and llamapool-router side by side with the same llama-server
flags (`-m MODEL --port P --chat-template-file T -np 1 -c 2048`) on free loopback ports,
waits for both to answer GET /health with 200, sends the same bodies to both servers'
POST /apply-template and compares the returned `prompt` strings byte for byte (and the
status codes). Both servers are stopped (their whole process groups, and every descendant)
after each template, also on errors and on Ctrl-C.

The bodies (see BODIES): `plain` (one user message), `multi` (system, user, assistant,
user), `no_gen_prompt` (multi with "add_generation_prompt": false), `no_thinking` (multi
with "chat_template_kwargs": {"enable_thinking": false}) are the non-tool bodies; `tools`
(multi with two function tools) and `tool_round_trip` (a user question, an assistant tool
call with "content": null, the tool's result, tools given) are the tool bodies.

Per body the verdict is one of
    identical       both 200 with the same prompt, byte for byte
    differs         both 200, different prompts: first differing offset, an excerpt of
                    both and a guess at the kind of difference (whitespace only, date only,
                    an extra piece on one side: leading, trailing or at an offset; same
                    characters reordered; else both sides' differing parts)
    both_refuse     both answered with an error status
    ls_refuses / lp_refuses   only llama-server / only llamapool answered with an error
    error           no answer (connection failure, timeout)
and a side that never becomes healthy makes the template "refused at start" by that side
(its last stderr lines are printed and kept in the report).

Usage (from anywhere; Python 3 standard library only):

    python3 bench/template_identity.py [--anchor DIR] [--router PATH] [--model GGUF]
        [--templates DIR] [--only SUBSTRING] [--out REPORT.json]

    --anchor DIR     the llama.cpp build with llama-server and its shared libraries
                     (default $LP_ANCHOR or ~/.cache/lp-anchor); llama-server runs with
                     LD_LIBRARY_PATH=DIR
    --router PATH    llamapool-router (default target/release/llamapool-router under the
                     repository root); it starts llamapool-worker from its own directory.
                     If missing (being rebuilt), the script waits for it.
    --model GGUF     the model both servers load (default
                     ~/.cache/llamapool/models/SmolLM2-135M-Instruct.Q4_1.gguf); only its
                     vocabulary matters (bos/eos token text), nothing is generated
    --templates DIR  the *.jinja templates (default ANCHOR/templates)
    --only SUBSTR    only templates whose file name contains SUBSTR
    --out FILE       also write a JSON report (per template and body: statuses, both
                     prompts or error bodies, the verdict and its details; the totals)

Prints one line per template and an indented line per differing body, then the totals.
The exit status is 0 whatever the verdicts (this is a measurement, not a test).

Templates that call strftime_now render today's date on both sides; both servers run on
the same machine within seconds of each other, so a date difference is reported as such
("date only") rather than hidden.
"""

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from servers import Server, anchor_env, free_port, http_call, on_sigterm, wait_healthy

REPO_ROOT = Path(__file__).resolve().parent.parent

HEALTH_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
TEMPLATE_TIMEOUT_S = 180.0
BINARY_WAIT_S = 900.0
STDERR_TAIL_LINES = 15
EXCERPT_CHARS = 40
LOG_PREFIX = "template-identity-"  # the temporary server logs' names

# ---------------------------------------------------------------------------------------
# The request bodies.

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web and return the top results.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["query"],
            },
        },
    },
]

MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]

TOOL_ROUND_TRIP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\":20}"},
]

# (name, uses tools, body)
BODIES = [
    ("plain", False, {"messages": [{"role": "user", "content": "Hello"}]}),
    ("multi", False, {"messages": MULTI_TURN}),
    ("no_gen_prompt", False, {"messages": MULTI_TURN, "add_generation_prompt": False}),
    ("no_thinking", False,
     {"messages": MULTI_TURN, "chat_template_kwargs": {"enable_thinking": False}}),
    ("tools", True, {"messages": MULTI_TURN, "tools": TOOLS}),
    ("tool_round_trip", True, {"messages": TOOL_ROUND_TRIP, "tools": TOOLS}),
]

# ---------------------------------------------------------------------------------------
# Processes.


def wait_for_file(path, what):
    """Waits (up to BINARY_WAIT_S) for an executable that may be being rebuilt."""
    deadline = time.monotonic() + BINARY_WAIT_S
    warned = False
    while not (path.is_file() and os.access(path, os.X_OK)):
        if time.monotonic() > deadline:
            sys.exit(f"{what} {path} still missing after {BINARY_WAIT_S:.0f} s")
        if not warned:
            print(f"  (waiting for {what} {path} to appear)", file=sys.stderr, flush=True)
            warned = True
        time.sleep(5)
    if warned:
        time.sleep(5)  # let the writer finish


# ---------------------------------------------------------------------------------------
# Comparison.

MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
          "December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
DATE_RE = re.compile(
    rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b"
    rf"|\b\d{{1,2}} (?:{MONTHS}) \d{{4}}\b"
    rf"|\b(?:{MONTHS}) \d{{1,2}},? \d{{4}}\b"
    rf"|\b\d{{1,2}}/\d{{1,2}}/\d{{4}}\b")


def first_difference(a, b):
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def excerpt(text, at):
    return text[max(0, at - EXCERPT_CHARS):at + EXCERPT_CHARS]


def differing_parts(a, b):
    """(offset, a's part, b's part): what remains of each after their common prefix and
    common suffix are cut off."""
    start = first_difference(a, b)
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a_part, b_part = a[start:len(a) - end], b[start:len(b) - end]
    if a_part and b_part:
        return start, a_part, b_part
    # A pure insertion can slide left over repeated text ('think><' or '<think>'): take the
    # first place, going left, where it neither starts nor ends inside a word.
    text, part = (a, a_part) if a_part else (b, b_part)
    at = start
    while at > 0 and part and text[at - 1] == part[-1]:
        if not (part[0].isalnum() or part[-1].isalnum()):
            break
        at -= 1
        part = text[at] + part[:-1]
    if part and (part[0].isalnum() or part[-1].isalnum()):
        at, part = start, text[start:start + len(part)]
    return (at, part, "") if a_part else (at, "", part)


def classify(ls, lp):
    """A guess at the kind of difference between two different prompts."""
    if re.sub(r"\s+", "", ls) == re.sub(r"\s+", "", lp):
        return "whitespace only"
    if DATE_RE.sub("<DATE>", ls) == DATE_RE.sub("<DATE>", lp):
        return "date only"
    at, ls_part, lp_part = differing_parts(ls, lp)
    where = ("leading" if at == 0 else
             "trailing" if at + max(len(ls_part), len(lp_part)) == max(len(ls), len(lp))
             else f"at offset {at}")
    if not lp_part:
        return f"llama-server has an extra {ls_part[:80]!r} ({where})"
    if not ls_part:
        return f"llamapool has an extra {lp_part[:80]!r} ({where})"
    if sorted(ls) == sorted(lp):
        return "same characters, reordered (key order?)"
    return f"content: llama-server {ls_part[:60]!r} vs llamapool {lp_part[:60]!r}"


def error_text(text):
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:300]
    if isinstance(err, dict):
        return str(err.get("message", err))[:300]
    return str(err)[:300]


def ask(port, body):
    """{'status', 'prompt' | 'error'} from POST /apply-template."""
    try:
        status, text = http_call(port, "POST", "/apply-template", body,
                                 timeout=REQUEST_TIMEOUT_S)
    except (OSError, http.client.HTTPException) as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    if status == 200:
        try:
            prompt = json.loads(text)["prompt"]
        except (ValueError, KeyError, TypeError):
            return {"status": status, "error": f"no prompt in {text[:200]!r}"}
        if isinstance(prompt, str):
            return {"status": status, "prompt": prompt}
        return {"status": status, "error": f"prompt is not a string: {text[:200]!r}"}
    return {"status": status, "error": error_text(text)}


def compare(ls, lp):
    """The verdict for one body from both answers."""
    out = {"verdict": None, "llama_server": ls, "llamapool": lp}
    if ls["status"] is None or lp["status"] is None:
        out["verdict"] = "error"
    elif "prompt" in ls and "prompt" in lp:
        if ls["prompt"] == lp["prompt"]:
            out["verdict"] = "identical"
        else:
            at = first_difference(ls["prompt"], lp["prompt"])
            out["verdict"] = "differs"
            out["offset"] = at
            out["ls_excerpt"] = excerpt(ls["prompt"], at)
            out["lp_excerpt"] = excerpt(lp["prompt"], at)
            out["kind"] = classify(ls["prompt"], lp["prompt"])
    elif "prompt" not in ls and "prompt" not in lp:
        out["verdict"] = "both_refuse"
    elif "prompt" in ls:
        out["verdict"] = "lp_refuses"
    else:
        out["verdict"] = "ls_refuses"
    return out


# ---------------------------------------------------------------------------------------
# One template.


def run_template(args, template):
    """Both servers up on this template, every body asked of both, both stopped."""
    result = {"template": template.name, "started": {}, "stderr_tail": {}, "bodies": {}}
    common = ["-m", str(args.model), "--chat-template-file", str(template),
              "-np", "1", "-c", "2048"]
    servers = []
    start = time.monotonic()
    try:
        ls_port, lp_port = free_port(), free_port()
        while lp_port == ls_port:
            lp_port = free_port()
        ls = Server("llama-server",
                    [str(args.anchor / "llama-server"), *common, "--host", "127.0.0.1",
                     "--port", str(ls_port)], ls_port, env=anchor_env(args.anchor),
                    log_prefix=LOG_PREFIX)
        servers.append(ls)
        wait_for_file(args.router, "llamapool-router")
        wait_for_file(args.router.parent / "llamapool-worker", "llamapool-worker")
        result["router_mtime"] = time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.localtime(args.router.stat().st_mtime))
        lp = Server("llamapool",
                    [str(args.router), *common, "--host", "127.0.0.1",
                     "--port", str(lp_port)], lp_port, log_prefix=LOG_PREFIX)
        servers.append(lp)

        health = wait_healthy(servers, HEALTH_TIMEOUT_S)
        for s in servers:
            result["started"][s.label] = health[s.label] is None
            if health[s.label] is not None:
                result["stderr_tail"][s.label] = [health[s.label]] + s.tail(STDERR_TAIL_LINES)
        if not all(result["started"].values()):
            return result

        for name, _, body in BODIES:
            if time.monotonic() - start > TEMPLATE_TIMEOUT_S:
                result["bodies"][name] = {"verdict": "error",
                                          "llama_server": {"status": None, "error": "skipped"},
                                          "llamapool": {"status": None, "error": "skipped"},
                                          "note": "template time limit reached"}
                continue
            result["bodies"][name] = compare(ask(ls.port, body), ask(lp.port, body))
        return result
    finally:
        for s in servers:
            s.stop()
        result["seconds"] = round(time.monotonic() - start, 2)


# ---------------------------------------------------------------------------------------
# Report.

MARK = {"identical": "=", "differs": "X", "both_refuse": "R", "ls_refuses": "r-ls",
        "lp_refuses": "r-lp", "error": "E"}


def template_line(r, width):
    name = r["template"].removesuffix(".jinja")
    refused = [side for side, ok in r["started"].items() if not ok]
    if refused:
        lines = [f"{name:<{width}}  refused at start by {' and '.join(refused)}"]
        for side in refused:
            for tail in r["stderr_tail"].get(side, [])[-STDERR_TAIL_LINES:]:
                lines.append(f"    [{side}] {tail}")
        return lines
    verdicts = {b: v["verdict"] for b, v in r["bodies"].items()}
    if all(v == "identical" for v in verdicts.values()):
        head = "identical"
    elif all(v in ("identical", "both_refuse") for v in verdicts.values()):
        head = "identical (both refuse: " + ", ".join(
            b for b, v in verdicts.items() if v == "both_refuse") + ")"
    else:
        head = "differs"
    marks = " ".join(f"{b}{MARK[v]}" if v != "identical" else f"{b}=" for b, v in
                     verdicts.items())
    lines = [f"{name:<{width}}  {head:<10}  {marks}"]
    for b, v in r["bodies"].items():
        if v["verdict"] == "differs":
            lines.append(f"    {b}: first difference at offset {v['offset']}; {v['kind']}; "
                         f"llama-server {v['ls_excerpt']!r} / llamapool {v['lp_excerpt']!r}")
        elif v["verdict"] in ("ls_refuses", "lp_refuses", "error"):
            lines.append(f"    {b}: {v['verdict']}: llama-server "
                         f"{v['llama_server'].get('status')} "
                         f"{v['llama_server'].get('error', '')[:160]!r} / llamapool "
                         f"{v['llamapool'].get('status')} "
                         f"{v['llamapool'].get('error', '')[:160]!r}")
    return lines


def totals(results):
    non_tool = [b for b, tools, _ in BODIES if not tools]
    tool = [b for b, tools, _ in BODIES if tools]
    started = [r for r in results if all(r["started"].values())]

    def all_are(r, bodies, ok):
        return all(r["bodies"].get(b, {}).get("verdict") in ok for b in bodies)

    t = {
        "templates": len(results),
        "refused_at_start": {
            "llama-server only": sum(1 for r in results if not r["started"]["llama-server"]
                                     and r["started"].get("llamapool", False)),
            "llamapool only": sum(1 for r in results if r["started"]["llama-server"]
                                  and not r["started"].get("llamapool", False)),
            "both": sum(1 for r in results if not r["started"]["llama-server"]
                        and not r["started"].get("llamapool", False)),
        },
        "both_started": len(started),
        "identical_on_all_non_tool_bodies": sum(
            all_are(r, non_tool, {"identical"}) for r in started),
        "identical_or_both_refuse_on_all_non_tool_bodies": sum(
            all_are(r, non_tool, {"identical", "both_refuse"}) for r in started),
        "identical_on_all_tool_bodies": sum(all_are(r, tool, {"identical"}) for r in started),
        "identical_or_both_refuse_on_all_tool_bodies": sum(
            all_are(r, tool, {"identical", "both_refuse"}) for r in started),
        "identical_on_all_bodies": sum(
            all_are(r, non_tool + tool, {"identical"}) for r in started),
        "identical_or_both_refuse_on_all_bodies": sum(
            all_are(r, non_tool + tool, {"identical", "both_refuse"}) for r in started),
        "per_body": {},
    }
    for b, _, _ in BODIES:
        counts = {}
        for r in started:
            v = r["bodies"].get(b, {}).get("verdict", "error")
            counts[v] = counts.get(v, 0) + 1
        t["per_body"][b] = counts
    return t


def print_totals(t):
    rs = t["refused_at_start"]
    print()
    print(f"templates: {t['templates']}; both servers started: {t['both_started']}; "
          f"refused at start by llama-server only {rs['llama-server only']}, "
          f"by llamapool only {rs['llamapool only']}, by both {rs['both']}")
    print(f"identical on all non-tool bodies: {t['identical_on_all_non_tool_bodies']} "
          f"(counting both-refuse as a match: "
          f"{t['identical_or_both_refuse_on_all_non_tool_bodies']})")
    print(f"identical on all tool bodies:     {t['identical_on_all_tool_bodies']} "
          f"(counting both-refuse as a match: "
          f"{t['identical_or_both_refuse_on_all_tool_bodies']})")
    print(f"identical on all bodies:          {t['identical_on_all_bodies']} "
          f"(counting both-refuse as a match: "
          f"{t['identical_or_both_refuse_on_all_bodies']})")
    print("per body (of the templates both servers started on):")
    for b, counts in t["per_body"].items():
        print(f"  {b:<16} " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
    print("marks: body= identical, X differs, R both refuse, r-ls / r-lp only llama-server /"
          " only llamapool refuses, E no answer")


def git_head():
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main():
    default_anchor = os.environ.get("LP_ANCHOR", "~/.cache/lp-anchor")
    p = argparse.ArgumentParser(
        description="Compare llamapool's POST /apply-template prompts with llama-server's "
                    "on a directory of chat templates.")
    p.add_argument("--anchor", default=default_anchor,
                   help="llama.cpp build dir with llama-server and its libraries "
                        "(default $LP_ANCHOR or ~/.cache/lp-anchor)")
    p.add_argument("--router", default=str(REPO_ROOT / "target/release/llamapool-router"),
                   help="llamapool-router (default target/release/llamapool-router)")
    p.add_argument("--model",
                   default="~/.cache/llamapool/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="GGUF model both servers load")
    p.add_argument("--templates", default=None,
                   help="directory of *.jinja templates (default ANCHOR/templates)")
    p.add_argument("--only", default=None, help="only templates whose name contains this")
    p.add_argument("--out", default=None, help="write a JSON report here")
    args = p.parse_args()

    args.anchor = Path(args.anchor).expanduser().resolve()
    args.router = Path(args.router).expanduser().absolute()
    args.model = Path(args.model).expanduser().resolve()
    templates_dir = (Path(args.templates).expanduser() if args.templates
                     else args.anchor / "templates")
    templates = sorted(templates_dir.glob("*.jinja"), key=lambda t: t.name.lower())
    if args.only:
        templates = [t for t in templates if args.only in t.name]
    if not templates:
        sys.exit(f"no templates in {templates_dir}" + (f" matching {args.only!r}"
                                                         if args.only else ""))
    for path, what in ((args.anchor / "llama-server", "llama-server"),
                       (args.model, "model")):
        if not path.is_file():
            sys.exit(f"{what} not found: {path}")

    signal.signal(signal.SIGTERM, on_sigterm)

    width = max(len(t.name) - len(".jinja") for t in templates)
    print(f"{len(templates)} templates from {templates_dir}; model {args.model.name}; "
          f"router {args.router}", flush=True)
    results = []
    try:
        for t in templates:
            r = run_template(args, t)
            results.append(r)
            for line in template_line(r, width):
                print(line, flush=True)
    except KeyboardInterrupt:
        print("interrupted; totals of the templates done so far", flush=True)
    t = totals(results)
    print_totals(t)
    builds = sorted({r["router_mtime"] for r in results if "router_mtime" in r})
    if len(builds) > 1:
        print(f"note: llamapool-router was rebuilt during the run ({len(builds)} builds, "
              f"modified {', '.join(builds)}); each template's router_mtime is in the report")
    if args.out:
        report = {
            "git_head": git_head(),
            "anchor": str(args.anchor),
            "router": str(args.router),
            "model": str(args.model),
            "templates_dir": str(templates_dir),
            "bodies": {name: body for name, _, body in BODIES},
            "totals": t,
            "results": results,
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
