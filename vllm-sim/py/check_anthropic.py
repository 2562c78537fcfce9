#!/usr/bin/env python3
"""Drive a running vllm-sim with the official `anthropic` SDK and check what it returns.

Usage: check_anthropic.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8001)

Checks: messages.create plain (text, stop_reason, usage with the prompt split into input,
cache-creation and cache-read tokens), the raw event stream (stream=True, Anthropic's event
order), the `messages.stream` helper's final message, a second turn of a conversation whose
repeated prefix is read from the cache (vLLM's cached-token rule), and error mapping
(404 unknown model). Exits non-zero on the first failed check.
"""
import sys
import uuid

import anthropic
from anthropic import Anthropic

BLOCK = 16


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def prompt_total(usage) -> int:
    return usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = Anthropic(base_url=base_url, api_key="none", max_retries=0, timeout=60)

    system = f"Session {uuid.uuid4().hex}. You are a patient assistant. " * 4
    q1 = "Explain how a bicycle stays upright while moving."
    m1 = client.messages.create(
        model=model,
        max_tokens=30,
        system=system,
        messages=[{"role": "user", "content": q1}],
        extra_body={"min_tokens": 30},
    )
    check(m1.type == "message" and m1.role == "assistant", "messages.create: message object")
    check(len(m1.content) == 1 and m1.content[0].type == "text" and len(m1.content[0].text) > 0,
          "one non-empty text block")
    check(m1.stop_reason == "max_tokens", "min_tokens = max_tokens runs to the limit (stop_reason max_tokens)")
    u1 = m1.usage
    check(u1.output_tokens == 30, "usage.output_tokens == max_tokens")
    check(u1.cache_read_input_tokens == 0, f"turn 1 on a cold prefix reads nothing ({u1.cache_read_input_tokens})")
    p1 = prompt_total(u1)
    check(u1.cache_creation_input_tokens == p1 // BLOCK * BLOCK,
          "cache_creation_input_tokens = the prompt's full blocks (vLLM's created_cache_tokens)")

    # Turn 2, raw stream: the conversation so far plus a question.
    messages = [
        {"role": "user", "content": q1},
        {"role": "assistant", "content": m1.content[0].text},
        {"role": "user", "content": "And why does it fall over when it stops?"},
    ]
    events = list(client.messages.create(
        model=model, max_tokens=6, system=system, messages=messages, stream=True,
        extra_body={"min_tokens": 6},
    ))
    types = [e.type for e in events]
    expected = ["message_start", "content_block_start"] + ["content_block_delta"] * 6 + [
        "content_block_stop", "message_delta", "message_stop"]
    check(types == expected, f"Anthropic event order ({types})")
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    delta = events[-2]
    check(delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 6, "message_delta: stop_reason, usage")
    p2 = prompt_total(delta.usage)
    read = delta.usage.cache_read_input_tokens
    expect = min((p1 + 30 - 1) // BLOCK, (p2 - 1) // BLOCK) * BLOCK
    check(read == expect and read > 0, f"turn 2 reads the cache by vLLM's rule ({read} == {expect}, prompt {p2})")
    check(events[0].message.usage.cache_read_input_tokens == read, "message_start carries the same cache split")
    check(len(text) > 0, "streamed text")

    # The stream helper accumulates the same message.
    with client.messages.stream(model=model, max_tokens=6, system=system, messages=messages,
                                extra_body={"min_tokens": 6}) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    check(streamed == text and final.content[0].text == text, "messages.stream helper: same text")
    check(final.usage.cache_read_input_tokens >= read and final.usage.output_tokens == 6,
          "messages.stream helper: final usage")

    try:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        check(False, "unknown model raises")
    except anthropic.NotFoundError as e:
        check(e.status_code == 404 and e.body["error"]["type"] == "not_found_error",
              "unknown model -> NotFoundError (404, not_found_error)")
    print("anthropic client checks passed")


if __name__ == "__main__":
    main()
