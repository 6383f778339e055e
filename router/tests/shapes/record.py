#!/usr/bin/env python3
"""Records the response bodies of a running server into JSON files, for the shape tests in
router/src/openai/shapes_tests.rs (which compare llamapool's typed bodies with them).

    python3 router/tests/shapes/record.py http://127.0.0.1:8080 router/tests/shapes/llama_server

The files under llama_server/ were recorded from llama.cpp's llama-server (the generation
this project builds against) serving SmolLM2-135M-Instruct; values do not matter to the
tests, only keys and JSON types. Standard library only.
"""
import json
import sys
import urllib.error
import urllib.request

BASE, OUT = sys.argv[1], sys.argv[2]


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        return error.read().decode()


def events(text):
    """The JSON `data:` events of an SSE body, `[DONE]` left out."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            out.append(json.loads(line[6:]))
    return out


def first(stream, kind):
    """The first event of a stream with this `type`."""
    return next(e for e in stream if e.get("type") == kind)


def save(name, value):
    with open(f"{OUT}/{name}.json", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")


chat = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
        "temperature": 0}
text = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}

save("chat_response", json.loads(call("/v1/chat/completions",
                                      dict(chat, logprobs=True, top_logprobs=2))))
stream = events(call("/v1/chat/completions",
                     dict(chat, stream=True, stream_options={"include_usage": True})))
save("chat_chunk_role", stream[0])
save("chat_chunk_text", next(e for e in stream[1:] if e["choices"]
                             and e["choices"][0]["delta"].get("content")))
save("chat_chunk_finish", next(e for e in stream if e["choices"]
                               and e["choices"][0]["finish_reason"]))
save("chat_chunk_usage", stream[-1])
save("completion_response", json.loads(call("/v1/completions", dict(text, logprobs=2))))
stream = events(call("/v1/completions", dict(text, stream=True)))
save("completion_chunk_text", stream[0])
save("completion_chunk_finish", stream[-1])
native = {"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}
save("native_result", json.loads(call("/completion", dict(native, n_probs=2))))
stream = events(call("/completion", dict(native, stream=True, return_progress=True,
                                          timings_per_token=True)))
save("native_progress", next(e for e in stream if "prompt_progress" in e))
save("native_partial", next(e for e in stream if not e["stop"] and e["content"]))
save("native_final", stream[-1])
save("props", json.loads(call("/props")))
save("slots", json.loads(call("/slots")))
save("apply_template", json.loads(call("/apply-template",
                                       {"messages": chat["messages"]})))
save("error_invalid", json.loads(call("/v1/chat/completions", {"messages": "x"})))
save("error_context", json.loads(call("/completion",
                                      dict(native, prompt="hello " * 5000))))
anthropic = {"model": "m", "max_tokens": 4, "temperature": 0, "system": "Be brief.",
             "messages": [{"role": "user", "content": "Say hi"}]}
save("anthropic_message", json.loads(call("/v1/messages", anthropic)))
stream = events(call("/v1/messages", dict(anthropic, stream=True)))
for kind in ["message_start", "content_block_start", "content_block_delta",
             "content_block_stop", "message_delta", "message_stop"]:
    save(f"anthropic_{kind}", first(stream, kind))
save("anthropic_count_tokens", json.loads(call("/v1/messages/count_tokens", anthropic)))
responses = {"model": "m", "max_output_tokens": 4, "temperature": 0, "instructions": "Be brief.",
             "input": [{"role": "user", "content": "Say hi"}]}
save("responses_response", json.loads(call("/v1/responses", responses)))
stream = events(call("/v1/responses", dict(responses, stream=True)))
for kind in ["response.created", "response.in_progress", "response.output_item.added",
             "response.content_part.added", "response.output_text.delta",
             "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.completed"]:
    save("responses_" + kind.replace("response.", "").replace(".", "_"), first(stream, kind))
